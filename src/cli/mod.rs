//! Subcommands of the `pfstorer` binary, one file each. `anyhow` lives here, at the edge.

pub mod batch;
pub mod bench;
pub mod convert;
pub mod degrade;
pub mod eval;
pub mod face_args;
pub mod faces;
pub mod ids;
pub mod model_args;
pub mod personalize;
pub mod report;
pub mod restore;
pub mod shard;
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
    /// List the faces found in photos (numbered as `restore --face` takes them), or draw them.
    Faces(faces::FacesArgs),
    /// Learn an identity from 3-20 reference photos of one person.
    Personalize(personalize::PersonalizeArgs),
    /// List, show or remove stored identities.
    Ids(ids::IdsArgs),
    /// Fine-tune StableSR on a folder of face photos into the paper's Base Model.
    TrainBase(Box<train_base::TrainBaseArgs>),
    /// Summarize `restore --report` files: totals, time, faces, failures.
    Report(report::ReportArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Restore(args) => restore::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Degrade(args) => degrade::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Faces(args) => faces::run(args),
        Command::Personalize(args) => personalize::run(args),
        Command::Ids(args) => ids::run(args),
        Command::TrainBase(args) => train_base::run(*args),
        Command::Report(args) => report::run(args),
    }
}

/// A flag or argument that no input can satisfy: reported before any input is read or any
/// folder created, and the process exits with status 2 (as clap does for its own usage errors).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Marks `err` as a usage error (exit status 2).
pub fn usage(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(UsageError(error_line(&err.into())))
}

/// The exit status of a failed command: 2 for usage errors, 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        2
    } else {
        1
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

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pfstorer").chain(args.iter().copied()))
    }

    /// One grammar: every command that writes takes `-o/--output` and `-q/--quiet`, and the
    /// older spellings (`--out`, `--out-dir`) still parse.
    #[test]
    fn every_writing_command_takes_output_and_quiet() {
        let cases: &[&[&str]] = &[
            &["restore", "a.png"],
            &["degrade", "a.png", "--preset", "light"],
            &["eval", "--restored", "r", "--gt", "g"],
            &["personalize", "--refs", "refs/", "--id", "bob"],
            &["train-base", "--data", "d/"],
        ];
        for case in cases {
            for (o, q) in [("-o", "-q"), ("--output", "--quiet")] {
                let mut args = case.to_vec();
                args.extend([o, "out.x", q]);
                if let Err(e) = parse(&args) {
                    panic!("{args:?}: {e}");
                }
            }
        }
        for (case, old) in [
            (&["personalize", "--refs", "r", "--id", "b"][..], "--out"),
            (&["train-base", "--data", "d/"][..], "--out"),
            (&["degrade", "a.png", "--preset", "light"][..], "--out-dir"),
        ] {
            let mut args = case.to_vec();
            args.extend([old, "x"]);
            assert!(parse(&args).is_ok(), "{args:?}");
        }
    }

    /// The short flags GFPGAN/CodeFormer users type: `-s`, `-i`, `--ext`.
    #[test]
    fn gfpgan_spellings_parse() {
        let cli = parse(&["restore", "-i", "in/", "-s", "2", "--ext", "jpg"]).unwrap();
        let Command::Restore(args) = cli.command else {
            panic!("not restore")
        };
        assert_eq!(args.scale, 2.0);
        assert_eq!(args.input_flag, vec![std::path::PathBuf::from("in/")]);
        assert!(args.inputs.is_empty());
        assert_eq!(args.ext.as_deref(), Some("jpg"));
        // No input at all is still a usage error.
        assert!(parse(&["restore", "-s", "2"]).is_err());
    }

    #[test]
    fn personalize_checkpoints_by_default() {
        let cli = parse(&["personalize", "--refs", "r/", "--id", "bob"]).unwrap();
        let Command::Personalize(args) = cli.command else {
            panic!("not personalize")
        };
        assert!(args.checkpoint_every > 0 && args.checkpoint_every <= args.steps);
    }

    #[test]
    fn usage_errors_exit_with_two() {
        let err = usage(anyhow::anyhow!("--scale 0: must be positive"));
        assert_eq!(exit_code(&err), 2);
        assert_eq!(error_line(&err), "--scale 0: must be positive");
        assert_eq!(exit_code(&anyhow::anyhow!("a.png: corrupt")), 1);
    }

    #[test]
    fn error_lines_are_single_escaped_and_not_doubled() {
        let inner = anyhow::anyhow!("a.png: cannot read");
        let err = inner.context("a.png: cannot read");
        assert_eq!(error_line(&err), "a.png: cannot read");
        let err = anyhow::anyhow!("bad\nname\u{1b}[2J").context("loading");
        assert_eq!(error_line(&err), "loading: bad name\\u{1b}[2J");
    }
}
