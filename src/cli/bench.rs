//! `pfstorer bench` arguments: which benchmark runs; the benchmarks themselves live in
//! [`crate::bench`] (never part of a restore or a test).

use crate::bench;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Time-aware encoder + UNet forward with the CFG batch of 2.
    Unet(bench::unet::UnetBench),
    /// Write seeded random full-size checkpoints (diffusion model and CFW autoencoder).
    Weights(bench::weights::WeightsBench),
    /// One whole restore of a square synthetic image (encode, sampling loop, CFW decode).
    Restore(bench::restore::RestoreBench),
    /// VAE encode of an image, CFW encoder features and CFW fused decode, each over several runs.
    Codec(bench::codec::CodecBench),
    /// Personalization training iterations on synthetic references.
    Train(bench::train::TrainBench),
    /// Base-model training steps (train-base) on synthetic faces.
    TrainBase(bench::train::TrainBaseBench),
    /// Face detection of a photo and dlib-ID embedding of chips (CPU).
    Faces(bench::faces::FacesBench),
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Unet(b) => bench::unet::run(b),
        BenchWhat::Weights(b) => bench::weights::run(b),
        BenchWhat::Restore(b) => bench::restore::run(b),
        BenchWhat::Codec(b) => bench::codec::run(b),
        BenchWhat::Train(b) => bench::train::run_personalize(b),
        BenchWhat::TrainBase(b) => bench::train::run_base(b),
        BenchWhat::Faces(b) => bench::faces::run(b),
    }
}
