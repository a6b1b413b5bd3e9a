//! Reads the GNU build id of a kernel ELF file.
//!
//! The kernel reports its build id (the `.note.gnu.build-id` note the linker
//! writes) in every Hello and Version reply. Migration will need the same build
//! on both sides, so the host compares what VMs report against the file it
//! booted. Only the little we need of ELF64 is parsed here: the section header
//! table, then the notes inside `SHT_NOTE` sections (falling back to `PT_NOTE`
//! segments when sections were stripped).

use std::fmt;
use std::path::Path;

/// Note type of a GNU build id (`NT_GNU_BUILD_ID`).
const NT_GNU_BUILD_ID: u32 = 3;
const SHT_NOTE: u32 = 7;
const PT_NOTE: u32 = 4;

/// Why no build id could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfError {
    NotElf64LittleEndian,
    Truncated(&'static str),
    NoBuildId,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotElf64LittleEndian => f.write_str("not a little-endian ELF64 file"),
            Self::Truncated(what) => write!(f, "ELF file truncated while reading {what}"),
            Self::NoBuildId => f.write_str("ELF file has no GNU build-id note"),
        }
    }
}

impl std::error::Error for ElfError {}

/// Reads the build id of the ELF file at `path`.
pub fn read_build_id(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read kernel {}: {e}", path.display()))?;
    build_id(&bytes).map_err(|e| anyhow::anyhow!("kernel {}: {e}", path.display()))
}

fn u16_at(b: &[u8], off: usize, what: &'static str) -> Result<u16, ElfError> {
    let s = b.get(off..off + 2).ok_or(ElfError::Truncated(what))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize, what: &'static str) -> Result<u32, ElfError> {
    let s = b.get(off..off + 4).ok_or(ElfError::Truncated(what))?;
    Ok(u32::from_le_bytes(s.try_into().expect("slice of 4")))
}

fn u64_at(b: &[u8], off: usize, what: &'static str) -> Result<u64, ElfError> {
    let s = b.get(off..off + 8).ok_or(ElfError::Truncated(what))?;
    Ok(u64::from_le_bytes(s.try_into().expect("slice of 8")))
}

/// The bytes `offset..offset+size` of the file, checked against its length.
fn region<'a>(
    b: &'a [u8],
    offset: u64,
    size: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(offset).map_err(|_| ElfError::Truncated(what))?;
    let len = usize::try_from(size).map_err(|_| ElfError::Truncated(what))?;
    let end = start.checked_add(len).ok_or(ElfError::Truncated(what))?;
    b.get(start..end).ok_or(ElfError::Truncated(what))
}

/// Extracts the GNU build id from an ELF64 little-endian image.
pub fn build_id(b: &[u8]) -> Result<Vec<u8>, ElfError> {
    // e_ident: magic, class 2 (64-bit), data 1 (little-endian).
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Err(ElfError::NotElf64LittleEndian);
    }
    let shoff = u64_at(b, 0x28, "e_shoff")?;
    let shentsize = u16_at(b, 0x3a, "e_shentsize")? as u64;
    let shnum = u16_at(b, 0x3c, "e_shnum")? as u64;
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        let sh = usize::try_from(sh).map_err(|_| ElfError::Truncated("section header"))?;
        if u32_at(b, sh + 4, "sh_type")? != SHT_NOTE {
            continue;
        }
        let offset = u64_at(b, sh + 0x18, "sh_offset")?;
        let size = u64_at(b, sh + 0x20, "sh_size")?;
        if let Some(id) = find_build_id(region(b, offset, size, "note section")?)? {
            return Ok(id);
        }
    }
    // Sections may be stripped; the program headers still locate the notes.
    let phoff = u64_at(b, 0x20, "e_phoff")?;
    let phentsize = u16_at(b, 0x36, "e_phentsize")? as u64;
    let phnum = u16_at(b, 0x38, "e_phnum")? as u64;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let ph = usize::try_from(ph).map_err(|_| ElfError::Truncated("program header"))?;
        if u32_at(b, ph, "p_type")? != PT_NOTE {
            continue;
        }
        let offset = u64_at(b, ph + 0x08, "p_offset")?;
        let size = u64_at(b, ph + 0x20, "p_filesz")?;
        if let Some(id) = find_build_id(region(b, offset, size, "note segment")?)? {
            return Ok(id);
        }
    }
    Err(ElfError::NoBuildId)
}

