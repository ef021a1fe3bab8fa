//! Replays the recorded tiled ("canvas") run of `diffusion/canvas.safetensors` without a network.

mod common;

use candle_core::{DType, Device, Tensor};
use pfstorer::config::BaseModelConfig;
use pfstorer::diffusion::canvas::{gaussian_weights, tile_offsets, CanvasSampler, Tiling};
use pfstorer::diffusion::noise::RecordedNoise;
use pfstorer::diffusion::sampler::{Branches, DdpmSampler, SampleOptions};
use std::collections::HashMap;

const FILE: &str = "diffusion/canvas.safetensors";

fn metadata() -> HashMap<String, String> {
    let bytes = std::fs::read(common::fixture(FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

fn meta_f64(meta: &HashMap<String, String>, key: &str) -> f64 {
    meta.get(key)
        .unwrap_or_else(|| panic!("{FILE}: metadata `{key}` missing"))
        .parse()
        .unwrap()
}

fn ints(fx: &HashMap<String, Tensor>, key: &str) -> Vec<usize> {
    common::get(fx, key)
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn recorded_offsets(fx: &HashMap<String, Tensor>) -> Vec<(usize, usize)> {
    ints(fx, "tile_offsets_yx")
        .chunks(2)
        .map(|p| (p[0], p[1]))
        .collect()
}

#[test]
fn tile_weights_match_reference() {
    let fx = common::load(FILE);
    let reference = common::get(&fx, "tile_weights_f64");
    let (_, c, t, _) = reference.dims4().unwrap();
    assert_eq!(t, meta_f64(&metadata(), "tile") as usize);
    let ours = Tensor::from_vec(gaussian_weights(t), (1, 1, t, t), &Device::Cpu)
        .unwrap()
        .repeat((1, c, 1, 1))
        .unwrap();
    common::assert_close("tile_weights_f64", &ours, reference, 1e-12, 1e-10);
}

#[test]
fn tile_offsets_match_reference() {
    let fx = common::load(FILE);
    let meta = metadata();
    let (_, _, h, w) = common::get(&fx, "init_latent").dims4().unwrap();
    let tile = meta_f64(&meta, "tile") as usize;
    let overlap = meta_f64(&meta, "overlap") as usize;
    let ours = tile_offsets(h, w, tile, overlap).unwrap();
    assert_eq!(ours, recorded_offsets(&fx));
    assert_eq!(ours.len(), meta_f64(&meta, "n_tiles") as usize);
}

#[test]
fn canvas_replays_reference_run() {
    let fx = common::load(FILE);
    let meta = metadata();
    let guidance = meta_f64(&meta, "guidance");
    let steps = meta_f64(&meta, "steps") as usize;
    let tiling = Tiling {
        tile_size: meta_f64(&meta, "tile") as usize,
        tile_overlap: meta_f64(&meta, "overlap") as usize,
        tiles_per_batch: 1,
    };
    let offsets = recorded_offsets(&fx);

    let cfg = BaseModelConfig::default().diffusion;
    let sampler = DdpmSampler::new(&cfg, steps).unwrap();
    let map: Vec<usize> = ints(&fx, "timestep_map");
    assert_eq!(sampler.respaced().timestep_map, map, "timestep_map");
    let canvas = CanvasSampler::new(&sampler, tiling).unwrap();

    let mut keys: Vec<&String> = fx.keys().filter(|k| k.starts_with("noise.")).collect();
    keys.sort();
    assert_eq!(keys.len(), meta_f64(&meta, "n_noise_draws") as usize);
    // Draw #0 made the LQ latent (VAE sampling); the sampler consumes the rest.
    let mut noise = RecordedNoise::new(keys[1..].iter().map(|k| fx[*k].clone()).collect());
    let init_latent = common::get(&fx, "init_latent").clone();

    let x_t = sampler.start_latent(&init_latent, &mut noise).unwrap();
    common::assert_module_close("x_T", &x_t, common::get(&fx, "x_T"));

    let mut calls = 0usize;
    let mut worst_in = 0f64;
    let mut denoiser =
        |x: &Tensor, lq: &Tensor, t_orig: usize, branches: Branches| -> pfstorer::Result<Tensor> {
            let (step, tile) = (calls / offsets.len(), calls % offsets.len());
            calls += 1;
            let prefix = format!("step{step}.tile{tile}");
            assert_eq!(branches, Branches::for_guidance(Some(guidance)));
            assert_eq!(
                t_orig,
                ints(&fx, &format!("step{step}.t_orig"))[0],
                "{prefix}: t_orig"
            );
            let (y, xo) = offsets[tile];
            let lq_ref =
                init_latent
                    .narrow(2, y, tiling.tile_size)?
                    .narrow(3, xo, tiling.tile_size)?;
            common::assert_close(&format!("{prefix}.lq_tile"), lq, &lq_ref, 0.0, 0.0);
            let key = format!("{prefix}.unet_in_x");
            worst_in = worst_in.max(common::assert_module_close(&key, x, common::get(&fx, &key)));
            Ok(common::get(&fx, &format!("{prefix}.unet_out")).clone())
        };
    let opts = SampleOptions {
        guidance_scale: Some(guidance),
        record_steps: true,
    };
    let out = canvas
        .sample_from(
            x_t,
            &mut denoiser,
            &init_latent,
            &mut noise,
            &opts,
            &mut |_| {},
        )
        .unwrap();
    println!("tile inputs: max abs error {worst_in:.3e}");

    assert_eq!(calls, steps * offsets.len());
    assert_eq!(noise.remaining(), 0, "every recorded draw must be consumed");
    assert_eq!(out.steps.len(), steps);
    for (k, rec) in out.steps.iter().enumerate() {
        assert_eq!(rec.index, ints(&fx, &format!("step{k}.t_index"))[0]);
        for (name, t) in [("x0", &rec.x0), ("x_out", &rec.x_out)] {
            let key = format!("step{k}.{name}");
            common::assert_module_close(&key, t, common::get(&fx, &key));
        }
    }
    common::assert_close(
        "samples",
        &out.latent,
        common::get(&fx, "samples"),
        1e-3,
        1e-2,
    );
}

#[test]
fn grouped_tiles_give_the_same_blend() {
    // Several tiles per network call must not change the result when the network is
    // batch-independent (here: a fixed elementwise function of x and the LQ tile).
    let fx = common::load(FILE);
    let meta = metadata();
    let init_latent = common::get(&fx, "init_latent").clone();
    let cfg = BaseModelConfig::default().diffusion;
    let sampler = DdpmSampler::new(&cfg, 2).unwrap();
    let run = |tiles_per_batch: usize| {
        let tiling = Tiling {
            tile_size: meta_f64(&meta, "tile") as usize,
            tile_overlap: meta_f64(&meta, "overlap") as usize,
            tiles_per_batch,
        };
        let canvas = CanvasSampler::new(&sampler, tiling).unwrap();
        let mut noise = pfstorer::diffusion::noise::SeededNoise::new(3);
        let mut denoiser =
            |x: &Tensor, lq: &Tensor, t: usize, branches: Branches| -> pfstorer::Result<Tensor> {
                let lq = match branches {
                    Branches::Cond => lq.clone(),
                    Branches::UncondCond => Tensor::cat(&[lq, &lq.affine(0.5, 0.0)?], 0)?,
                };
                Ok((x.affine(0.1, 0.0)? + lq.affine(t as f64 * 1e-3, 0.0)?)?.tanh()?)
            };
        let opts = SampleOptions {
            guidance_scale: Some(3.0),
            record_steps: false,
        };
        canvas
            .sample(&mut denoiser, &init_latent, &mut noise, &opts, &mut |_| {})
            .unwrap()
            .latent
    };
    let one = run(1);
    let many = run(3);
    common::assert_close("grouped vs single tiles", &many, &one, 1e-6, 1e-6);
}
