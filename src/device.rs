//! Device and dtype selection from the CLI's `--device` / `--dtype` strings.
//!
//! `auto` (the default of both) picks the GPU when this build has CUDA and device 0 opens, and
//! the precision the device runs fastest without losing range: bf16 from compute capability 8.0
//! (Ampere) on, f16 below, f32 on the CPU. The choices themselves are pure functions
//! ([`choose_device`], [`choose_dtype`]) so every branch is tested on a machine without a GPU.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

/// What `--dtype` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeRequest {
    /// The device's fastest safe precision (see [`choose_dtype`]).
    Auto,
    Exact(DType),
}

/// The two kinds of device the choices distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// What the networks are used for: training keeps f32 whatever the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Inference,
    Training,
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N` (case-insensitive).
pub fn parse_device_request(spec: &str) -> Result<DeviceRequest> {
    let spec = spec.trim().to_ascii_lowercase();
    let bad = || {
        Error::Input(format!(
            "--device {spec}: expected auto, cpu, cuda or cuda:N"
        ))
    };
    match spec.as_str() {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" => Ok(DeviceRequest::Cuda(0)),
        _ => match spec.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .map(DeviceRequest::Cuda)
                .map_err(|_| bad()),
            None => Err(bad()),
        },
    }
}

/// Parses `auto`, `f32`, `f16` or `bf16` (and their long names).
pub fn parse_dtype_request(spec: &str) -> Result<DtypeRequest> {
    if spec.trim().eq_ignore_ascii_case("auto") {
        return Ok(DtypeRequest::Auto);
    }
    parse_dtype(spec).map(DtypeRequest::Exact).map_err(|_| {
        Error::Input(format!(
            "--dtype {}: expected auto, f32, f16 or bf16",
            spec.trim().to_ascii_lowercase()
        ))
    })
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens it (explicit devices only; see [`open_device`]
/// for `auto`).
pub fn parse_device(spec: &str) -> Result<Device> {
    match parse_device_request(spec)? {
        DeviceRequest::Auto => Err(Error::Input(format!(
            "--device {}: expected cpu, cuda or cuda:N",
            spec.trim().to_ascii_lowercase()
        ))),
        request => Ok(open_device(request)?.0),
    }
}

/// Why [`choose_device`] decided as it did, given what the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaProbe {
    /// The binary was built without the `cuda` feature.
    NotBuilt,
    /// Built with CUDA, but device 0 did not open (first line of the error).
    Unusable(String),
    /// Device 0 opened.
    Usable,
}

/// `auto`'s decision and its one-line reason, from what probing CUDA device 0 found.
pub fn choose_device(probe: &CudaProbe) -> (DeviceKind, String) {
    match probe {
        CudaProbe::NotBuilt => (DeviceKind::Cpu, "cpu (this build has no CUDA)".into()),
        CudaProbe::Unusable(why) => (
            DeviceKind::Cpu,
            format!("cpu (no usable CUDA device: {why})"),
        ),
        CudaProbe::Usable => (DeviceKind::Cuda, "cuda:0".into()),
    }
}

/// The precision to run in, and why. Explicit requests win (their device check is
/// [`check_dtype_on`]). `auto`: f32 for training and on the CPU (candle's CPU backend has no
/// bf16 matrix product and f16 is slower there than f32); on CUDA bf16 from compute
/// capability 8.0 (f32's range, tensor cores), f16 below; f32 when the capability is unknown.
pub fn choose_dtype(
    kind: DeviceKind,
    compute_capability: Option<(u32, u32)>,
    requested: DtypeRequest,
    workload: Workload,
) -> (DType, String) {
    if let DtypeRequest::Exact(dtype) = requested {
        return (dtype, dtype_name(dtype).into());
    }
    if workload == Workload::Training {
        return (DType::F32, "f32 (auto: training runs in f32)".into());
    }
    match (kind, compute_capability) {
        (DeviceKind::Cpu, _) => (DType::F32, "f32 (auto on the CPU)".into()),
        (DeviceKind::Cuda, Some((major, minor))) if major >= 8 => (
            DType::BF16,
            format!("bf16 (auto: compute capability {major}.{minor})"),
        ),
        (DeviceKind::Cuda, Some((major, minor))) => (
            DType::F16,
            format!("f16 (auto: compute capability {major}.{minor} has no fast bf16)"),
        ),
        (DeviceKind::Cuda, None) => (DType::F32, "f32 (auto: compute capability unknown)".into()),
    }
}

/// The short name of a precision, as `--dtype` spells it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// `cpu` or `cuda:N`.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Opens the requested device; returns it with the text of the one line saying which it is.
pub fn open_device(request: DeviceRequest) -> Result<(Device, String)> {
    match request {
        DeviceRequest::Cpu => Ok((Device::Cpu, "cpu".into())),
        DeviceRequest::Cuda(ordinal) => {
            let spec = format!("cuda:{ordinal}");
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Input(format!(
                    "--device {spec}: this pfstorer was built without CUDA support (rebuild with `--features cuda`)"
                )));
            }
            let device = Device::new_cuda(ordinal).map_err(|e| {
                Error::Input(format!(
                    "--device {spec}: no usable CUDA device ({})",
                    first_line(&e.to_string())
                ))
            })?;
            Ok((device, spec))
        }
        DeviceRequest::Auto => {
            let (probe, device) = if !candle_core::utils::cuda_is_available() {
                (CudaProbe::NotBuilt, None)
            } else {
                match Device::new_cuda(0) {
                    Ok(d) => (CudaProbe::Usable, Some(d)),
                    Err(e) => (CudaProbe::Unusable(first_line(&e.to_string())), None),
                }
            };
            let (_, why) = choose_device(&probe);
            Ok((device.unwrap_or(Device::Cpu), why))
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("unknown error").to_string()
}

/// Compute capability `(major, minor)` of a CUDA device; `None` on the CPU or when the driver
/// does not say.
#[cfg(feature = "cuda")]
pub fn compute_capability(device: &Device) -> Option<(u32, u32)> {
    let cuda = device.as_cuda_device().ok()?;
    let (major, minor) = cuda.cuda_stream().context().compute_capability().ok()?;
    Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?))
}

/// Without CUDA in the build there is no GPU to ask.
#[cfg(not(feature = "cuda"))]
pub fn compute_capability(_device: &Device) -> Option<(u32, u32)> {
    None
}

/// Free memory of a CUDA device in bytes (`cuMemGetInfo`); `None` on the CPU or when the
/// driver does not say.
#[cfg(feature = "cuda")]
pub fn free_memory(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(free as u64)
}

/// Without CUDA in the build there is no device memory to ask about.
#[cfg(not(feature = "cuda"))]
pub fn free_memory(_device: &Device) -> Option<u64> {
    None
}

/// The device and precision of a command, with the one line (`device: ...; dtype: ...`) that
/// says what was chosen.
pub fn resolve(
    device: DeviceRequest,
    dtype: DtypeRequest,
    workload: Workload,
) -> Result<(Device, DType, String)> {
    let (device, device_why) = open_device(device)?;
    let kind = if device.is_cuda() {
        DeviceKind::Cuda
    } else {
        DeviceKind::Cpu
    };
    let (dtype, dtype_why) = choose_dtype(kind, compute_capability(&device), dtype, workload);
    check_dtype_on(&device, dtype)?;
    Ok((
        device,
        dtype,
        format!("device: {device_why}; dtype: {dtype_why}"),
    ))
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Input(format!(
            "--dtype {other}: expected f32, f16 or bf16"
        ))),
    }
}

/// Refuses precisions the device cannot run: candle's CPU backend has no bf16 matrix product
/// (every linear layer and convolution), so bf16 is CUDA-only; f16 works on both.
pub fn check_dtype_on(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(Error::Input(
            "--dtype bf16 needs --device cuda (the CPU backend has no bf16 matrix product); use f32 or f16 on the CPU".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_requests_parse() {
        assert_eq!(parse_device_request("auto").unwrap(), DeviceRequest::Auto);
        assert_eq!(parse_device_request(" AUTO ").unwrap(), DeviceRequest::Auto);
        assert_eq!(parse_device_request("cpu").unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            parse_device_request("cuda").unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            parse_device_request("cuda:3").unwrap(),
            DeviceRequest::Cuda(3)
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "autox", ""] {
            let e = parse_device_request(bad).unwrap_err().to_string();
            assert!(e.starts_with("--device"), "{bad}: {e}");
            assert!(e.contains("auto, cpu, cuda or cuda:N"), "{bad}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn dtype_requests_parse() {
        assert_eq!(parse_dtype_request("auto").unwrap(), DtypeRequest::Auto);
        assert_eq!(parse_dtype_request("Auto").unwrap(), DtypeRequest::Auto);
        for (spec, dtype) in [
            ("f32", DType::F32),
            ("float16", DType::F16),
            ("half", DType::F16),
            ("bf16", DType::BF16),
            ("bfloat16", DType::BF16),
        ] {
            assert_eq!(
                parse_dtype_request(spec).unwrap(),
                DtypeRequest::Exact(dtype)
            );
        }
        let e = parse_dtype_request("f8").unwrap_err().to_string();
        assert_eq!(e, "--dtype f8: expected auto, f32, f16 or bf16");
    }

    #[test]
    fn auto_device_decisions() {
        assert_eq!(
            choose_device(&CudaProbe::NotBuilt),
            (DeviceKind::Cpu, "cpu (this build has no CUDA)".to_string())
        );
        let (kind, why) = choose_device(&CudaProbe::Unusable("no driver".into()));
        assert_eq!(kind, DeviceKind::Cpu);
        assert_eq!(why, "cpu (no usable CUDA device: no driver)");
        assert_eq!(
            choose_device(&CudaProbe::Usable),
            (DeviceKind::Cuda, "cuda:0".to_string())
        );
    }

    #[test]
    fn auto_dtype_decisions() {
        use DeviceKind::{Cpu, Cuda};
        use Workload::{Inference, Training};
        let auto = |kind, cc, workload| choose_dtype(kind, cc, DtypeRequest::Auto, workload).0;
        assert_eq!(auto(Cpu, None, Inference), DType::F32);
        assert_eq!(auto(Cuda, Some((9, 0)), Inference), DType::BF16);
        assert_eq!(auto(Cuda, Some((8, 0)), Inference), DType::BF16);
        assert_eq!(auto(Cuda, Some((8, 9)), Inference), DType::BF16);
        assert_eq!(auto(Cuda, Some((7, 5)), Inference), DType::F16);
        assert_eq!(auto(Cuda, Some((6, 1)), Inference), DType::F16);
        assert_eq!(auto(Cuda, None, Inference), DType::F32);
        assert_eq!(auto(Cuda, Some((9, 0)), Training), DType::F32);
        assert_eq!(auto(Cpu, None, Training), DType::F32);
        // Explicit values win everywhere (the CPU/bf16 check is separate).
        for kind in [Cpu, Cuda] {
            for workload in [Inference, Training] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let (chosen, why) =
                        choose_dtype(kind, Some((7, 0)), DtypeRequest::Exact(dtype), workload);
                    assert_eq!(chosen, dtype);
                    assert_eq!(why, dtype_name(dtype));
                }
            }
        }
        let (_, why) = choose_dtype(Cuda, Some((8, 6)), DtypeRequest::Auto, Inference);
        assert_eq!(why, "bf16 (auto: compute capability 8.6)");
    }

    #[test]
    fn cpu_resolution_of_this_build() {
        let (device, dtype, line) =
            resolve(DeviceRequest::Cpu, DtypeRequest::Auto, Workload::Inference).unwrap();
        assert!(device.is_cpu());
        assert_eq!(dtype, DType::F32);
        assert_eq!(line, "device: cpu; dtype: f32 (auto on the CPU)");
        let e = resolve(
            DeviceRequest::Cpu,
            DtypeRequest::Exact(DType::BF16),
            Workload::Inference,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--dtype bf16"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let (device, dtype, line) =
                resolve(DeviceRequest::Auto, DtypeRequest::Auto, Workload::Inference).unwrap();
            assert!(device.is_cpu());
            assert_eq!(dtype, DType::F32);
            assert_eq!(
                line,
                "device: cpu (this build has no CUDA); dtype: f32 (auto on the CPU)"
            );
            let e = resolve(
                DeviceRequest::Cuda(0),
                DtypeRequest::Auto,
                Workload::Inference,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("--device cuda:0: this pfstorer was built without CUDA"),
                "{e}"
            );
        }
    }
}
