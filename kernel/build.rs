//! Links the kernel as a static, non-PIE ELF at 1 MiB with a PVH note and a GNU
//! build id (the id that control clients and migration compare).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = format!("{dir}/linker.ld");
    for arg in [
        "-nostartfiles",
        "-nodefaultlibs",
        "-static",
        "-no-pie",
        &format!("-Wl,-T,{script}"),
        "-Wl,--build-id=sha1",
        "-Wl,--undefined=pvh_start32",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg={arg}");
    }
    // A build tag changes the image (and so its build id) without changing
    // the code: tests use it to make a "different build" for refusal checks.
    let tag = std::env::var("CAPSULES_BUILD_TAG").unwrap_or_default();
    println!("cargo:rustc-env=CAPSULES_BUILD_TAG={tag}");
    println!("cargo:rerun-if-env-changed=CAPSULES_BUILD_TAG");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=build.rs");
}
