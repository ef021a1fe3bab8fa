//! `pfstorer convert IN.ckpt OUT.safetensors [--dtype f32|f16|bf16]`.

use super::model_args::Precision;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input checkpoint (PyTorch-Lightning .ckpt or safetensors).
    pub input: PathBuf,
    /// Output safetensors file.
    pub output: PathBuf,
    /// Precision of the floating-point tensors written.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let dtype = args.dtype.into();
    let report =
        crate::weights::convert::convert_checkpoint(&args.input, &args.output, dtype, args.force)?;
    println!(
        "wrote {} ({} tensors, {:.1} MB)",
        args.output.display(),
        report.tensors,
        report.bytes as f64 / 1e6
    );
    Ok(())
}
