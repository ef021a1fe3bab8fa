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
pub mod train_base;

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
    /// Fine-tune StableSR on a folder of face photos into the paper's Base Model.
    TrainBase(Box<train_base::TrainBaseArgs>),
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
        Command::TrainBase(args) => train_base::run(*args),
    }
}

/// The one line printed for a failed command: the error and its causes joined by `: `, a cause
/// left out when the message before it already says it (no "X: X"), control characters from
/// file names or metadata escaped, and line breaks folded.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    let folded: Vec<&str> = line
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    crate::fsutil::printable(&folded.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_are_single_escaped_and_not_doubled() {
        let inner = anyhow::anyhow!("a.png: cannot read");
        let err = inner.context("a.png: cannot read");
        assert_eq!(error_line(&err), "a.png: cannot read");
        let err = anyhow::anyhow!("bad\nname\u{1b}[2J").context("loading");
        assert_eq!(error_line(&err), "loading: bad name\\u{1b}[2J");
    }
}
