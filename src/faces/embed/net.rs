//! dlib's face-recognition ResNet (`anet_type` of dlib's `examples/dnn_face_recognition_ex.cpp`)
//! on candle, from the weights `scripts/faces/convert_dlib_resnet.py` writes.
//!
//! Forward order, NCHW f32, for the 150x150 input of [`super::chips_to_input`]:
//! * stem: conv 7x7 stride 2 (no padding) 3→32, affine, relu, max pool 3x3 stride 2 (no padding)
//!   — 150 → 72 → 35;
//! * levels (dlib's `alevel4` … `alevel0`): residual blocks `relu(shortcut + block(x))` with
//!   `block = affine(conv3x3 s1 p1(relu(affine(conv3x3 s(x)))))`. The first block of a
//!   downsampling level has stride 2 with no padding (dlib's `con_` pads only stride-1
//!   convolutions, by size/2) and the shortcut `avg_pool 2x2 stride 2` of `x`; the others have
//!   stride 1 and the identity shortcut. The sums are dlib's `add_prev`: the smaller tensor is
//!   zero-padded at the end of each axis ([`add_zero_padded`]). Sizes 35 → 17 → 8 → 4 → 2: at
//!   level1 the block gives 3x3 but the pooled shortcut 4x4, at level0 1x1 against 2x2, and the
//!   shortcuts of 32→64, 64→128 and 128→256 lack the upper half of the channels, all zero-filled;
//! * head: mean over the remaining 2x2 (`avg_pool_everything`), then `fc_no_bias` 256→128.
//!   dlib returns this vector as the descriptor, not normalised.
//!
//! Weight keys: `stem.conv`, `stem.affine`, `level{4..0}.block{i}.conv{1,2}` (`.weight`
//! [out,in,k,k], `.bias` [out]), `level{4..0}.block{i}.affine{1,2}` (`.scale`, `.shift` [out]),
//! `fc.weight` [128,256] (out x in). Each affine (the batch norm of training, folded by dlib) is
//! folded here into the convolution before it: `w·s`, `b·s + t`.

use crate::error::{Error, Result};
use crate::model::nn::Conv2d;
use candle_core::{DType, Device, Module, Tensor};
use std::collections::HashMap;

/// One level of residual blocks (dlib's `alevelN`).
pub(crate) struct LevelSpec {
    pub(crate) name: &'static str,
    pub(crate) channels: usize,
    pub(crate) blocks: usize,
    /// The first block is `ares_down` (stride 2, pooled shortcut).
    pub(crate) downsamples: bool,
}

/// `anet_type`'s levels in forward order.
pub(crate) const LEVELS: [LevelSpec; 5] = [
    LevelSpec {
        name: "level4",
        channels: 32,
        blocks: 3,
        downsamples: false,
    },
    LevelSpec {
        name: "level3",
        channels: 64,
        blocks: 4,
        downsamples: true,
    },
    LevelSpec {
        name: "level2",
        channels: 128,
        blocks: 3,
        downsamples: true,
    },
    LevelSpec {
        name: "level1",
        channels: 256,
        blocks: 3,
        downsamples: true,
    },
    LevelSpec {
        name: "level0",
        channels: 256,
        blocks: 1,
        downsamples: true,
    },
];

/// Channels of the stem convolution.
pub(crate) const STEM_CHANNELS: usize = 32;
/// Length of the descriptor (`fc_no_bias<128>`).
pub const DESCRIPTOR_DIM: usize = 128;

/// Adds two NCHW tensors as dlib's `add_prev` does: the result has the larger size on every
/// axis and each operand is zero-padded at the end (high indices) of the axes where it is smaller.
pub fn add_zero_padded(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a_dims, b_dims) = (a.dims(), b.dims());
    if a_dims.len() != b_dims.len() {
        return Err(Error::Input(format!(
            "add_zero_padded: ranks differ ({a_dims:?} vs {b_dims:?})"
        )));
    }
    if a_dims == b_dims {
        return Ok((a + b)?);
    }
    let target: Vec<usize> = a_dims.iter().zip(b_dims).map(|(p, q)| *p.max(q)).collect();
    let pad_to = |t: &Tensor| -> Result<Tensor> {
        let mut t = t.clone();
        for (axis, &size) in target.iter().enumerate() {
            let missing = size - t.dim(axis)?;
            if missing > 0 {
                t = t.pad_with_zeros(axis, 0, missing)?;
            }
        }
        Ok(t)
    };
    Ok((pad_to(a)? + pad_to(b)?)?)
}

