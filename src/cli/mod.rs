//! Subcommands of the `pfstorer` binary, one file each. `anyhow` lives here, at the edge.

pub mod batch;
pub mod bench;
pub mod convert;
pub mod degrade;
pub mod eval;
pub mod ids;
pub mod model_args;
pub mod personalize;
pub mod restore;

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
    /// Restore degraded face photos (files, folders or globs) with the diffusion model.
    Restore(Box<restore::RestoreArgs>),
    /// Convert a PyTorch-Lightning .ckpt into a safetensors file (memory-mapped on later loads).
    Convert(convert::ConvertArgs),
    /// Degrade images with the light or heavy synthetic pipeline (for tests and evaluation).
    Degrade(degrade::DegradeArgs),
    /// PSNR/SSIM of restored images against ground truth, per image and mean.
    Eval(eval::EvalArgs),
    /// Time the networks (seconds and peak memory) for the performance notes.
    Bench(bench::BenchArgs),
    /// Learn an identity from 3-20 reference photos of one person.
    Personalize(personalize::PersonalizeArgs),
    /// List, show or remove stored identities.
    Ids(ids::IdsArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Restore(args) => restore::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Degrade(args) => degrade::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Personalize(args) => personalize::run(args),
        Command::Ids(args) => ids::run(args),
    }
}
