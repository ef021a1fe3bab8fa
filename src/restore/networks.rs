//! Where a [`Restorer`](super::Restorer)'s networks come from, stage by stage.
//!
//! A restoration runs three stages per image, each on other networks: the VAE encoder (LQ image
//! to latent), the UNet with the time-aware encoder (sampling), and the CFW autoencoder (decode).
//! [`Networks::Resident`] keeps all of them loaded for a whole batch; [`Networks::Staged`] loads
//! each stage's networks when the stage starts and frees them when it ends, so a 512x512 f32
//! restore holds the UNet's ~3.9 GB or the CFW's activations, never both. Reloading costs a few
//! seconds per image, against the tens of minutes a CPU restore takes.

use crate::config::{BaseModelConfig, CfwConfig};
use crate::error::{Error, Result};
use crate::model::base::{
    BaseModel, CfwModel, Residency, UnusedSummary, LQ_ENCODER_PREFIX, UNET_PREFIX,
};
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::{DType, Device};
use std::ops::Deref;
use std::sync::Arc;

/// Whether the networks stay loaded for a batch (`--residency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResidencyPolicy {
    /// Staged on the CPU (where host memory is what runs out and a restore takes minutes),
    /// resident on a GPU (where reloading would be a large part of a restore's seconds).
    Auto,
    /// Each stage loads its networks and frees them after (lowest peak memory).
    Staged,
    /// Every network loaded once for the whole batch.
    Resident,
}

impl ResidencyPolicy {
    /// Whether `device` runs this policy staged.
    pub fn is_staged(self, device: &Device) -> bool {
        match self {
            ResidencyPolicy::Auto => device.is_cpu(),
            ResidencyPolicy::Staged => true,
            ResidencyPolicy::Resident => false,
        }
    }
}

/// A network borrowed from a resident model, or loaded for one stage and freed with this value.
pub enum Held<'a, T> {
    Borrowed(&'a T),
    Loaded(T),
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Loaded(t) => t,
        }
    }
}

/// Where a checkpoint's tensors come from when a stage loads them.
#[derive(Clone)]
pub enum WeightSource {
    /// An opened checkpoint file (its index read once; tensors read at each load).
    File(Arc<TensorStore>),
    /// Seeded random weights of the configured architecture (benchmarks).
    Random(u64),
}

impl WeightSource {
    /// The checkpoint at `path`, its index read now.
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Ok(WeightSource::File(Arc::new(TensorStore::open(path)?)))
    }

    fn weights(&self) -> CheckedWeights {
        match self {
            WeightSource::File(store) => CheckedWeights::from_store(store.clone()),
            WeightSource::Random(seed) => CheckedWeights::new(Source::Random(*seed)),
        }
    }

    /// A candle error while building from this source, named after its file.
    fn name_errors(&self, e: Error) -> Error {
        match (self, e) {
            (WeightSource::File(store), Error::Candle(c)) => {
                Error::Weights(format!("{}: {}", store.path().display(), c))
            }
            (_, other) => other,
        }
    }

    /// The diffusion model holding the networks `residency` names (the rest checked only).
    pub fn load_base(
        &self,
        config: BaseModelConfig,
        dtype: DType,
        device: &Device,
        residency: Residency,
    ) -> Result<(BaseModel, UnusedSummary)> {
        BaseModel::from_weights_with(config, &self.weights(), dtype, device, residency)
            .map_err(|e| self.name_errors(e))
    }

    /// The CFW autoencoder.
    pub fn load_cfw(
        &self,
        config: CfwConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(CfwModel, UnusedSummary)> {
        CfwModel::from_weights(config, &self.weights(), dtype, device)
            .map_err(|e| self.name_errors(e))
    }

    /// Checks this source against the CFW architecture without reading a weight.
    pub fn check_cfw(&self, config: CfwConfig) -> Result<UnusedSummary> {
        CfwModel::check(config, &self.weights()).map_err(|e| self.name_errors(e))
    }
}

/// What a staged restore loads from, and how.
pub struct StagedNetworks {
    pub base: WeightSource,
    pub base_config: BaseModelConfig,
    pub cfw: WeightSource,
    pub cfw_config: CfwConfig,
    /// Precision of the diffusion networks.
    pub dtype: DType,
    /// Precision of the CFW autoencoder.
    pub cfw_dtype: DType,
    pub device: Device,
}

impl StagedNetworks {
    fn load_base(&self, residency: Residency) -> Result<BaseModel> {
        let config = self.base_config.clone();
        Ok(self
            .base
            .load_base(config, self.dtype, &self.device, residency)?
            .0)
    }

    fn load_cfw(&self) -> Result<CfwModel> {
        let config = self.cfw_config.clone();
        Ok(self.cfw.load_cfw(config, self.cfw_dtype, &self.device)?.0)
    }

    /// Bytes of the sampling networks' weights (UNet and time-aware encoder) at `self.dtype`:
    /// what the sampling stage will take from the device once loaded.
    pub fn sampling_weight_bytes(&self) -> usize {
        // Every tensor name with its shape: the file's index, or what the architecture asks for.
        let shapes: Vec<(String, Vec<usize>)> = match &self.base {
            WeightSource::File(store) => store
                .shapes()
                .iter()
                .map(|(name, (shape, _))| (name.clone(), shape.clone()))
                .collect(),
            WeightSource::Random(_) => {
                let probe = CheckedWeights::shapes_only();
                let built = BaseModel::from_weights_with(
                    self.base_config.clone(),
                    &probe,
                    self.dtype,
                    &self.device,
                    Residency::SamplingOnly,
                );
                if built.is_err() {
                    return 0;
                }
                probe.requested().into_iter().collect()
            }
        };
        let prefixes = [format!("{UNET_PREFIX}."), format!("{LQ_ENCODER_PREFIX}.")];
        let elements: usize = shapes
            .iter()
            .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        elements * self.dtype.size_in_bytes()
    }
}

/// The networks of a restorer.
// One per restorer; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Networks<'a> {
    /// Loaded once by the caller for the whole batch.
    Resident {
        base: &'a BaseModel,
        cfw: &'a CfwModel,
    },
    /// Loaded at the start of each stage and freed at its end.
    Staged(StagedNetworks),
}

impl Networks<'_> {
    /// A model holding the VAE encoder.
    pub fn vae_encoder(&self) -> Result<Held<'_, BaseModel>> {
        match self {
            Networks::Resident { base, .. } => Ok(Held::Borrowed(base)),
            Networks::Staged(s) => Ok(Held::Loaded(s.load_base(Residency::VaeEncoderOnly)?)),
        }
    }

    /// A model holding the UNet and the time-aware encoder.
    pub fn sampling(&self) -> Result<Held<'_, BaseModel>> {
        match self {
            Networks::Resident { base, .. } => Ok(Held::Borrowed(base)),
            Networks::Staged(s) => Ok(Held::Loaded(s.load_base(Residency::SamplingOnly)?)),
        }
    }

    /// The CFW autoencoder.
    pub fn cfw(&self) -> Result<Held<'_, CfwModel>> {
        match self {
            Networks::Resident { cfw, .. } => Ok(Held::Borrowed(cfw)),
            Networks::Staged(s) => Ok(Held::Loaded(s.load_cfw()?)),
        }
    }
}
