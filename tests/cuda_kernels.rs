//! pfstorer's device-specific paths against candle-composed references: the frozen convolution's
//! input gradient (cuDNN backward-data in builds with the `cudnn` feature) and attention with the
//! device's score-chunk bound.
//!
//! With `PFSTORER_TEST_DEVICE=cuda` (the GPU check, scripts/gpu-check.sh) the device results are
//! compared with the composed op on the device and with an f32 CPU reference computed from the
//! same (dtype-rounded) inputs, in `PFSTORER_TEST_DTYPE`. On the CPU the same tests check the
//! CPU fallback instead, and print that they did.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{max_abs, max_abs_diff, test_device, test_dtype};
use pfstorer::kernels::conv2d::{
    conv2d_input_gradient, conv2d_input_gradient_composed, input_gradient_path_for,
    ConvGradGeometry, InputGradientPath,
};
use pfstorer::kernels::{
    attention, attention_chunk_elements, DifferentiableScope, CPU_CHUNK_ELEMENTS,
};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    common::seeded_randn(seed, shape)
}

/// `x` on the test device in the test dtype, and the same rounded values back on the CPU in f32
/// (so the reference sees exactly the device's inputs).
fn on_device(x: &Tensor, device: &Device, dtype: DType) -> (Tensor, Tensor) {
    let d = x.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let cpu = d
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (d, cpu)
}

/// Error bound relative to the reference's largest magnitude. f32: the CPU sums in another order
/// only (1e-5); CUDA's f32 cuBLAS (no reduced precision) in other blockings (1e-4, the fixtures'
/// f32 bound); with cuDNN, its default math permits TF32 tensor cores (10-bit mantissa, as
/// PyTorch's default for convolutions), ~1e-3 of the scale at these sums' lengths. Half
/// precision: the output's own rounding (bf16 2^-9, f16 2^-12) over f32 accumulation.
fn relative_tolerance(device: &Device, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        _ if device.is_cuda() && cfg!(feature = "cudnn") => 3e-3,
        _ if device.is_cuda() => 1e-4,
        _ => 1e-5,
    }
}

/// Strides 1 and 2, odd and even sizes, kernels 1 and 3, and one UNet-like width.
const CONV_CASES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
    // (stride, padding, kernel, height, width, c_in, c_out)
    (1, 1, 3, 8, 8, 3, 4),
    (1, 1, 3, 7, 9, 3, 4),
    (2, 1, 3, 8, 8, 3, 4),
    (2, 1, 3, 7, 9, 3, 4),
    (1, 0, 1, 6, 5, 3, 4),
    (2, 0, 1, 7, 8, 3, 4),
    (1, 1, 3, 32, 32, 64, 64),
];

#[test]
fn frozen_conv_input_gradient_on_the_test_device() {
    let device = test_device();
    let dtype = if device.is_cuda() {
        test_dtype()
    } else {
        DType::F32
    };
    if !device.is_cuda() {
        println!(
            "cuda_kernels: PFSTORER_TEST_DEVICE is not cuda; checked the CPU fallback (the composed \
             input gradient) against candle's conv_transpose2d instead"
        );
    }
    let tol = relative_tolerance(&device, dtype);
    for (i, &(stride, padding, k, h, w, c_in, c_out)) in CONV_CASES.iter().enumerate() {
        let case = format!("k{k} s{stride} p{padding} {h}x{w} {c_in}->{c_out} {dtype:?}");
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let seed = 10 * i as u64;
        let (kernel, kernel_cpu) = on_device(&randn(seed, &[c_out, c_in, k, k]), &device, dtype);
        let x_cpu = randn(seed + 1, &[2, c_in, h, w]);
        let out_dims = x_cpu
            .conv2d(&kernel_cpu, padding, stride, 1, 1)
            .unwrap()
            .dims()
            .to_vec();
        let (g, g_cpu) = on_device(&randn(seed + 2, &out_dims), &device, dtype);

        let path = input_gradient_path_for(&g, &kernel, &cfg);
        let want_path = if device.is_cuda() && cfg!(feature = "cudnn") {
            InputGradientPath::CudnnBackwardData
        } else {
            InputGradientPath::Composed
        };
        assert_eq!(path, want_path, "{case}");

        let got = conv2d_input_gradient(&g, &kernel, &cfg, h, w).unwrap();
        let geometry = ConvGradGeometry::new(g.dims(), kernel.dims(), &cfg, h, w).unwrap();
        assert_eq!(got.dims(), geometry.input_dims().as_slice(), "{case}");
        assert_eq!(got.dtype(), dtype, "{case}");
        assert_eq!(got.device().location(), device.location(), "{case}");

        // The f32 CPU reference: candle's transposed convolution, with the geometry's output
        // padding (one value for both axes in candle, so cut back to the input size).
        let (pad_h, pad_w) = geometry.output_padding();
        let reference = g_cpu
            .conv_transpose2d(&kernel_cpu, padding, pad_h.max(pad_w), stride, 1)
            .unwrap()
            .narrow(2, 0, h)
            .unwrap()
            .narrow(3, 0, w)
            .unwrap();
        let scale = max_abs(&reference).max(1.0);
        let err = max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &reference) / scale;
        println!("{case}: {path:?} relative error {err:.2e} (bound {tol:.0e})");
        assert!(err <= tol, "{case}: {path:?} relative error {err}");

        if device.is_cuda() {
            // And the device's own composed path, the fallback this replaces.
            let composed = conv2d_input_gradient_composed(&g, &kernel, &cfg, h, w).unwrap();
            let err = max_abs_diff(
                &got.to_device(&Device::Cpu).unwrap(),
                &composed.to_device(&Device::Cpu).unwrap(),
            ) / scale;
            println!("{case}: {path:?} vs composed on the device {err:.2e}");
            assert!(err <= 2.0 * tol, "{case}: vs composed {err}");
        }
    }
}

