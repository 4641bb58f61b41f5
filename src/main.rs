//! Thin entry point: parse the command line and hand over to the library.

use clap::Parser;

fn main() {
    let cli = carevault::cli::Cli::parse();
    std::process::exit(carevault::cli::run(cli));
}
