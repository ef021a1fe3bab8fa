//! The restoration pipeline with the real tiny networks against whole reference runs:
//! - the face script's CFG DDPM run (`diffusion/sampler.safetensors`): CFW-encoded LQ latent,
//!   every step through the real time-aware encoder and UNet, CFW decode;
//! - the tile script's canvas run (`diffusion/canvas.safetensors`): bicubic upscaling, reflect
//!   padding to a multiple of 32 (when the upscaled size needs it), VAE encoding, tiled sampling,
//!   CFW decode, the colour fixes and the crop back, through `Restorer::restore_upscaled`, the
//!   path `pfstorer restore` takes.
//!
//! Random draws are replayed from the recordings. Trajectory tolerance 1e-3 + 1e-2*|ref|.

mod common;

use candle_core::{DType, Device, Tensor};
use pfstorer::config::{BaseModelConfig, CfwConfig};
use pfstorer::diffusion::noise::{NoiseSource, RecordedNoise};
use pfstorer::diffusion::sampler::{DdpmSampler, SampleOptions};
use pfstorer::imaging::colorfix::ColorFix;
use pfstorer::model::base::{BaseModel, CfwModel};
use pfstorer::restore::{resize_bicubic_nchw, ModelDenoiser, RestoreSettings, Restorer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

fn models() -> (BaseModel, CfwModel) {
    models_on(DType::F32, &Device::Cpu)
}

fn models_on(dtype: DType, device: &Device) -> (BaseModel, CfwModel) {
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let (base, _) = BaseModel::load(
        &common::fixture("stablesr/model.safetensors"),
        cfg,
        dtype,
        device,
    )
    .unwrap();
    let cfw_cfg = CfwConfig::from_yaml_file(&common::fixture("stablesr/cfw.yaml")).unwrap();
    let (cfw, _) = CfwModel::load(
        &common::fixture("stablesr/cfw.safetensors"),
        cfw_cfg,
        dtype,
        device,
    )
    .unwrap();
    (base, cfw)
}

/// The recorded draws behind a handle the restorer can own while the test keeps watching them.
#[derive(Clone)]
struct SharedNoise(Rc<RefCell<RecordedNoise>>);

impl NoiseSource for SharedNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> pfstorer::error::Result<Tensor> {
        self.0.borrow_mut().next(shape, device)
    }
}

fn noise_draws(f: &HashMap<String, Tensor>) -> Vec<Tensor> {
    let mut names: Vec<&String> = f.keys().filter(|k| k.starts_with("noise.")).collect();
    names.sort();
    names.into_iter().map(|k| f[k].clone()).collect()
}

fn meta(rel: &str) -> HashMap<String, String> {
    let bytes = std::fs::read(common::fixture(rel)).unwrap();
    let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    st.metadata().clone().unwrap_or_default()
}

/// f32: 1e-3 + 1e-2·|ref|; half precision: twice the per-module bound of
/// `common::module_tolerance` (errors compound over the steps).
fn trajectory_close(name: &str, a: &Tensor, b: &Tensor) -> f64 {
    if common::test_dtype() == DType::F32 {
        common::assert_close(name, a, b, 1e-3, 1e-2)
    } else {
        let (atol, rtol) = common::module_tolerance(b);
        common::assert_close(name, a, b, 2.0 * atol, 2.0 * rtol)
    }
}

