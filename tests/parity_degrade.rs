//! Parity of the degradation building blocks with the reference numbers of
//! `degrade/degrade.safetensors` (BasicSR/StableSR, the ISP model, KAIR motion kernels).
//! Parameters are read from the tensors and the `params_json` metadata, so another fixture set
//! of the same layout works. PSNR/SSIM and cv2-JPEG tensors belong to other tests.

mod common;

use pfstorer::degrade::filter::{filter2d, filter2d_direct, median_blur, usm_sharp};
use pfstorer::degrade::isp;
use pfstorer::degrade::jpeg::{diff_jpeg, diff_jpeg_factor, quality_to_factor};
use pfstorer::degrade::kernels::{
    apply_mult_noise, bivariate_gaussian, bivariate_generalized_gaussian, bivariate_plateau,
    choose_kernel_type, circular_lowpass_kernel, kernel_from_draws, sigma_matrix2, Kernel,
    KernelType,
};
use pfstorer::degrade::motion::{
    finish_motion_kernel, kernel_from_trajectory, trajectory_kernel_size,
};
use pfstorer::degrade::noise::{
    add_noise_clip, gaussian_noise_from_draws, poisson_noise_from_draws, poisson_vals, rgb_to_gray,
    round_to_u8_levels,
};
use pfstorer::degrade::Planar;
use pfstorer::imaging::resize::{
    resize_cv2_planar, resize_torch_planar, resize_torch_scale_factor_planar, CvInterp, TorchInterp,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;

const FIXTURE: &str = "degrade/degrade.safetensors";

struct Fx {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    params: Value,
}

impl Fx {
    fn load() -> Fx {
        let path = common::fixture(FIXTURE);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let params_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("params_json").cloned())
            .expect("params_json metadata");
        let params: Value = serde_json::from_str(&params_json).expect("params_json");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let vals: Vec<f64> = match view.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::U8 => d.iter().map(|&v| v as f64).collect(),
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), vals));
        }
        Fx { tensors, params }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn t(&self, name: &str) -> &[f64] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
            .1
    }

    fn shape(&self, name: &str) -> &[usize] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
            .0
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.t(name).iter().map(|&v| v as f32).collect()
    }

    /// Names `prefix<i>` for i = 0.. while present.
    fn indexed(&self, prefix: &str) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .take_while(|n| self.has(n))
            .collect()
    }

    /// An NCHW tensor's sample `b` as a planar image.
    fn nchw(&self, name: &str, b: usize) -> Planar {
        let s = self.shape(name);
        let (c, h, w) = (s[1], s[2], s[3]);
        let n = c * h * w;
        Planar::new(c, h, w, self.f32s(name)[b * n..(b + 1) * n].to_vec()).unwrap()
    }

    /// An HWC tensor as a planar image (channel order kept).
    fn hwc(&self, name: &str) -> Planar {
        let s = self.shape(name);
        let (h, w, c) = (s[0], s[1], if s.len() > 2 { s[2] } else { 1 });
        let img = pfstorer::imaging::ImageF32::new(w, h, c, self.f32s(name));
        Planar::from_hwc(&img)
    }
}

