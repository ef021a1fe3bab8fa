//! cuDNN's backward-data (`cudnnConvolutionBackwardData`) as a custom op: a convolution's input
//! gradient in one call on CUDA, for f32, and f16 and bf16 with f32 accumulation. Built with
//! the `cudnn` feature only; [`super::input_grad`] dispatches here for CUDA tensors and keeps
//! the composed path for everything else (the op's CPU body refuses). The values are checked
//! against the CPU by `tests/cuda_kernels.rs` in the GPU check.

use super::input_grad::ConvGradGeometry;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvBackwardData, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

// cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps its own.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        handles.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

/// `dx` of `conv2d(x, kernel)` for the output gradient `g`, through cuDNN. Both tensors are
/// made contiguous first (the descriptors are packed NCHW).
pub(super) fn backward_data(
    g: &Tensor,
    kernel: &Tensor,
    geometry: ConvGradGeometry,
) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_no_bwd(&kernel.contiguous()?, &CudnnBackwardData(geometry))
}

struct CudnnBackwardData(ConvGradGeometry);

impl candle_core::CustomOp2 for CudnnBackwardData {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-backward-data"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The dispatch sends only CUDA tensors here; the CPU has the composed path.
        candle_core::bail!("cuDNN backward-data runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        g_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if !g_l.is_contiguous() || !k_l.is_contiguous() {
            candle_core::bail!("cuDNN backward-data: operands must be contiguous");
        }
        let geo = &self.0;
        let storage = match (g.dtype(), k.dtype()) {
            (DType::F32, DType::F32) => launch::<f32, f32>(geo, g, g_l, k, k_l)?,
            // Half precision with f32 accumulation (cuDNN's PSEUDO_HALF / PSEUDO_BFLOAT16
            // configurations; bf16 has no other).
            (DType::F16, DType::F16) => launch::<half::f16, f32>(geo, g, g_l, k, k_l)?,
            (DType::BF16, DType::BF16) => launch::<half::bf16, f32>(geo, g, g_l, k, k_l)?,
            (a, b) => candle_core::bail!("cuDNN backward-data: unsupported dtypes {a:?}/{b:?}"),
        };
        Ok((storage, Shape::from(geo.input_dims().to_vec())))
    }
}

/// cuDNN takes `int` sizes.
fn int(v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("cuDNN backward-data: size {v} exceeds i32")))
}

fn dims(d: [usize; 4]) -> Result<[i32; 4]> {
    Ok([int(d[0])?, int(d[1])?, int(d[2])?, int(d[3])?])
}

fn launch<T, C>(
    geo: &ConvGradGeometry,
    g: &CudaStorage,
    g_l: &Layout,
    k: &CudaStorage,
    k_l: &Layout,
) -> Result<CudaStorage>
where
    T: CudaDType + DeviceRepr + ValidAsZeroBits + CudnnDataType + WithDType,
    C: CudnnDataType,
{
    let wrap = candle_core::Error::wrap;
    let dev = g.device().clone();
    let dy = g.as_cuda_slice::<T>()?.slice(g_l.start_offset()..);
    let w = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
    let cudnn = handle(&dev)?;
    let (p, s, d) = (int(geo.padding)?, int(geo.stride)?, int(geo.dilation)?);
    let conv = cudnn
        .create_conv2d::<C>(
            [p, p],
            [s, s],
            [d, d],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(wrap)?;
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let dx_desc = cudnn
        .create_4d_tensor::<T>(nchw, dims(geo.input_dims())?)
        .map_err(wrap)?;
    let w_desc = cudnn
        .create_4d_filter::<T>(nchw, dims([geo.c_out, geo.c_in, geo.k_h, geo.k_w])?)
        .map_err(wrap)?;
    let dy_desc = cudnn
        .create_4d_tensor::<T>(nchw, dims([geo.batch, geo.c_out, geo.out_h, geo.out_w])?)
        .map_err(wrap)?;
    let op = ConvBackwardData {
        conv: &conv,
        dx: &dx_desc,
        w: &w_desc,
        dy: &dy_desc,
    };
    let algo = op.pick_algorithm().map_err(wrap)?;
    let workspace_size = op.get_workspace_size(algo).map_err(wrap)?;
    let mut workspace = dev.alloc_zeros::<u8>(workspace_size)?;
    // Every element is written (beta = 0), so the output needs no zeroing.
    let mut dx = unsafe { dev.alloc::<T>(geo.input_dims().iter().product())? };
    unsafe {
        op.launch::<CudaSlice<u8>, _, _, _>(
            algo,
            Some(&mut workspace),
            (T::from_f64(1.0), T::from_f64(0.0)),
            &mut dx,
            &w,
            &dy,
        )
    }
    .map_err(wrap)?;
    Ok(CudaStorage::wrap_cuda_slice(dx, dev))
}
