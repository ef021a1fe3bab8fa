//! Conversions between images and NCHW tensors, and the tensor-side resize and padding of the
//! restoration pipeline (bicubic as PyTorch's `F.interpolate`, reflect as `F.pad`).

use super::ImageF32;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// PyTorch `F.interpolate(mode="bicubic", align_corners=False)` of an NCHW tensor (on the CPU).
pub fn resize_bicubic_nchw(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let data: Vec<f32> = x
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let out = crate::imaging::resize::resize_bicubic_torch(&data, b * c, h, w, out_h, out_w)?;
    Ok(Tensor::from_vec(out, (b, c, out_h, out_w), &Device::Cpu)?.to_device(x.device())?)
}

/// HWC RGB [0, 1] image -> `[1, 3, H, W]` tensor in [-1, 1].
pub fn image_to_tensor(img: &ImageF32, device: &Device) -> Result<Tensor> {
    if img.channels != 3 {
        return Err(Error::Input(format!(
            "expected an RGB image, got {} channels",
            img.channels
        )));
    }
    let t = Tensor::from_vec(img.data.clone(), (img.height, img.width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(((t * 2.0)? - 1.0)?.contiguous()?.to_device(device)?)
}

/// `[1, C, H, W]` in [0, 1] -> HWC image.
pub fn tensor_to_image(t: &Tensor) -> Result<ImageF32> {
    let (_, c, h, w) = t.dims4()?;
    let data: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    Ok(ImageF32::new(w, h, c, data))
}

/// Reflect-pads the bottom and right to a multiple of `m` (no padding when already aligned).
pub fn pad_reflect_to_multiple(x: &Tensor, m: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad_h = (m - h % m) % m;
    let pad_w = (m - w % m) % m;
    let x = reflect_pad_end(x, 2, pad_h)?;
    reflect_pad_end(&x, 3, pad_w)
}

/// Appends `pad` reflected rows/columns (edge not repeated, as torch's `reflect`).
fn reflect_pad_end(x: &Tensor, dim: usize, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let n = x.dim(dim)?;
    if pad >= n {
        return Err(Error::Input(format!(
            "image side {n} too small to reflect-pad by {pad}"
        )));
    }
    let idx: Vec<u32> = (0..pad).map(|i| (n - 2 - i) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(Tensor::cat(&[x.clone(), x.index_select(&idx, dim)?], dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_padding_matches_torch_reflect() {
        let x = Tensor::arange(0f32, 5., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 5))
            .unwrap();
        let x = Tensor::cat(&[&x, &x, &x], 2).unwrap();
        let padded = pad_reflect_to_multiple(&x, 4).unwrap();
        assert_eq!(padded.dims(), &[1, 1, 4, 8]);
        // torch refuses a reflect pad as large as the side; so does pfstorer, with an error.
        let two_rows = x.narrow(2, 0, 2).unwrap();
        assert!(pad_reflect_to_multiple(&two_rows, 4).is_err());
        let row: Vec<f32> = padded
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // torch.nn.functional.pad(..., (0, 3), mode="reflect") of [0,1,2,3,4]
        assert_eq!(row, vec![0., 1., 2., 3., 4., 3., 2., 1.]);
    }
}