/// Fetches `key` as f32 on `device`, checking its shape.
fn take(
    weights: &HashMap<String, Tensor>,
    key: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let t = weights
        .get(key)
        .ok_or_else(|| Error::Weights(format!("dlib ResNet: missing tensor `{key}`")))?;
    if t.dims() != shape {
        return Err(Error::Weights(format!(
            "dlib ResNet: `{key}` has shape {:?}, expected {shape:?}",
            t.dims()
        )));
    }
    Ok(t.to_dtype(DType::F32)?.to_device(device)?)
}

/// A convolution with the affine layer after it folded in.
fn conv_affine(
    weights: &HashMap<String, Tensor>,
    conv: &str,
    affine: &str,
    (c_in, c_out, kernel): (usize, usize, usize),
    stride: usize,
    device: &Device,
) -> Result<Conv2d> {
    let weight = take(
        weights,
        &format!("{conv}.weight"),
        &[c_out, c_in, kernel, kernel],
        device,
    )?;
    let bias = take(weights, &format!("{conv}.bias"), &[c_out], device)?;
    let scale = take(weights, &format!("{affine}.scale"), &[c_out], device)?;
    let shift = take(weights, &format!("{affine}.shift"), &[c_out], device)?;
    let weight = weight.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
    let bias = ((bias * &scale)? + shift)?;
    let config = candle_nn::Conv2dConfig {
        // dlib's con_ default: stride-1 convolutions pad by size/2, strided ones not at all.
        padding: if stride == 1 { kernel / 2 } else { 0 },
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), config))
}

/// One residual block (`ares` or `ares_down`).
struct ResidualBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    downsamples: bool,
}

impl ResidualBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?.relu()?;
        let y = self.conv2.forward(&y)?;
        let shortcut = if self.downsamples {
            x.avg_pool2d_with_stride((2, 2), (2, 2))?
        } else {
            x.clone()
        };
        Ok(add_zero_padded(&y, &shortcut)?.relu()?)
    }
}

/// The whole network with its weights.
pub(crate) struct ResNet {
    stem: Conv2d,
    blocks: Vec<ResidualBlock>,
    /// [128, 256], out x in.
    fc: Tensor,
}

impl ResNet {
    /// Builds the network from the converter's tensors (any float dtype; computed in f32).
    pub(crate) fn from_tensors(weights: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let stem = conv_affine(
            weights,
            "stem.conv",
            "stem.affine",
            (3, STEM_CHANNELS, 7),
            2,
            device,
        )?;
        let mut blocks = Vec::new();
        let mut channels = STEM_CHANNELS;
        let mut expected_keys = 5; // stem conv (2), stem affine (2), fc
        for level in &LEVELS {
            for index in 0..level.blocks {
                let prefix = format!("{}.block{index}", level.name);
                let downsamples = level.downsamples && index == 0;
                let stride = if downsamples { 2 } else { 1 };
                let conv1 = conv_affine(
                    weights,
                    &format!("{prefix}.conv1"),
                    &format!("{prefix}.affine1"),
                    (channels, level.channels, 3),
                    stride,
                    device,
                )?;
                let conv2 = conv_affine(
                    weights,
                    &format!("{prefix}.conv2"),
                    &format!("{prefix}.affine2"),
                    (level.channels, level.channels, 3),
                    1,
                    device,
                )?;
                blocks.push(ResidualBlock {
                    conv1,
                    conv2,
                    downsamples,
                });
                channels = level.channels;
                expected_keys += 8;
            }
        }
        let fc = take(weights, "fc.weight", &[DESCRIPTOR_DIM, channels], device)?;
        if weights.len() != expected_keys {
            return Err(Error::Weights(format!(
                "dlib ResNet: {} tensors, expected {expected_keys} (another architecture?)",
                weights.len()
            )));
        }
        Ok(ResNet { stem, blocks, fc })
    }

    /// Descriptors [N, 128] of the normalised input [N, 3, 150, 150].
    pub(crate) fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let x = self.stem.forward(input)?.relu()?;
        let mut x = x.max_pool2d_with_stride((3, 3), (2, 2))?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let pooled = x.mean((2, 3))?;
        Ok(pooled.matmul(&self.fc.t()?)?)
    }
}
