//! Which tensors base training updates, and a `VarBuilder` backend that hands them to the
//! networks as variables while every other tensor stays a constant.

use crate::model::base::{LQ_ENCODER_PREFIX, UNET_PREFIX};
use crate::weights::CheckedWeights;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Whether base training updates the checkpoint tensor `name`: StableSR's face config
/// (`unfrozen_diff: False`) trains the time-aware encoder and the UNet's SFT (SPADE) layers.
pub fn is_trainable(name: &str) -> bool {
    if name.starts_with(&format!("{LQ_ENCODER_PREFIX}.")) {
        return true;
    }
    name.strip_prefix(&format!("{UNET_PREFIX}."))
        .is_some_and(|rest| rest.contains("spade"))
}

/// A [`CheckedWeights`] wrapper: trainable tensors become [`Var`]s (recorded by name), the rest
/// are served unchanged.
#[derive(Clone)]
pub struct TrainableWeights {
    inner: CheckedWeights,
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl TrainableWeights {
    pub fn new(inner: CheckedWeights) -> Self {
        TrainableWeights {
            inner,
            vars: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn checked(&self) -> &CheckedWeights {
        &self.inner
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The variables made so far, sorted by checkpoint name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let vars = self.vars.lock().unwrap_or_else(|p| p.into_inner());
        vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl SimpleBackend for TrainableWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get(shape, name, init, dtype, dev)?;
        if !is_trainable(name) {
            return Ok(tensor);
        }
        let mut vars = self.vars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(var) = vars.get(name) {
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&tensor.contiguous()?)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_set_is_the_encoder_and_the_sft_layers() {
        for name in [
            "structcond_stage_model.input_blocks.0.0.weight",
            "structcond_stage_model.time_embed.0.bias",
            "model.diffusion_model.input_blocks.1.0.spade.mlp_beta.weight",
            "model.diffusion_model.output_blocks.3.0.spade.param_free_norm.bias",
        ] {
            assert!(is_trainable(name), "{name}");
        }
        for name in [
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            "first_stage_model.encoder.conv_in.weight",
            "cond_stage_model.model.token_embedding.weight",
            "model_ema.diffusion_modelinput_blocks10spademlp_betaweight",
            "spade.weight",
            "betas",
        ] {
            assert!(!is_trainable(name), "{name}");
        }
    }
}
