//! Subcommands of the `pfstorer` binary, one file each. `anyhow` lives here, at the edge.

pub mod bench;
pub mod convert;
pub mod model_args;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pfstorer",
    version,
    about = "Personalized face restoration and super-resolution with a diffusion model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert a PyTorch-Lightning .ckpt into a safetensors file (memory-mapped on later loads).
    Convert(convert::ConvertArgs),
    /// Time the networks (seconds and peak memory) for the performance notes.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
