//! Gradients through the frozen base (what personalization training relies on): the gradient of
//! `L = sum(unet_out * R)` w.r.t. the UNet input, the text context and the LQ latent (through
//! the time-aware encoder) against the reference autograd values in `stablesr/grad.safetensors`.

mod common;

use candle_core::{DType, Device, Var};
use pfstorer::config::BaseModelConfig;
use pfstorer::kernels::DifferentiableScope;
use pfstorer::model::lq_encoder::LqEncoder;
use pfstorer::model::unet::{UNet, UNetInputs};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::sync::Arc;

#[test]
fn unet_gradients_match_reference_autograd() {
    let _training = DifferentiableScope::enter(true);
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let store = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let w = CheckedWeights::from_store(Arc::new(store));
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model")).unwrap();
    let enc = LqEncoder::new(&cfg.lq_encoder, vb.pp("structcond_stage_model")).unwrap();

    let g = common::load("stablesr/grad.safetensors");
    let x = Var::from_tensor(common::get(&g, "unet.in.x")).unwrap();
    let context = Var::from_tensor(common::get(&g, "unet.in.context")).unwrap();
    let lq = Var::from_tensor(common::get(&g, "unet.in.lq_latent")).unwrap();
    let t = common::get(&g, "unet.in.t");

    let struct_cond = enc
        .forward(lq.as_tensor(), &t.narrow(0, 0, 1).unwrap())
        .unwrap();
    let inputs = UNetInputs {
        timesteps: t,
        context: context.as_tensor(),
        struct_cond: Some(&struct_cond),
    };
    let out = unet.forward(x.as_tensor(), &inputs).unwrap();
    common::assert_module_close("unet.out", &out, common::get(&g, "unet.out"));
    let loss = (out * common::get(&g, "unet.weight.R"))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in [("x", &x), ("context", &context), ("lq_latent", &lq)] {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        common::assert_gradient_close(
            &format!("unet.grad.{name}"),
            grad,
            common::get(&g, &format!("unet.grad.{name}")),
        );
    }
}
