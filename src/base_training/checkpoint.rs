//! What base training writes: the finished base checkpoint (every tensor of the init checkpoint
//! under its own name, the trained ones replaced) and the resumable training checkpoint (the
//! trained tensors, AdamW's moments and where the run stood).

use crate::error::{Error, Result};
use crate::fsutil::{write_atomic, WriteMode};
use crate::weights::TensorStore;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

/// Metadata key holding the training record (JSON) in both files.
pub const TRAINING_KEY: &str = "pfstorer_base_training";
/// Metadata key of the step count reached (training checkpoint).
pub const STEPS_KEY: &str = "steps_done";

/// A tensor for the safetensors writer: a trained value, or one read from the init
/// checkpoint only when the writer reaches it (a full-size checkpoint is ~5 GB; one tensor at a
/// time is held).
enum Entry<'a> {
    Ready(Tensor),
    Stored {
        store: &'a TensorStore,
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        failure: &'a RefCell<Option<Error>>,
    },
}

fn st_dtype(dtype: DType) -> Result<safetensors::Dtype> {
    Ok(match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F64 => safetensors::Dtype::F64,
        DType::I64 => safetensors::Dtype::I64,
        DType::U32 => safetensors::Dtype::U32,
        DType::U8 => safetensors::Dtype::U8,
        other => {
            return Err(Error::Weights(format!(
                "cannot store a {other:?} tensor in safetensors"
            )))
        }
    })
}

impl safetensors::View for Entry<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Entry::Ready(t) => safetensors::View::dtype(t),
            // Checked by `st_dtype` when the entry was made.
            Entry::Stored { dtype, .. } => st_dtype(*dtype).unwrap_or(safetensors::Dtype::U8),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Entry::Ready(t) => t.dims(),
            Entry::Stored { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::Ready(t) => safetensors::View::data(t).into_owned().into(),
            Entry::Stored {
                store,
                name,
                dtype,
                failure,
                ..
            } => {
                let loaded = store
                    .load(name, *dtype, &Device::Cpu)
                    .map(|t| safetensors::View::data(&t).into_owned());
                match loaded {
                    Ok(bytes) if bytes.len() == self.data_len() => Cow::Owned(bytes),
                    Ok(_) | Err(_) => {
                        // The writer cannot fail from here: remember why, write zeros, and
                        // the caller discards the file.
                        let why = loaded.err().unwrap_or_else(|| {
                            Error::Weights(format!("`{name}`: unexpected data size"))
                        });
                        failure.borrow_mut().get_or_insert(why);
                        Cow::Owned(vec![0; self.data_len()])
                    }
                }
            }
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Entry::Ready(t) => safetensors::View::data_len(t),
            Entry::Stored { dtype, shape, .. } => {
                shape.iter().product::<usize>() * dtype.size_in_bytes()
            }
        }
    }
}

/// Writes the trained base to `out` atomically: every tensor of `init` under its name and in its
/// stored precision, except the `trained` ones (f32). `mode` decides about an existing file.
pub fn write_base_checkpoint(
    out: &Path,
    init: &TensorStore,
    trained: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    mode: WriteMode,
) -> Result<()> {
    let failure = RefCell::new(None);
    let mut entries = Vec::with_capacity(init.shapes().len());
    for (name, (shape, dtype)) in init.shapes() {
        let entry = match trained.get(name) {
            Some(t) => {
                if t.dims() != shape.as_slice() {
                    return Err(Error::Weights(format!(
                        "trained `{name}` has shape {:?}, the init checkpoint {shape:?}",
                        t.dims()
                    )));
                }
                Entry::Ready(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            }
            None => {
                st_dtype(*dtype)?;
                Entry::Stored {
                    store: init,
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    failure: &failure,
                }
            }
        };
        entries.push((name.clone(), entry));
    }
    if let Some(name) = trained.keys().find(|k| !init.contains(k)) {
        return Err(Error::Weights(format!(
            "trained `{name}` is not in the init checkpoint"
        )));
    }
    write_atomic(out, mode, |tmp| {
        safetensors::serialize_to_file(entries, Some(metadata), tmp)
            .map_err(|e| Error::Weights(format!("{}: cannot write: {e}", tmp.display())))?;
        match failure.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// A saved training state.
pub struct TrainingState {
    /// Trained tensors by checkpoint name.
    pub trained: HashMap<String, Tensor>,
    /// AdamW moments (`optim.<name>.m|v`).
    pub moments: HashMap<String, Tensor>,
    pub steps_done: usize,
    /// The run's settings (JSON), compared on resume.
    pub training: serde_json::Value,
}

/// Writes a training state atomically (replacing the previous one).
pub fn save_state(path: &Path, state: &TrainingState) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = state
        .trained
        .iter()
        .chain(state.moments.iter())
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([
        (TRAINING_KEY.to_string(), state.training.to_string()),
        (STEPS_KEY.to_string(), state.steps_done.to_string()),
    ]);
    write_atomic(path, WriteMode::Replace, |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp)
            .map_err(|e| Error::Weights(format!("{}: cannot write: {e}", tmp.display())))
    })
}

/// Reads a training state written by [`save_state`].
pub fn load_state(path: &Path) -> Result<TrainingState> {
    let bad = |why: String| Error::Input(format!("{}: {why}", crate::fsutil::printable_path(path)));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a training checkpoint ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let training: serde_json::Value = meta
        .get(TRAINING_KEY)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("not a pfstorer base-training checkpoint".into()))?;
    let steps_done: usize = meta
        .get(STEPS_KEY)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step count".into()))?;
    let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(format!("unreadable tensors ({e})")))?;
    let (moments, trained): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(k, _)| k.starts_with("optim."));
    Ok(TrainingState {
        trained,
        moments,
        steps_done,
        training,
    })
}
