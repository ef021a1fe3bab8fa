//! Reading checkpoint files: PyTorch-Lightning `.ckpt` pickles (the `state_dict` inside) and
//! safetensors (memory-mapped). Both are exposed as one lazy name -> tensor store.

use crate::error::{Error, Result};
use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a checkpoint file is, judged by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A zip archive written by `torch.save` (Lightning `.ckpt`, `.pth`).
    TorchZip,
    Safetensors,
}

pub fn detect_format(path: &Path) -> Result<CheckpointFormat> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 16];
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return Ok(CheckpointFormat::TorchZip);
    }
    if n >= 9 && head[8] == b'{' {
        return Ok(CheckpointFormat::Safetensors);
    }
    if head.first() == Some(&0x80) {
        return Err(Error::Weights(format!(
            "{}: legacy (non-zip) torch pickle; re-save it with a current torch.save",
            path.display()
        )));
    }
    Err(Error::Weights(format!(
        "{}: not a checkpoint (neither a torch .ckpt zip nor safetensors)",
        path.display()
    )))
}

enum Backing {
    Pth(PthTensors),
    Safetensors(MmapedSafetensors),
}

/// A checkpoint opened lazily: names and shapes are known up front, data is read on demand.
pub struct TensorStore {
    path: PathBuf,
    backing: Backing,
    shapes: BTreeMap<String, (Vec<usize>, DType)>,
}

impl TensorStore {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |e: candle_core::Error| {
            Error::Weights(format!(
                "{}: cannot read checkpoint ({}); the file may be truncated or corrupt",
                path.display(),
                first_line(&e.to_string())
            ))
        };
        let (backing, shapes) = match detect_format(path)? {
            CheckpointFormat::TorchZip => {
                // Lightning checkpoints keep the weights under `state_dict`; plain torch.save of a
                // state dict has them at the root.
                let pth = match PthTensors::new(path, Some("state_dict")) {
                    Ok(p) if !p.tensor_infos().is_empty() => p,
                    _ => PthTensors::new(path, None).map_err(bad)?,
                };
                let shapes = pth
                    .tensor_infos()
                    .iter()
                    .map(|(k, info)| (k.clone(), (info.layout.dims().to_vec(), info.dtype)))
                    .collect();
                (Backing::Pth(pth), shapes)
            }
            CheckpointFormat::Safetensors => {
                // SAFETY: the file is mapped read-only; pfstorer never writes checkpoints in place.
                let st = unsafe { MmapedSafetensors::new(path) }.map_err(bad)?;
                let mut shapes = BTreeMap::new();
                for (name, view) in st.tensors() {
                    let dtype = DType::try_from(view.dtype()).map_err(bad)?;
                    shapes.insert(name, (view.shape().to_vec(), dtype));
                }
                (Backing::Safetensors(st), shapes)
            }
        };
        if shapes.is_empty() {
            return Err(Error::Weights(format!(
                "{}: the checkpoint holds no tensors",
                path.display()
            )));
        }
        Ok(TensorStore {
            path: path.to_path_buf(),
            backing,
            shapes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name with its shape and stored dtype, sorted by name.
    pub fn shapes(&self) -> &BTreeMap<String, (Vec<usize>, DType)> {
        &self.shapes
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// Loads one tensor onto `device` in `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = match &self.backing {
            Backing::Pth(p) => p.get(name)?.ok_or_else(|| self.missing(name))?,
            Backing::Safetensors(s) => s.load(name, &Device::Cpu)?,
        };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn missing(&self, name: &str) -> Error {
        Error::Weights(format!("{}: no tensor `{name}`", self.path.display()))
    }

    /// The shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Option<Shape> {
        self.shapes.get(name).map(|(s, _)| Shape::from(s.clone()))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
