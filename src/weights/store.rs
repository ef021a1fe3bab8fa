//! Reading checkpoint files: PyTorch-Lightning `.ckpt` pickles (the `state_dict` inside) and
//! safetensors (memory-mapped). Both are exposed as one lazy name -> tensor store.

use super::pickle_guard::{check_pickle, PickleLimits};
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
                // Bound the pickle before candle's reader builds it, and every tensor by the
                // bytes its storage entry really has, before any allocation.
                let entry_sizes = guard_torch_zip(path)?;
                // Lightning checkpoints keep the weights under `state_dict`; plain torch.save of a
                // state dict has them at the root.
                let pth = match PthTensors::new(path, Some("state_dict")) {
                    Ok(p) if !p.tensor_infos().is_empty() => p,
                    _ => PthTensors::new(path, None).map_err(bad)?,
                };
                let mut shapes = BTreeMap::new();
                for (name, info) in pth.tensor_infos() {
                    check_tensor_extent(path, name, info, &entry_sizes)?;
                    shapes.insert(name.clone(), (info.layout.dims().to_vec(), info.dtype));
                }
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
            Backing::Safetensors(s) => {
                let tensor = s.load(name, &Device::Cpu)?;
                release_mapped_pages(s.get(name)?.data());
                tensor
            }
        };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn missing(&self, name: &str) -> Error {
        Error::Weights(format!("{}: no tensor `{name}`", self.path.display()))
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.shapes.get(name).map(|(_, d)| *d)
    }

    /// The shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Option<Shape> {
        self.shapes.get(name).map(|(s, _)| Shape::from(s.clone()))
    }
}

/// Drops the mapped file pages of a tensor already copied out of the map from this process's
/// resident set (they stay in the page cache and are read again if touched). Without this, a
/// loaded model's peak RSS is its weights twice: the copies plus every page of the mapped file.
fn release_mapped_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else {
            return;
        };
        if page == 0 || bytes.is_empty() {
            return;
        }
        // Only whole pages inside the tensor: its neighbours may still be read from the map.
        let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside a read-only private file mapping that stays
            // mapped; MADV_DONTNEED only drops resident pages, which the kernel re-reads from
            // the unchanged file on the next access, so every slice into the map stays valid.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

/// Most entries a `torch.save` zip may have (one per storage, plus a handful).
const MAX_ZIP_ENTRIES: usize = 1 << 20;
/// Largest ratio of unpacked to packed size accepted for a compressed entry (`torch.save` stores
/// entries uncompressed; this only bounds what a crafted archive can claim).
const MAX_COMPRESSION_RATIO: u64 = 1024;

/// Checks a torch zip's pickles against [`PickleLimits`] and returns every entry's size.
fn guard_torch_zip(path: &Path) -> Result<BTreeMap<String, u64>> {
    let refuse = |why: String| {
        Error::Weights(format!(
            "{}: refused as a checkpoint: {why}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| refuse(format!("not a readable zip ({e})")))?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(refuse(format!("{} zip entries", zip.len())));
    }
    let limits = PickleLimits::default();
    let mut sizes = BTreeMap::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| refuse(format!("zip entry {i} unreadable ({e})")))?;
        let name = entry
            .name()
            .map_err(|e| refuse(format!("zip entry {i} has an unreadable name ({e})")))?
            .into_owned();
        let size = entry.size();
        let packed = entry.compressed_size();
        let bound = if entry.compression() == zip::CompressionMethod::Stored {
            file_len
        } else {
            packed.saturating_mul(MAX_COMPRESSION_RATIO)
        };
        if size > bound {
            return Err(refuse(format!(
                "zip entry `{name}` claims {size} bytes from {packed} stored"
            )));
        }
        if name.ends_with("data.pkl") {
            if size > limits.max_bytes {
                return Err(refuse(format!(
                    "pickle `{name}` of {size} bytes (limit {})",
                    limits.max_bytes
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .by_ref()
                .take(limits.max_bytes + 1)
                .read_to_end(&mut data)
                .map_err(|e| refuse(format!("pickle `{name}` unreadable ({e})")))?;
            check_pickle(&data, &limits).map_err(|why| refuse(format!("`{name}`: {why}")))?;
        }
        sizes.insert(name, size);
    }
    Ok(sizes)
}

/// A tensor must fit in its storage entry: its shape is what candle allocates.
fn check_tensor_extent(
    path: &Path,
    name: &str,
    info: &candle_core::pickle::TensorInfo,
    entry_sizes: &BTreeMap<String, u64>,
) -> Result<()> {
    let refuse = |why: String| {
        Error::Weights(format!(
            "{}: tensor `{name}` {why}; the file is corrupt or crafted",
            path.display()
        ))
    };
    let elements = info
        .layout
        .dims()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| refuse(format!("has an overflowing shape {:?}", info.layout.dims())))?;
    let needed = elements
        .checked_mul(info.dtype.size_in_bytes() as u64)
        .and_then(|b| b.checked_add(info.layout.start_offset() as u64))
        .ok_or_else(|| refuse(format!("has an overflowing shape {:?}", info.layout.dims())))?;
    let available = entry_sizes
        .get(&info.path)
        .ok_or_else(|| refuse(format!("points at a missing storage `{}`", info.path)))?;
    if needed > *available {
        return Err(refuse(format!(
            "of shape {:?} needs {needed} bytes but its storage holds {available}",
            info.layout.dims()
        )));
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_again_after_their_pages_were_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        // Several pages per tensor, and a small one sharing pages with its neighbours.
        let big: Vec<f32> = (0..20_000).map(|i| (i as f32 * 0.37).sin()).collect();
        let small: Vec<f32> = vec![1.5, -2.5, 3.25];
        let tensors = [
            (
                "a",
                Tensor::from_vec(big.clone(), (100, 200), &Device::Cpu).unwrap(),
            ),
            (
                "b",
                Tensor::from_vec(small.clone(), 3, &Device::Cpu).unwrap(),
            ),
            (
                "c",
                Tensor::from_vec(big.clone(), 20_000, &Device::Cpu).unwrap(),
            ),
        ];
        candle_core::safetensors::save(
            &tensors
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
            &path,
        )
        .unwrap();
        let store = TensorStore::open(&path).unwrap();
        for _ in 0..2 {
            let a = store.load("a", DType::F32, &Device::Cpu).unwrap();
            assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), big);
            let b = store.load("b", DType::F32, &Device::Cpu).unwrap();
            assert_eq!(b.to_vec1::<f32>().unwrap(), small);
            let c = store.load("c", DType::F32, &Device::Cpu).unwrap();
            assert_eq!(c.to_vec1::<f32>().unwrap(), big);
        }
    }
}