/// Max |a - b|; panics above `atol`.
fn check(name: &str, actual: &[f64], expected: &[f64], atol: f64) -> f64 {
    assert_eq!(actual.len(), expected.len(), "{name}: length");
    let mut max = 0f64;
    for (a, b) in actual.iter().zip(expected) {
        let e = (a - b).abs();
        if e > max || e.is_nan() {
            max = e;
        }
    }
    println!("{name}: max abs error {max:.3e}");
    assert!(max <= atol, "{name}: max abs error {max:.3e} > {atol:e}");
    max
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn planar_hwc(p: &Planar) -> Vec<f64> {
    f64s(&p.to_hwc().data)
}

fn kernel_of(fx: &Fx, name: &str) -> Kernel {
    let s = fx.shape(name);
    Kernel::new(s[0], fx.t(name).to_vec()).unwrap()
}

#[test]
fn fixed_kernels() {
    let fx = Fx::load();
    let mut n = 0;
    for family in [
        "iso",
        "aniso",
        "gen_iso",
        "gen_aniso",
        "plateau_iso",
        "plateau_aniso",
    ] {
        for name in fx.indexed(&format!("kernel/{family}/")) {
            let p = fx.t(&format!("{name}/params"));
            let k = p[0] as usize;
            let iso = family.ends_with("iso") && !family.ends_with("aniso");
            let ours = match (family, iso) {
                ("iso", _) => bivariate_gaussian(k, p[1], p[1], 0.0, true),
                ("aniso", _) => bivariate_gaussian(k, p[1], p[2], p[3], false),
                ("gen_iso", _) => bivariate_generalized_gaussian(k, p[1], p[1], 0.0, p[2], true),
                ("gen_aniso", _) => {
                    bivariate_generalized_gaussian(k, p[1], p[2], p[3], p[4], false)
                }
                ("plateau_iso", _) => bivariate_plateau(k, p[1], p[1], 0.0, p[2], true),
                _ => bivariate_plateau(k, p[1], p[2], p[3], p[4], false),
            }
            .unwrap();
            check(&name, &ours.data, fx.t(&name), 1e-12);
            if family == "aniso" {
                let m = sigma_matrix2(p[1], p[2], p[3]);
                check(
                    &format!("{name}/sigma_matrix"),
                    &m,
                    fx.t(&format!("{name}/sigma_matrix")),
                    1e-12,
                );
            }
            n += 1;
        }
    }
    for name in fx.indexed("kernel/sinc/") {
        let p = fx.t(&format!("{name}/params"));
        let ours = circular_lowpass_kernel(p[0], p[1] as usize, p[2] as usize).unwrap();
        check(&name, &ours.data, fx.t(&name), 1e-12);
        n += 1;
    }
    assert!(n > 0, "no kernels found");
}

#[test]
fn random_kernels_from_draws() {
    let fx = Fx::load();
    let cases = fx.params["params"]["random_kernels"]
        .as_object()
        .expect("random_kernels");
    assert!(!cases.is_empty());
    for (case, spec) in cases {
        let kw = &spec["kwargs"];
        let size = kw["kernel_size"].as_u64().unwrap() as usize;
        let kind = KernelType::from_name(spec["kernel_type"].as_str().unwrap()).unwrap();
        let draws = fx.t(&format!("rkernel/{case}/draws"));
        let mixed = spec["function"] == "random_mixed_kernels";
        let scalars = if mixed {
            let list: Vec<KernelType> = kw["kernel_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| KernelType::from_name(v.as_str().unwrap()).unwrap())
                .collect();
            let prob: Vec<f64> = kw["kernel_prob"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(
                choose_kernel_type(&list, &prob, draws[0]).unwrap(),
                kind,
                "{case}: type choice"
            );
            &draws[1..]
        } else {
            draws
        };
        let mut k = kernel_from_draws(kind, size, scalars).unwrap();
        let noise_name = format!("rkernel/{case}/mult_noise");
        if fx.has(&noise_name) {
            k = apply_mult_noise(k, fx.t(&noise_name)).unwrap();
        }
        check(
            &format!("rkernel/{case}"),
            &k.data,
            fx.t(&format!("rkernel/{case}/kernel")),
            1e-12,
        );
    }
}

#[test]
fn filter2d_torch_and_cv2() {
    let fx = Fx::load();
    let rgb = fx.nchw("img/rgb_nchw", 0);
    let bgr = fx.hwc("img/bgr_hwc");
    let names: Vec<String> = fx
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("filter/kernel/").map(str::to_string))
        .collect();
    assert!(!names.is_empty());
    for name in names {
        let k = kernel_of(&fx, &format!("filter/kernel/{name}"));
        let torch = format!("filter/torch/{name}");
        if fx.has(&torch) {
            let want = fx.t(&torch);
            check(
                &format!("{torch} direct"),
                &f64s(&filter2d_direct(&rgb, &k).data),
                want,
                2e-6,
            );
            check(
                &format!("{torch} fast"),
                &f64s(&filter2d(&rgb, &k).data),
                want,
                2e-6,
            );
        }
        let cv = format!("filter/cv2/{name}");
        if fx.has(&cv) {
            check(&cv, &planar_hwc(&filter2d(&bgr, &k)), fx.t(&cv), 2e-6);
        }
    }
    // Batch of samples, one kernel each.
    let b = fx.shape("filter/torch_batch/in")[0];
    let ks = fx.shape("filter/torch_batch/kernels")[1];
    let kernels = fx.t("filter/torch_batch/kernels");
    let mut out = Vec::new();
    for i in 0..b {
        let k = Kernel::new(ks, kernels[i * ks * ks..(i + 1) * ks * ks].to_vec()).unwrap();
        out.extend(f64s(
            &filter2d(&fx.nchw("filter/torch_batch/in", i), &k).data,
        ));
    }
    check(
        "filter/torch_batch/out",
        &out,
        fx.t("filter/torch_batch/out"),
        2e-6,
    );
}

#[test]
fn unsharp_masking() {
    let fx = Fx::load();
    let k = fx.shape("usm/kernel")[0];
    let radius = k / 2;
    let torch = usm_sharp(&fx.nchw("img/rgb_nchw", 0), 0.5, radius, 10.0);
    check(
        "usm/torch_out",
        &f64s(&torch.data),
        fx.t("usm/torch_out"),
        1e-5,
    );
    let np = usm_sharp(&fx.hwc("img/bgr_hwc"), 0.5, radius, 10.0);
    check(
        "usm/numpy_out",
        &planar_hwc(&np),
        fx.t("usm/numpy_out"),
        1e-5,
    );
}

#[test]
fn resizes() {
    let fx = Fx::load();
    let factors = fx.params["params"]["resize"]["factors"]
        .as_object()
        .expect("factors");
    for (label, f) in factors {
        let f = f.as_f64().unwrap();
        let (src_cv, src_pt) = if f < 1.0 {
            (fx.hwc("img/bgr_hwc"), fx.nchw("img/rgb_nchw", 0))
        } else {
            (
                fx.hwc("resize/crop_bgr_hwc"),
                fx.nchw("resize/crop_rgb_nchw", 0),
            )
        };
        let (c, h, w) = (src_cv.channels, src_cv.height, src_cv.width);
        for (mode, interp) in [
            ("area", CvInterp::Area),
            ("linear", CvInterp::Linear),
            ("cubic", CvInterp::Cubic),
        ] {
            let name = format!("resize/cv2/{mode}/{label}");
            let s = fx.shape(&name);
            let (oh, ow) = (s[0], s[1]);
            assert_eq!(
                (oh, ow),
                ((h as f64 * f) as usize, (w as f64 * f) as usize),
                "{name}: size"
            );
            let out = resize_cv2_planar(&src_cv.data, c, h, w, oh, ow, interp).unwrap();
            let out = Planar::new(c, oh, ow, out).unwrap();
            check(&name, &planar_hwc(&out), fx.t(&name), 2e-6);
        }
        for (mode, interp) in [
            ("area", TorchInterp::Area),
            ("bilinear", TorchInterp::Bilinear),
            ("bicubic", TorchInterp::Bicubic),
        ] {
            let name = format!("resize/torch_sf/{mode}/{label}");
            let (out, oh, ow) =
                resize_torch_scale_factor_planar(&src_pt.data, c, h, w, f, interp).unwrap();
            assert_eq!(&fx.shape(&name)[2..], &[oh, ow], "{name}: size");
            check(&name, &f64s(&out), fx.t(&name), 2e-6);
            let name = format!("resize/torch_size/{mode}/{label}");
            if fx.has(&name) {
                let s = fx.shape(&name);
                let out = resize_torch_planar(&src_pt.data, c, h, w, s[2], s[3], interp).unwrap();
                check(&name, &f64s(&out), fx.t(&name), 2e-6);
            }
        }
    }
}

#[test]
fn numpy_noise_from_recorded_draws() {
    let fx = Fx::load();
    let img = fx.hwc("img/bgr_hwc");
    let noise_params = &fx.params["params"]["noise"];
    for case in ["gauss_color", "gauss_gray", "gauss_round"] {
        let draws = fx.t(&format!("noise/{case}/draws"));
        let gray_prob = noise_params[case]["kwargs"]["gray_prob"].as_f64().unwrap();
        let rounds = noise_params[case]["kwargs"]["rounds"]
            .as_bool()
            .unwrap_or(false);
        let randn = fx.f32s(&format!("noise/{case}/randn"));
        // Colour draws are HWC; bring them to planar order.
        let hw = img.height * img.width;
        let randn: Vec<f32> = if randn.len() == hw {
            randn
        } else {
            (0..3 * hw).map(|i| randn[(i % hw) * 3 + i / hw]).collect()
        };
        assert_eq!(
            randn.len() == img.height * img.width,
            draws[1] < gray_prob,
            "{case}: gray branch"
        );
        let noise = gaussian_noise_from_draws(&img, &randn, draws[0]).unwrap();
        let noise_img = Planar::new(3, img.height, img.width, noise.clone()).unwrap();
        check(
            &format!("noise/{case}/noise"),
            &planar_hwc(&noise_img),
            fx.t(&format!("noise/{case}/noise")),
            1e-7,
        );
        let out = add_noise_clip(&img, &noise, rounds);
        check(
            &format!("noise/{case}/out"),
            &planar_hwc(&out),
            fx.t(&format!("noise/{case}/out")),
            1e-7,
        );
    }
    for case in ["poisson_color", "poisson_gray"] {
        let draws = fx.t(&format!("noise/{case}/draws"));
        let gray_prob = noise_params[case]["kwargs"]["gray_prob"].as_f64().unwrap();
        let gray = draws[1] < gray_prob;
        // The image is BGR here: OpenCV's BGR2GRAY weights in that order.
        let src = if gray {
            let bgr_as_rgb = img.clone();
            rgb_to_gray(&bgr_as_rgb, [0.114, 0.587, 0.299])
        } else {
            img.data.clone()
        };
        let rounded = round_to_u8_levels(&src);
        let want_rounded = fx.t(&format!("noise/{case}/rounded"));
        let ours_rounded = if gray {
            f64s(&rounded)
        } else {
            planar_hwc(&Planar::new(3, img.height, img.width, rounded.clone()).unwrap())
        };
        check(
            &format!("noise/{case}/rounded"),
            &ours_rounded,
            want_rounded,
            1e-7,
        );
        let vals = poisson_vals(&rounded);
        assert_eq!(vals, draws[3], "{case}: vals");
        // Draws are HWC for colour; bring them to planar order.
        let poisson = fx.t(&format!("noise/{case}/poisson"));
        let poisson_planar: Vec<f64> = if gray {
            poisson.to_vec()
        } else {
            let hw = img.height * img.width;
            (0..3 * hw)
                .map(|i| poisson[(i % hw) * 3 + i / hw])
                .collect()
        };
        let noise =
            poisson_noise_from_draws(&img, &rounded, &poisson_planar, vals, draws[0]).unwrap();
        let noise_img = Planar::new(3, img.height, img.width, noise.clone()).unwrap();
        check(
            &format!("noise/{case}/noise"),
            &planar_hwc(&noise_img),
            fx.t(&format!("noise/{case}/noise")),
            1e-7,
        );
        let out = add_noise_clip(&img, &noise, false);
        check(
            &format!("noise/{case}/out"),
            &planar_hwc(&out),
            fx.t(&format!("noise/{case}/out")),
            1e-7,
        );
    }
}

#[test]
fn torch_noise_from_recorded_draws() {
    let fx = Fx::load();
    let b = fx.shape("noise_pt/in")[0];
    let noise_params = &fx.params["params"]["noise"];
    // Gaussian: per-sample sigma, one gray field shared by the batch.
    let kw = &noise_params["gauss_pt"]["kwargs"];
    let (lo, hi) = (
        kw["sigma_range"][0].as_f64().unwrap() as f32,
        kw["sigma_range"][1].as_f64().unwrap() as f32,
    );
    let gray_prob = kw["gray_prob"].as_f64().unwrap() as f32;
    let u = fx.f32s("noise_pt/gauss_pt/u_param");
    let ug = fx.f32s("noise_pt/gauss_pt/u_gray");
    let sigma: Vec<f32> = u.iter().map(|&u| u * (hi - lo) + lo).collect();
    check(
        "noise_pt/gauss_pt/sigma",
        &f64s(&sigma),
        fx.t("noise_pt/gauss_pt/sigma"),
        0.0,
    );
    let gray_field = fx.f32s("noise_pt/gauss_pt/randn_gray");
    let color = fx.f32s("noise_pt/gauss_pt/randn_color");
    let (mut noise_all, mut out_all) = (Vec::new(), Vec::new());
    for i in 0..b {
        let img = fx.nchw("noise_pt/in", i);
        let n = img.data.len();
        let field: &[f32] = if ug[i] < gray_prob {
            &gray_field
        } else {
            &color[i * n..(i + 1) * n]
        };
        let noise = gaussian_noise_from_draws(&img, field, sigma[i] as f64).unwrap();
        out_all.extend(f64s(&add_noise_clip(&img, &noise, false).data));
        noise_all.extend(f64s(&noise));
    }
    check(
        "noise_pt/gauss_pt/noise",
        &noise_all,
        fx.t("noise_pt/gauss_pt/noise"),
        1e-7,
    );
    check(
        "noise_pt/gauss_pt/out",
        &out_all,
        fx.t("noise_pt/gauss_pt/out"),
        1e-7,
    );

    // Poisson: per-sample unique counts, gray via torchvision weights.
    let kw = &noise_params["poisson_pt"]["kwargs"];
    let (lo, hi) = (
        kw["scale_range"][0].as_f64().unwrap() as f32,
        kw["scale_range"][1].as_f64().unwrap() as f32,
    );
    let gray_prob = kw["gray_prob"].as_f64().unwrap() as f32;
    let u = fx.f32s("noise_pt/poisson_pt/u_param");
    let ug = fx.f32s("noise_pt/poisson_pt/u_gray");
    let scale: Vec<f32> = u.iter().map(|&u| u * (hi - lo) + lo).collect();
    check(
        "noise_pt/poisson_pt/scale",
        &f64s(&scale),
        fx.t("noise_pt/poisson_pt/scale"),
        0.0,
    );
    let n_unique = fx.t("noise_pt/poisson_pt/n_unique");
    let pg = fx.t("noise_pt/poisson_pt/poisson_gray");
    let pc = fx.t("noise_pt/poisson_pt/poisson_color");
    let (mut noise_all, mut out_all) = (Vec::new(), Vec::new());
    for i in 0..b {
        let img = fx.nchw("noise_pt/in", i);
        let (n, hw) = (img.data.len(), img.height * img.width);
        let gray_rounded = round_to_u8_levels(&rgb_to_gray(&img, [0.2989, 0.587, 0.114]));
        let color_rounded = round_to_u8_levels(&img.data);
        let (vg, vc) = (poisson_vals(&gray_rounded), poisson_vals(&color_rounded));
        assert_eq!(vg, 2f64.powf(n_unique[i].log2().ceil()), "gray vals {i}");
        assert_eq!(
            vc,
            2f64.powf(n_unique[b + i].log2().ceil()),
            "colour vals {i}"
        );
        let noise = if ug[i] < gray_prob {
            poisson_noise_from_draws(
                &img,
                &gray_rounded,
                &pg[i * hw..(i + 1) * hw],
                vg,
                scale[i] as f64,
            )
        } else {
            poisson_noise_from_draws(
                &img,
                &color_rounded,
                &pc[i * n..(i + 1) * n],
                vc,
                scale[i] as f64,
            )
        }
        .unwrap();
        out_all.extend(f64s(&add_noise_clip(&img, &noise, false).data));
        noise_all.extend(f64s(&noise));
    }
    check(
        "noise_pt/poisson_pt/noise",
        &noise_all,
        fx.t("noise_pt/poisson_pt/noise"),
        1e-6,
    );
    check(
        "noise_pt/poisson_pt/out",
        &out_all,
        fx.t("noise_pt/poisson_pt/out"),
        1e-6,
    );
}

#[test]
fn diffjpeg() {
    let fx = Fx::load();
    let img = fx.nchw("img/rgb_nchw", 0);
    let qualities = fx.params["params"]["jpeg"]["qualities"]
        .as_array()
        .expect("qualities");
    for q in qualities {
        let q = q.as_f64().unwrap();
        let name = format!("jpeg/diffjpeg/q{q}/out");
        let out = diff_jpeg(&img, q as f32).unwrap();
        check(&name, &f64s(&out.data), fx.t(&name), 1e-5);
    }
    let b = fx.shape("jpeg/diffjpeg/batch/out")[0];
    let q = fx.f32s("jpeg/diffjpeg/batch/quality");
    let mut all = Vec::new();
    for (i, &quality) in q.iter().enumerate().take(b) {
        let src = fx.nchw("jpeg/diffjpeg/batch/out", i);
        // The batch input is [img, img flipped left-right].
        let mut flipped = img.clone();
        if i % 2 == 1 {
            let (h, w) = (img.height, img.width);
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        flipped.data[(c * h + y) * w + x] = img.data[(c * h + y) * w + (w - 1 - x)];
                    }
                }
            }
        }
        assert_eq!(src.data.len(), flipped.data.len());
        all.extend(f64s(
            &diff_jpeg_factor(&flipped, quality_to_factor(quality))
                .unwrap()
                .data,
        ));
    }
    check(
        "jpeg/diffjpeg/batch/out",
        &all,
        fx.t("jpeg/diffjpeg/batch/out"),
        1e-5,
    );
}

