//! Pixel-space patches for images too large to encode, sample and decode in one piece
//! (StableSR's `ImageSpliterTh`): overlapping square patches, each restored on its own and
//! blended back with a Gaussian weight, so memory stays bounded for any output size.

use candle_core::{DType, Device, Result, Tensor};

/// Patch origins along one axis: every `stride` pixels, the last one moved back so that it ends
/// at the border; a single origin 0 when the axis fits in one patch.
pub fn patch_starts(length: usize, patch: usize, stride: usize) -> Vec<usize> {
    if length <= patch {
        return vec![0];
    }
    let mut starts: Vec<usize> = (0..length)
        .step_by(stride.max(1))
        .map(|s| s.min(length - patch))
        .collect();
    starts.dedup();
    starts
}

/// The reference's Gaussian patch weight (variance 0.01 of the normalised coordinate). It
/// centres columns at `(w - 1) / 2` but rows at `h / 2`, a quirk kept for parity.
pub fn gaussian_weights(height: usize, width: usize) -> Vec<f64> {
    let var = 0.01f64;
    let norm = (2.0 * std::f64::consts::PI * var).sqrt();
    let prob = |i: usize, mid: f64, len: usize| {
        let d = i as f64 - mid;
        (-(d * d) / (len * len) as f64 / (2.0 * var)).exp() / norm
    };
    let xs: Vec<f64> = (0..width)
        .map(|x| prob(x, (width as f64 - 1.0) / 2.0, width))
        .collect();
    let ys: Vec<f64> = (0..height)
        .map(|y| prob(y, height as f64 / 2.0, height))
        .collect();
    ys.iter()
        .flat_map(|y| xs.iter().map(move |x| y * x))
        .collect()
}

/// One patch: rows `y..y+h`, columns `x..x+w` of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    pub y: usize,
    pub x: usize,
    pub h: usize,
    pub w: usize,
}

/// Patches covering an `height x width` image, in the reference's order (columns outer, rows
/// inner).
pub fn patches(height: usize, width: usize, patch: usize, stride: usize) -> Vec<Patch> {
    let ys = patch_starts(height, patch, stride);
    let xs = patch_starts(width, patch, stride);
    let (h, w) = (patch.min(height), patch.min(width));
    xs.iter()
        .flat_map(|&x| ys.iter().map(move |&y| Patch { y, x, h, w }))
        .collect()
}

/// Accumulates weighted patch results (NCHW) and normalises at the end.
pub struct PatchBlender {
    sum: Tensor,
    weight: Tensor,
}

impl PatchBlender {
    pub fn new(
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(PatchBlender {
            sum: Tensor::zeros((batch, channels, height, width), DType::F32, device)?,
            weight: Tensor::zeros((batch, channels, height, width), DType::F32, device)?,
        })
    }

    /// Adds `result` (`[B, C, p.h, p.w]`) at the patch position with the Gaussian weight.
    pub fn add(&mut self, p: Patch, result: &Tensor) -> Result<()> {
        let (b, c, h, w) = result.dims4()?;
        let weights = Tensor::from_vec(
            gaussian_weights(h, w)
                .into_iter()
                .map(|v| v as f32)
                .collect::<Vec<_>>(),
            (1, 1, h, w),
            result.device(),
        )?
        .broadcast_as((b, c, h, w))?;
        let weighted = (result.to_dtype(DType::F32)? * &weights)?;
        let region = |t: &Tensor| t.narrow(2, p.y, h)?.narrow(3, p.x, w);
        let new_sum = (region(&self.sum)? + weighted)?;
        let new_weight = (region(&self.weight)? + weights)?;
        self.sum = self
            .sum
            .slice_assign(&[0..b, 0..c, p.y..p.y + h, p.x..p.x + w], &new_sum)?;
        self.weight = self
            .weight
            .slice_assign(&[0..b, 0..c, p.y..p.y + h, p.x..p.x + w], &new_weight)?;
        Ok(())
    }

    pub fn finish(self) -> Result<Tensor> {
        self.sum.div(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_cover_the_axis_and_end_at_the_border() {
        assert_eq!(patch_starts(1000, 1280, 1000), vec![0]);
        assert_eq!(patch_starts(2048, 1280, 1000), vec![0, 768]);
        assert_eq!(patch_starts(3000, 1280, 1000), vec![0, 1000, 1720]);
        for len in [1281, 1999, 2000, 2001, 4097] {
            let s = patch_starts(len, 1280, 1000);
            assert_eq!(*s.last().unwrap() + 1280, len);
            assert!(s.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 1000));
        }
    }

    #[test]
    fn blending_identical_patches_reproduces_the_image() {
        let dev = Device::Cpu;
        let img = Tensor::rand(0f32, 1f32, (1, 3, 40, 56), &dev).unwrap();
        let mut blender = PatchBlender::new(1, 3, 40, 56, &dev).unwrap();
        for p in patches(40, 56, 32, 20) {
            let crop = img
                .narrow(2, p.y, p.h)
                .unwrap()
                .narrow(3, p.x, p.w)
                .unwrap();
            blender.add(p, &crop).unwrap();
        }
        let out = blender.finish().unwrap();
        let err = crate::kernels::test_util::max_diff(&out, &img);
        assert!(err < 1e-5, "max error {err}");
    }

    #[test]
    fn gaussian_weights_follow_the_reference_centres() {
        let w = gaussian_weights(4, 5);
        // columns centred at (5-1)/2 = 2: symmetric around column 2
        assert!((w[0] - w[4]).abs() < 1e-15);
        // rows centred at 4/2 = 2: row 1 and row 3 equal, row 0 smaller
        assert!((w[5] - w[15]).abs() < 1e-15);
        assert!(w[0] < w[5]);
    }
}