#[test]
fn face_script_cfg_run_with_the_real_networks() {
    // Device and precision from PFSTORER_TEST_DEVICE / PFSTORER_TEST_DTYPE (default CPU f32).
    let (dtype, device) = (common::test_dtype(), common::test_device());
    let (base, cfw) = models_on(dtype, &device);
    let f = common::load("diffusion/sampler.safetensors");
    let m = meta("diffusion/sampler.safetensors");
    let steps: usize = m["steps"].parse().unwrap();
    let guidance: f64 = m["guidance"].parse().unwrap();
    let dec_w: f64 = m["dec_w"].parse().unwrap();
    let scale = base.config.diffusion.scale_factor;

    let lq = common::input(&f, "in.lq_image");
    let (posterior, features) = cfw.autoencoder.encode_with_features(&lq).unwrap();
    for (i, feat) in features.iter().enumerate() {
        common::assert_module_close(
            &format!("enc_fea_lq.{i}"),
            feat,
            common::get(&f, &format!("enc_fea_lq.{i}")),
        );
    }
    let mut draws = noise_draws(&f);
    let first = draws.remove(0);
    let first = first.to_dtype(dtype).unwrap().to_device(&device).unwrap();
    let init_latent = (posterior
        .sample(&first)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * scale)
        .unwrap();
    common::assert_module_close("init_latent", &init_latent, common::get(&f, "init_latent"));

    let sampler = DdpmSampler::new(&base.config.diffusion, steps).unwrap();
    let mut denoiser = ModelDenoiser {
        model: &base,
        cond: common::input(&f, "in.cond"),
        uncond: common::input(&f, "in.uncond"),
    };
    let mut noise = RecordedNoise::new(draws);
    let opts = SampleOptions {
        guidance_scale: Some(guidance),
        record_steps: true,
    };
    let out = sampler
        .sample(&mut denoiser, &init_latent, &mut noise, &opts, &mut |_| {})
        .unwrap();
    assert_eq!(noise.remaining(), 0, "every recorded draw consumed");
    for (k, step) in out.steps.iter().enumerate() {
        trajectory_close(
            &format!("step{k}.x0"),
            &step.x0,
            common::get(&f, &format!("step{k}.x0")),
        );
        trajectory_close(
            &format!("step{k}.x_out"),
            &step.x_out,
            common::get(&f, &format!("step{k}.x_out")),
        );
    }
    trajectory_close("samples", &out.latent, common::get(&f, "samples"));
    let decoded = cfw
        .autoencoder
        .decode_fused(
            &(out.latent / scale).unwrap().to_dtype(dtype).unwrap(),
            &features,
            dec_w,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    trajectory_close("decoded", &decoded, common::get(&f, "decoded"));
    let final01 = ((decoded + 1.0).unwrap() / 2.0)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    trajectory_close("final_01", &final01, common::get(&f, "final_01"));
}

#[test]
fn text_contexts_of_the_fixture_come_from_the_tiny_text_encoder() {
    let (base, _) = models();
    let f = common::load("diffusion/sampler.safetensors");
    let io = common::load("stablesr/io.safetensors");
    let tokens = common::get(&io, "text.tokens")
        .to_dtype(DType::U32)
        .unwrap();
    let ctx = base
        .text_encoder()
        .unwrap()
        .forward(&tokens.narrow(0, 0, 2).unwrap())
        .unwrap();
    common::assert_module_close(
        "in.cond",
        &ctx.narrow(0, 0, 1).unwrap(),
        common::get(&f, "in.cond"),
    );
    common::assert_module_close(
        "in.uncond",
        &ctx.narrow(0, 1, 1).unwrap(),
        common::get(&f, "in.uncond"),
    );
}

#[test]
fn released_text_encoder_is_a_clear_error_and_contexts_survive_it() {
    let (mut base, _) = models();
    let cond = Restorer::text_context(&base, "a photo").unwrap();
    base.release_text_encoder();
    let err = Restorer::text_context(&base, "a photo")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("released after the prompts were encoded"),
        "{err}"
    );
    // The contexts computed before stay usable (they own their storage).
    assert_eq!(cond.dims()[0], 1);
    assert!(cond
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn tile_script_canvas_run_through_the_restorer() {
    let (base, cfw) = models();
    let f = common::load("diffusion/canvas.safetensors");
    let m = meta("diffusion/canvas.safetensors");
    let steps: usize = m["steps"].parse().unwrap();
    let tile: usize = m["tile"].parse().unwrap();
    let overlap: usize = m["overlap"].parse().unwrap();
    let upscale: f64 = m["upsample_scale"].parse().unwrap();

    let small = common::get(&f, "in.lq_small");
    let (_, _, h, w) = small.dims4().unwrap();
    let lq = resize_bicubic_nchw(
        small,
        (h as f64 * upscale) as usize,
        (w as f64 * upscale) as usize,
    )
    .unwrap()
    .clamp(-1f32, 1f32)
    .unwrap();
    common::assert_module_close("in.lq_up", &lq, common::get(&f, "in.lq_up"));
    let (_, _, h_up, w_up) = lq.dims4().unwrap();
    // Whether this fixture exercises the padding: the script pads when a side is not a multiple
    // of 32, and then the recorded latents are at the padded size.
    let needs_pad = h_up % 32 != 0 || w_up % 32 != 0;
    if let Some(flag) = m.get("flag_pad") {
        assert_eq!(
            flag == "True",
            needs_pad,
            "fixture flag_pad vs the upscaled size"
        );
    }
    let factor = base.config.vae.downsample_factor();
    let (_, _, lat_h, lat_w) = common::get(&f, "init_latent").dims4().unwrap();
    assert_eq!(
        (lat_h * factor, lat_w * factor),
        (h_up.div_ceil(32) * 32, w_up.div_ceil(32) * 32),
        "the reference encodes the image padded to a multiple of 32"
    );

    for (fix, expected_u8) in [
        (ColorFix::None, "final.nofix_u8"),
        (ColorFix::Adain, "final.adain_u8"),
        (ColorFix::Wavelet, "final.wavelet_u8"),
    ] {
        let settings = RestoreSettings {
            steps,
            guidance: m["guidance"].parse().unwrap(),
            dec_w: m["dec_w"].parse().unwrap(),
            color_fix: fix,
            tile_overlap: Some(overlap),
            native_size: Some(tile * base.config.vae.downsample_factor()),
            ..RestoreSettings::default()
        };
        let restorer = Restorer::new(
            &base,
            &cfw,
            settings,
            common::get(&f, "in.cond").clone(),
            common::get(&f, "in.uncond").clone(),
        )
        .unwrap();
        // One recorded sequence for the one piece; a second piece would find it used up.
        let recorded = SharedNoise(Rc::new(RefCell::new(RecordedNoise::new(noise_draws(&f)))));
        let mut calls = 0;
        let mut new_noise = || -> Box<dyn NoiseSource> {
            calls += 1;
            Box::new(recorded.clone())
        };
        let out = restorer
            .restore_upscaled(&lq, &mut new_noise, &mut |_, _| {})
            .unwrap();
        assert_eq!(calls, 1, "one piece, one random sequence");
        assert_eq!(
            recorded.0.borrow().remaining(),
            0,
            "every recorded draw consumed"
        );
        let (_, _, out_h, out_w) = out.dims4().unwrap();
        assert_eq!(
            (out_h, out_w),
            (h_up, w_up),
            "cropped back to the upscaled size"
        );
        if fix == ColorFix::None {
            // `decoded` is at the padded size; the crop is what the script keeps.
            let decoded = common::get(&f, "decoded")
                .narrow(2, 0, h_up)
                .unwrap()
                .narrow(3, 0, w_up)
                .unwrap();
            trajectory_close("decoded", &out, &decoded);
        }
        // The script saves truncated uint8 of clamp((x+1)/2): allow one level.
        let ours = (((out + 1.0).unwrap() / 2.0)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap()
            * 255.0)
            .unwrap()
            .floor()
            .unwrap()
            .squeeze(0)
            .unwrap()
            .permute((1, 2, 0))
            .unwrap();
        let reference = common::get(&f, expected_u8)
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        common::assert_close(expected_u8, &ours, &reference, 1.0, 0.0);
    }
}

/// A smooth synthetic RGB image in [0, 1].
fn synthetic(width: usize, height: usize) -> pfstorer::imaging::ImageF32 {
    let data = (0..width * height)
        .flat_map(|i| {
            let (x, y) = ((i % width) as f32, (i / width) as f32);
            [
                0.5 + 0.4 * (x * 0.11).sin(),
                0.5 + 0.4 * (y * 0.07).cos(),
                0.3 + 0.5 * ((x + y) * 0.05).sin().abs(),
            ]
        })
        .collect();
    pfstorer::imaging::ImageF32::new(width, height, 3, data)
}

/// The tiny models at the fast native size, its latent tile and two prompt contexts.
struct FastRestore {
    base: BaseModel,
    cfw: CfwModel,
    native: usize,
    tile: usize,
    cond: Tensor,
    uncond: Tensor,
}

fn fast_restore() -> FastRestore {
    let (base, cfw) = models();
    let native = common::FAST_INPUT_SIZE;
    let tile = native / base.config.vae.downsample_factor();
    let cond = Restorer::text_context(&base, "a photo of a person").unwrap();
    let uncond = Restorer::text_context(&base, "blurry").unwrap();
    FastRestore {
        base,
        cfw,
        native,
        tile,
        cond,
        uncond,
    }
}

/// Several latent tiles per UNet call give the image of one tile at a time (the tiles are
/// independent rows of the batch, the blend adds them in the same order and the noise is drawn
/// on the whole latent either way), and the restorer makes exactly the UNet calls its work plan
/// announces, with one patch and with several.
#[test]
fn batched_tiles_match_one_at_a_time_and_the_planned_calls() {
    let FastRestore {
        base,
        cfw,
        native,
        tile,
        cond,
        uncond,
    } = fast_restore();
    let settings = |tile_batch: usize, patch_size: usize| RestoreSettings {
        steps: 2,
        native_size: Some(native),
        tile_overlap: Some(tile / 2),
        tile_batch: Some(tile_batch),
        patch_size,
        patch_stride: patch_size * 3 / 4,
        ..RestoreSettings::default()
    };
    let restorer = |tile_batch: usize, patch_size: usize| {
        Restorer::new(
            &base,
            &cfw,
            settings(tile_batch, patch_size),
            cond.clone(),
            uncond.clone(),
        )
        .unwrap()
    };
    const BATCH: usize = 3;
    let target = pfstorer::restore::TargetSize::Scale(1.0);
    // The first size (multiples of 32 px) whose canvas has more than BATCH tiles, not a
    // multiple of it, so that the last call is a partial batch.
    let probe = restorer(BATCH, 4096);
    let (w, h, tiles) = (2..12)
        .flat_map(|a| (2..12).map(move |b| (a * 32, b * 32)))
        .map(|(w, h)| (w, h, probe.work(w, h, target).unwrap().1.tiles_per_patch))
        .find(|&(_, _, t)| t > BATCH && !t.is_multiple_of(BATCH))
        .expect("a canvas size with a partial last batch");
    let image = synthetic(w, h);

    let one = restorer(1, 4096);
    let batched = restorer(BATCH, 4096);
    let mut outputs = Vec::new();
    for r in [&one, &batched] {
        let (_, work) = r.work(w, h, target).unwrap();
        assert_eq!(work.tiles_per_patch, tiles);
        let before = r.unet_calls();
        let out = r.restore(&image, target, &mut |_, _| {}).unwrap();
        assert_eq!(
            r.unet_calls() - before,
            work.unet_calls,
            "{w}x{h}: planned calls"
        );
        outputs.push(Tensor::from_vec(out.data, (out.height, out.width, 3), &Device::Cpu).unwrap());
    }
    assert_eq!(
        one.work(w, h, target).unwrap().1.unet_calls,
        2 * tiles,
        "one tile a call"
    );
    assert_eq!(
        batched.work(w, h, target).unwrap().1.unet_calls,
        2 * tiles.div_ceil(BATCH),
        "partial last batch"
    );
    // The decoder reads latent / scale_factor, so latent differences reach the image
    // multiplied by 1 / scale_factor (5.5 for the released 0.18215); the latents themselves are
    // compared at 1e-5 in `batched_tiles_give_the_same_latent_with_the_real_networks`.
    let scale = common::max_abs(&outputs[0]).max(1.0) as f64;
    let diff = common::assert_close(
        &format!("{w}x{h}, {tiles} tiles in batches of {BATCH} vs one at a time"),
        &outputs[1],
        &outputs[0],
        1e-5 * scale / base.config.diffusion.scale_factor,
        0.0,
    );
    println!("{tiles} latent tiles, batches of {BATCH}: max abs diff {diff:.3e}");

    // Several pixel patches: every patch samples its own canvas.
    let patch = (w.max(h) / 32).div_ceil(2) * 32;
    let patched = restorer(BATCH, patch.max(32));
    let (plan, work) = patched.work(w, h, target).unwrap();
    let before = patched.unet_calls();
    patched.restore(&image, target, &mut |_, _| {}).unwrap();
    assert!(plan.patches > 1, "{w}x{h} in {patch}-px patches");
    assert_eq!(
        patched.unet_calls() - before,
        work.unet_calls,
        "patched: planned calls"
    );
}

/// The canvas sampler with the real UNet and time-aware encoder: tiles in calls of 3 (a tile
/// count that 3 does not divide) give the latent of one tile per call, within 1e-5 of its
/// scale (batched matrix products may sum in another order).
#[test]
fn batched_tiles_give_the_same_latent_with_the_real_networks() {
    use pfstorer::diffusion::canvas::{tile_offsets, CanvasSampler, Tiling};
    use pfstorer::diffusion::noise::SeededNoise;
    let base = common::tiny_base();
    let tile = common::fast_latent_tile();
    let overlap = tile / 2;
    const BATCH: usize = 3;
    let c = base.config.diffusion.latent_channels;
    let (h, w) = (2..10)
        .flat_map(|a| (2..10).map(move |b| (a * tile / 2, b * tile / 2)))
        .find(|&(h, w)| {
            let n = tile_offsets(h, w, tile, overlap).unwrap().len();
            n > BATCH && !n.is_multiple_of(BATCH)
        })
        .expect("a canvas with a partial last batch");
    let tiles = tile_offsets(h, w, tile, overlap).unwrap().len();
    let init = common::seeded_randn(5, &[1, c, h, w]);
    let cond = Restorer::text_context(&base, "a photo of a person").unwrap();
    let uncond = Restorer::text_context(&base, "blurry").unwrap();
    let sampler = DdpmSampler::new(&base.config.diffusion, 2).unwrap();
    let run = |per_batch: usize| {
        let mut denoiser = ModelDenoiser {
            model: &base,
            cond: cond.clone(),
            uncond: uncond.clone(),
        };
        let tiling = Tiling {
            tile_size: tile,
            tile_overlap: overlap,
            tiles_per_batch: per_batch,
        };
        CanvasSampler::new(&sampler, tiling)
            .unwrap()
            .sample(
                &mut denoiser,
                &init,
                &mut SeededNoise::new(11),
                &SampleOptions {
                    guidance_scale: Some(4.0),
                    record_steps: false,
                },
                &mut |_| {},
            )
            .unwrap()
            .latent
    };
    let one = run(1);
    let batched = run(BATCH);
    let scale = common::max_abs(&one).max(1.0) as f64;
    let diff = common::assert_close(
        &format!("{h}x{w} latent, {tiles} tiles in calls of {BATCH} vs one at a time"),
        &batched,
        &one,
        1e-5 * scale,
        0.0,
    );
    println!("latent: {tiles} tiles, calls of {BATCH}: max abs diff {diff:.3e} (scale {scale:.2})");
}

/// A staged restorer (each stage loads its networks from the files and frees them after) gives
/// the resident restorer's image bit for bit, for one piece and for several pixel patches: the
/// same weights, the same operations, and each piece's random sequence carried across the
/// stages. Only the staged one spends time loading.
#[test]
fn staged_networks_restore_what_resident_ones_do() {
    use pfstorer::restore::{StagedNetworks, TargetSize, WeightSource};
    let FastRestore {
        base,
        cfw,
        native,
        tile,
        cond,
        uncond,
    } = fast_restore();
    let settings = |patch_size: usize| RestoreSettings {
        steps: 2,
        native_size: Some(native),
        tile_overlap: Some(tile / 2),
        patch_size,
        patch_stride: (patch_size * 3 / 4).max(1),
        seed: 11,
        ..RestoreSettings::default()
    };
    let staged_networks = || StagedNetworks {
        base: WeightSource::open(&common::fixture("stablesr/model.safetensors")).unwrap(),
        base_config: base.config.clone(),
        cfw: WeightSource::open(&common::fixture("stablesr/cfw.safetensors")).unwrap(),
        cfw_config: cfw.config.clone(),
        dtype: DType::F32,
        cfw_dtype: DType::F32,
        device: Device::Cpu,
    };
    let target = TargetSize::Scale(1.0);
    // An odd size: padding to 32 and, with the small patches, uneven patch edges.
    let (w, h) = (native * 3 / 2 + 5, native + 3);
    let image = synthetic(w, h);
    for patch_size in [4096, (native / 32).max(1) * 32] {
        let resident = Restorer::new(
            &base,
            &cfw,
            settings(patch_size),
            cond.clone(),
            uncond.clone(),
        )
        .unwrap();
        let staged = Restorer::staged(
            staged_networks(),
            settings(patch_size),
            cond.clone(),
            uncond.clone(),
        )
        .unwrap();
        assert!(staged.is_staged() && !resident.is_staged());
        let (plan, work) = staged.work(w, h, target).unwrap();
        assert_eq!(
            (plan.patches > 1),
            patch_size < 4096,
            "{w}x{h} in {patch_size}-px patches: {} patches",
            plan.patches
        );
        let mut steps_seen = Vec::new();
        let a = resident.restore(&image, target, &mut |_, _| {}).unwrap();
        let b = staged
            .restore(&image, target, &mut |done, total| {
                steps_seen.push((done, total))
            })
            .unwrap();
        assert_eq!((a.width, a.height), (b.width, b.height));
        let diff = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!(
            "{} patch(es): staged vs resident max abs diff {diff:e}",
            plan.patches
        );
        assert_eq!(
            a.data, b.data,
            "{} patch(es): staged == resident",
            plan.patches
        );
        assert_eq!(staged.unet_calls(), work.unet_calls, "planned calls");
        assert_eq!(resident.unet_calls(), staged.unet_calls());
        // Progress runs over every patch's steps in order.
        let total = plan.patches * 2;
        assert_eq!(steps_seen.last(), Some(&(total, total)), "{steps_seen:?}");
        assert!(
            steps_seen.windows(2).all(|p| p[0].0 <= p[1].0),
            "{steps_seen:?}"
        );
        let (s, r) = (staged.stage_seconds(), resident.stage_seconds());
        assert!(s.load > 0.0 && r.load == 0.0, "{s:?} {r:?}");
        assert!(s.encode > 0.0 && s.sample > 0.0 && s.decode > 0.0, "{s:?}");
    }
}