/// The same gradient reaching a frozen layer's input through the backward pass (the path the
/// trainer takes), on the test device, against the CPU's.
#[test]
fn frozen_conv_backward_pass_on_the_test_device() {
    use candle_core::{Module, Var};
    let device = test_device();
    let dtype = if device.is_cuda() {
        test_dtype()
    } else {
        DType::F32
    };
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let (kernel, kernel_cpu) = on_device(&randn(1, &[8, 6, 3, 3]), &device, dtype);
    let (x, x_cpu) = on_device(&randn(2, &[2, 6, 9, 10]), &device, dtype);
    let grad_of = |kernel: &Tensor, x: &Tensor| {
        let conv = pfstorer::model::nn::Conv2d::new(kernel.clone(), None, cfg);
        let x = Var::from_tensor(x).unwrap();
        let training = DifferentiableScope::enter(true);
        let y = conv.forward(x.as_tensor()).unwrap();
        drop(training);
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        grads
            .get(x.as_tensor())
            .expect("input gradient")
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let got = grad_of(&kernel, &x);
    let want = grad_of(&kernel_cpu, &x_cpu);
    assert_eq!(got.dims(), &[2, 6, 9, 10]);
    let scale = max_abs(&want).max(1.0);
    let err = max_abs_diff(&got, &want) / scale;
    // The forward output feeds the loss here, so its rounding counts twice.
    let tol = 2.0 * relative_tolerance(&device, dtype);
    println!(
        "frozen conv backward on {:?} {dtype:?}: relative error {err:.2e}",
        device.location()
    );
    assert!(err <= tol, "relative error {err} > {tol}");
}

/// Attention with the device's chunk bound against one unchunked softmax in f32. On CUDA, the
/// 64x64-latent self-attention at CFG batch 2 (10 heads, 4096 tokens, head dim 64); on the CPU a
/// smaller one (one chunk; the chunking itself is unit-tested in the library).
#[test]
fn attention_with_the_device_chunk_bound() {
    let device = test_device();
    let dtype = if device.is_cuda() {
        test_dtype()
    } else {
        DType::F32
    };
    let bound = attention_chunk_elements(&device);
    let (heads, n, d): (usize, usize, usize) = if device.is_cuda() {
        (10, 4096, 64)
    } else {
        assert_eq!(bound, CPU_CHUNK_ELEMENTS, "the CPU bound is fixed");
        println!(
            "cuda_kernels: PFSTORER_TEST_DEVICE is not cuda; checked the CPU attention (fixed bound \
             2^{}) instead",
            CPU_CHUNK_ELEMENTS.trailing_zeros()
        );
        (2, 256, 16)
    };
    println!(
        "attention on {:?}: chunk bound {bound} f32 elements ({} MiB), {} chunk(s) at {heads}x{n}x{n}",
        device.location(),
        (bound * 4) >> 20,
        (heads * n * n).div_ceil(bound)
    );
    let (q, q_cpu) = on_device(&randn(1, &[heads, n, d]), &device, dtype);
    let (k, k_cpu) = on_device(&randn(2, &[heads, n, d]), &device, dtype);
    let (v, v_cpu) = on_device(&randn(3, &[heads, n, d]), &device, dtype);
    let scale = 1.0 / (d as f64).sqrt();
    let got = attention(&q, &k, &v, scale, None).unwrap();
    assert_eq!(got.dims(), &[heads, n, d]);
    assert_eq!(got.dtype(), dtype);
    let scores = (q_cpu.matmul(&k_cpu.t().unwrap()).unwrap() * scale).unwrap();
    let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    let want = probs.matmul(&v_cpu).unwrap();
    let err = max_abs_diff(&got.to_device(&Device::Cpu).unwrap(), &want) / max_abs(&want).max(1.0);
    // cuBLAS f32 without reduced precision is f32 in another summation order; half precision
    // rounds q*scale, the probabilities and the output.
    let tol = match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 5e-3,
        _ if device.is_cuda() => 1e-4,
        _ => 1e-5,
    };
    println!("attention {dtype:?}: relative error {err:.2e} (bound {tol:.0e})");
    assert!(err <= tol, "relative error {err}");
}
