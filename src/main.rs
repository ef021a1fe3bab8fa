//! The `pfstorer` command line: parses arguments and hands over to `pfstorer::cli`.

use clap::Parser;

fn main() {
    // Freed tensor buffers stay in the process for reuse instead of going back to the kernel
    // (see pfstorer::allocator: a third of a CPU forward went to zeroing fresh pages).
    pfstorer::allocator::retain_freed_memory();
    let cli = pfstorer::cli::Cli::parse();
    // Ctrl-C or SIGTERM during a write removes the temporary file before exiting.
    pfstorer::fsutil::install_signal_cleanup();
    if let Err(err) = pfstorer::cli::run(cli) {
        eprintln!("error: {}", pfstorer::cli::error_line(&err));
        std::process::exit(pfstorer::cli::exit_code(&err));
    }
}