#[test]
fn median_blurs() {
    let fx = Fx::load();
    let f = fx.hwc("img/bgr_hwc");
    let u8img = fx.hwc("img/u8_bgr_hwc");
    for k in [3usize, 5] {
        let name = format!("median/f32/k{k}");
        if fx.has(&name) {
            check(
                &name,
                &planar_hwc(&median_blur(&f, k).unwrap()),
                fx.t(&name),
                0.0,
            );
        }
        let name = format!("median/u8/k{k}");
        if fx.has(&name) {
            check(
                &name,
                &planar_hwc(&median_blur(&u8img, k).unwrap()),
                fx.t(&name),
                0.0,
            );
        }
    }
}

#[test]
fn motion_kernels_from_trajectory() {
    let fx = Fx::load();
    let cases: Vec<String> = (0..)
        .map(|i| format!("motion/kair_{i}"))
        .take_while(|n| fx.has(&format!("{n}/kernel")))
        .collect();
    assert!(!cases.is_empty(), "no motion cases");
    for case in cases {
        let traj = fx.t(&format!("{case}/trajectory"));
        let steps = fx.shape(&format!("{case}/trajectory"))[1];
        let h = trajectory_kernel_size(fx.t(&format!("{case}/h_draws"))[0]);
        let k = kernel_from_trajectory(traj, steps, h).expect("non-empty histogram");
        check(
            &format!("{case}/traj_kernel"),
            &k.data,
            fx.t(&format!("{case}/traj_kernel")),
            1e-12,
        );
        let ints = fx.t(&format!("{case}/int_draws"));
        let size = fx.shape(&format!("{case}/kernel"))[0];
        let enlarge = (ints[0] == 1.0).then(|| (ints[1] as usize, ints[2] as usize));
        let tol = if enlarge.is_some() { 1e-6 } else { 1e-12 };
        let fin = finish_motion_kernel(k, size, enlarge).unwrap();
        check(
            &format!("{case}/kernel"),
            &fin.data,
            fx.t(&format!("{case}/kernel")),
            tol,
        );
    }
}