/// Walks a sequence of ELF notes (namesz, descsz, type, name, desc; name and
/// desc padded to 4 bytes) looking for the GNU build id.
fn find_build_id(notes: &[u8]) -> Result<Option<Vec<u8>>, ElfError> {
    let pad4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = u32_at(notes, at, "note namesz")? as usize;
        let descsz = u32_at(notes, at + 4, "note descsz")? as usize;
        let kind = u32_at(notes, at + 8, "note type")?;
        let name_start = at + 12;
        let desc_start = name_start + pad4(namesz);
        let name = notes
            .get(name_start..name_start + namesz)
            .ok_or(ElfError::Truncated("note name"))?;
        let desc = notes
            .get(desc_start..desc_start + descsz)
            .ok_or(ElfError::Truncated("note descriptor"))?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Ok(Some(desc.to_vec()));
        }
        at = desc_start + pad4(descsz);
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    /// A minimal ELF64 file: header, one note blob, then either a section
    /// header table (null section + SHT_NOTE) or a program header (PT_NOTE).
    pub(crate) fn synthetic_elf(notes: &[u8], as_section: bool) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        let notes_off = f.len() as u64;
        f.extend_from_slice(notes);
        let table_off = f.len() as u64;
        if as_section {
            f[0x28..0x30].copy_from_slice(&table_off.to_le_bytes());
            f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
            f[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&[0u8; 64]); // SHT_NULL
            let mut sh = [0u8; 64];
            sh[4..8].copy_from_slice(&SHT_NOTE.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&notes_off.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
            f.extend_from_slice(&sh);
        } else {
            f[0x20..0x28].copy_from_slice(&table_off.to_le_bytes());
            f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
            ph[0x08..0x10].copy_from_slice(&notes_off.to_le_bytes());
            ph[0x20..0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
            f.extend_from_slice(&ph);
        }
        f
    }

    const ID: [u8; 20] = [
        0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ];

    #[test]
    fn finds_build_id_after_other_notes() {
        // A Xen PVH note (as the kernel carries) comes first and must be skipped.
        let mut notes = note(b"Xen\0", 18, &0x10_0000u32.to_le_bytes());
        notes.extend(note(b"GNU\0", 1, &[0; 16])); // NT_GNU_ABI_TAG, not the id
        notes.extend(note(b"GNU\0", NT_GNU_BUILD_ID, &ID));
        for as_section in [true, false] {
            assert_eq!(build_id(&synthetic_elf(&notes, as_section)).unwrap(), ID);
        }
    }

    #[test]
    fn missing_or_broken_notes_are_errors() {
        let notes = note(b"Xen\0", 18, &[0; 4]);
        assert_eq!(
            build_id(&synthetic_elf(&notes, true)),
            Err(ElfError::NoBuildId)
        );
        let mut broken = note(b"GNU\0", NT_GNU_BUILD_ID, &ID);
        broken[4..8].copy_from_slice(&1000u32.to_le_bytes()); // descsz past the end
        assert!(matches!(
            build_id(&synthetic_elf(&broken, true)),
            Err(ElfError::Truncated(_))
        ));
        assert_eq!(build_id(b"not an elf"), Err(ElfError::NotElf64LittleEndian));
        let mut elf = synthetic_elf(&note(b"GNU\0", 3, &ID), true);
        elf[4] = 1; // ELF32
        assert_eq!(build_id(&elf), Err(ElfError::NotElf64LittleEndian));
        let elf = synthetic_elf(&note(b"GNU\0", 3, &ID), true);
        assert!(matches!(
            build_id(&elf[..elf.len() - 50]),
            Err(ElfError::Truncated(_))
        ));
    }
}
