//! `capsulectl`: see the library crate for everything it does.

use clap::Parser;

fn main() {
    let cli = capsulectl::cli::Cli::parse();
    match capsulectl::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("capsulectl: error: {e:#}");
            std::process::exit(1);
        }
    }
}