fn mat3(fx: &Fx, name: &str) -> [f32; 9] {
    let v = fx.f32s(name);
    std::array::from_fn(|i| v[i])
}

#[test]
fn isp_stages() {
    let fx = Fx::load();
    let p = &fx.params["params"]["isp"];
    // Embedded profile data equals the fixture's.
    for (i, cam) in isp::CAMERAS.iter().enumerate() {
        let (fm1, fm2) = isp::forward_matrices(i).unwrap();
        check(
            &format!("isp/profiles/{cam}/fm1"),
            &f64s(&fm1),
            fx.t(&format!("isp/profiles/{cam}/fm1")),
            0.0,
        );
        check(
            &format!("isp/profiles/{cam}/fm2"),
            &f64s(&fm2),
            fx.t(&format!("isp/profiles/{cam}/fm2")),
            0.0,
        );
    }
    for (slot, idx) in isp::TONE_CURVES.iter().enumerate() {
        let (x, y) = isp::tone_curve(slot).unwrap();
        let mut xy = f64s(&x);
        xy.extend(f64s(&y));
        check(
            &format!("isp/tonecurves/{idx}"),
            &xy,
            fx.t(&format!("isp/tonecurves/{idx}")),
            0.0,
        );
    }
    check(
        "isp/m_xyz2rgb",
        &f64s(&isp::xyz_to_rgb_matrix()),
        fx.t("isp/m_xyz2rgb"),
        0.0,
    );

    // Matrices from the recorded draws.
    let cam = p["camera_index"].as_u64().unwrap() as usize;
    let draws = fx.t("isp/draws_torch_rand");
    let fw = draws[0] as f32;
    let wb = fx.f32s("isp/wb_diag");
    check(
        "isp/wb_diag",
        &[1.2 + 1.2 * draws[1], 1.0, 1.2 + 1.2 * draws[2]],
        fx.t("isp/wb_diag"),
        1e-6,
    );
    let cam2xyz = isp::camera_to_xyz(cam, fw, [wb[0], wb[1], wb[2]]).unwrap();
    check(
        "isp/m_cam2xyz",
        &f64s(&cam2xyz),
        fx.t("isp/m_cam2xyz"),
        1e-6,
    );
    check(
        "isp/m_cam2xyz_inv",
        &f64s(&isp::inverse3(&cam2xyz).unwrap()),
        fx.t("isp/m_cam2xyz_inv"),
        1e-5,
    );
    check(
        "isp/m_xyz2rgb_inv",
        &f64s(&isp::inverse3(&isp::xyz_to_rgb_matrix()).unwrap()),
        fx.t("isp/m_xyz2rgb_inv"),
        1e-5,
    );
    let levels = fx.t("isp/noise_levels");
    // The reference draws in float32: relative agreement to float32 precision.
    check(
        "isp/shot",
        &[10f64.powf(levels[0])],
        &[levels[2]],
        1e-6 * levels[2],
    );
    let read = 10f64.powf(2.275 * levels[0] + 1.47 + levels[1]);
    check("isp/read", &[read], &[levels[3]], 1e-5 * levels[3]);

    // Tone LUTs from the control points.
    let lut = isp::ToneLut::new(&fx.f32s("isp/tone_x"), &fx.f32s("isp/tone_y")).unwrap();
    let every = |v: &[f32]| -> Vec<f64> { v.iter().step_by(100).map(|&x| x as f64).collect() };
    check(
        "isp/lut_yi_every100",
        &every(&lut.forward),
        fx.t("isp/lut_yi_every100"),
        1e-6,
    );
    check(
        "isp/lut_yi_inv_every100",
        &every(&lut.inverse),
        fx.t("isp/lut_yi_inv_every100"),
        1e-6,
    );

    // Stage by stage, each from the reference's previous output.
    let stage = |name: &str| fx.nchw(&format!("isp/{name}"), 0);
    let exposure = fx.t("isp/exposure")[0] as f32;
    let m_xyz2rgb_inv = mat3(&fx, "isp/m_xyz2rgb_inv");
    let m_cam_inv = mat3(&fx, "isp/m_cam2xyz_inv");
    let m_cam = mat3(&fx, "isp/m_cam2xyz");
    let m_xyz2rgb = mat3(&fx, "isp/m_xyz2rgb");
    let tol = 1e-5;
    let mut x = stage("in_rgb_nchw");
    isp::gamma_reverse(&mut x);
    check(
        "isp/rev1_inverse_gamma",
        &f64s(&x.data),
        fx.t("isp/rev1_inverse_gamma"),
        1e-6,
    );
    let mut x = stage("rev1_inverse_gamma");
    isp::tone_reverse(&mut x, &lut);
    check(
        "isp/rev2_inverse_tone",
        &f64s(&x.data),
        fx.t("isp/rev2_inverse_tone"),
        tol,
    );
    let mut x = stage("rev2_inverse_tone");
    isp::color_matrix(&mut x, &m_xyz2rgb_inv);
    check(
        "isp/rev3_linear_rgb_to_xyz",
        &f64s(&x.data),
        fx.t("isp/rev3_linear_rgb_to_xyz"),
        1e-6,
    );
    let mut x = stage("rev3_linear_rgb_to_xyz");
    isp::color_matrix(&mut x, &m_cam_inv);
    check(
        "isp/rev4_xyz_to_camera",
        &f64s(&x.data),
        fx.t("isp/rev4_xyz_to_camera"),
        1e-6,
    );
    let mut x = stage("rev4_xyz_to_camera");
    isp::exposure(&mut x, exposure, true);
    check(
        "isp/rev5_inverse_exposure",
        &f64s(&x.data),
        fx.t("isp/rev5_inverse_exposure"),
        1e-6,
    );
    let raw = isp::mosaic(&stage("rev5_inverse_exposure"));
    check(
        "isp/rev6_mosaic",
        &f64s(&raw.data),
        fx.t("isp/rev6_mosaic"),
        0.0,
    );
    let raw = stage("rev6_mosaic");
    let std = isp::noise_std(&raw, levels[2] as f32, levels[3] as f32);
    check("isp/noise_std", &f64s(&std), fx.t("isp/noise_std"), 1e-7);
    let noisy = isp::add_raw_noise(&raw, &fx.f32s("isp/noise"));
    check(
        "isp/rev7_noisy_raw",
        &f64s(&noisy.data),
        fx.t("isp/rev7_noisy_raw"),
        0.0,
    );
    let x = isp::demosaic(&stage("rev7_noisy_raw"));
    check(
        "isp/fwd1_demosaic",
        &f64s(&x.data),
        fx.t("isp/fwd1_demosaic"),
        1e-6,
    );
    let mut x = stage("fwd1_demosaic");
    isp::exposure(&mut x, exposure, false);
    check(
        "isp/fwd2_exposure",
        &f64s(&x.data),
        fx.t("isp/fwd2_exposure"),
        1e-6,
    );
    let mut x = stage("fwd2_exposure");
    isp::color_matrix(&mut x, &m_cam);
    check(
        "isp/fwd3_camera_to_xyz",
        &f64s(&x.data),
        fx.t("isp/fwd3_camera_to_xyz"),
        1e-6,
    );
    let mut x = stage("fwd3_camera_to_xyz");
    isp::color_matrix(&mut x, &m_xyz2rgb);
    check(
        "isp/fwd4_xyz_to_linear_rgb",
        &f64s(&x.data),
        fx.t("isp/fwd4_xyz_to_linear_rgb"),
        1e-6,
    );
    let mut x = stage("fwd4_xyz_to_linear_rgb");
    isp::tone_forward(&mut x, &lut);
    check("isp/fwd5_tone", &f64s(&x.data), fx.t("isp/fwd5_tone"), tol);
    let mut x = stage("fwd5_tone");
    isp::gamma_forward(&mut x);
    check(
        "isp/fwd6_gamma",
        &f64s(&x.data),
        fx.t("isp/fwd6_gamma"),
        1e-6,
    );
    check(
        "isp/out_noisy_rgb_hwc",
        &planar_hwc(&stage("fwd6_gamma")),
        fx.t("isp/out_noisy_rgb_hwc"),
        0.0,
    );

    // Clean branch end to end.
    let clean = isp::isp_clean(&stage("in_rgb_nchw"), &lut, &m_cam, exposure).unwrap();
    check(
        "isp/out_clean_rgb_hwc",
        &planar_hwc(&clean),
        fx.t("isp/out_clean_rgb_hwc"),
        1e-4,
    );
}
