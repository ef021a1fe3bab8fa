//! The `pfstorer` command line: parses arguments and hands over to `pfstorer::cli`.

use clap::Parser;

fn main() {
    let cli = pfstorer::cli::Cli::parse();
    if let Err(err) = pfstorer::cli::run(cli) {
        // One line: the error and its causes, joined.
        let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
