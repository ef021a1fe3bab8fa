//! The identity file (spec §6): one safetensors file holding the trained blocks, γ gates, the
//! learned token and the reference latents, with JSON metadata (format, base-model fingerprint,
//! architecture, training arguments, date, version). Stored by name under the user's data
//! directory unless a path is given.

use super::token::PromptTokens;
use super::trainer::block_prefix;
use super::HostSpec;
use crate::error::{Error, Result};
use crate::model::base::BaseModel;
use crate::personalize::block::PersonalizationBlock;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// `format` metadata value of this layout.
pub const FORMAT: &str = "pfstorer-identity/1";
/// The references' dlib-ID descriptors, `[references, 128]`, and their mean, `[128]`.
pub const EMBEDDINGS_KEY: &str = "id.embeddings";
pub const EMBEDDING_MEAN_KEY: &str = "id.embedding_mean";

/// File name suffix of identities stored by name.
pub const SUFFIX: &str = ".identity.safetensors";

/// Where identities stored by name live: `identities/` in [`crate::fsutil::data_home`]
/// (`$PFSTORER_HOME`, else `$XDG_DATA_HOME/pfstorer`, else `~/.local/share/pfstorer`).
pub fn identities_dir() -> Result<PathBuf> {
    Ok(crate::fsutil::data_home()?.join("identities"))
}

/// Checks an identity name: letters, digits, `-`, `_`, `.`; not starting with `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "invalid identity name {name:?}: use letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Whether an identity argument is a path (it has a path separator or ends in `.safetensors`)
/// rather than a name.
pub fn is_path_argument(path_or_name: &str) -> bool {
    path_or_name.contains(std::path::MAIN_SEPARATOR)
        || path_or_name.contains('/')
        || path_or_name.ends_with(".safetensors")
}

/// The file of an identity given by name or by path. A name (no path separator, no
/// `.safetensors` ending) resolves only inside [`identities_dir`], never to a file of the
/// current directory: `ids rm notes.txt` must not find `./notes.txt`. A path is taken as given;
/// callers that act on it check its header with [`check_identity_file`] first.
pub fn resolve(path_or_name: &str) -> Result<PathBuf> {
    if is_path_argument(path_or_name) {
        return Ok(PathBuf::from(path_or_name));
    }
    validate_name(path_or_name)?;
    Ok(identities_dir()?.join(format!("{path_or_name}{SUFFIX}")))
}

/// Largest safetensors header an identity may have: its JSON lists a few hundred tensors and
/// the metadata (reference list, training record), far below this.
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Checks that `path` is a regular file whose safetensors header carries this program's
/// identity `format` metadata, reading only the header. Anything else (a photo, a text file,
/// another model's safetensors, a FIFO) is an error naming the file, and the file is left alone.
pub fn check_identity_file(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let not_identity = |why: &str| {
        Error::Input(format!(
            "{}: not a pfstorer identity ({why})",
            crate::fsutil::printable_path(path)
        ))
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_identity("not a regular file"));
    }
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| not_identity("too short for a safetensors file"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len == 0 || header_len > MAX_HEADER_BYTES || 8 + header_len > meta.len() {
        return Err(not_identity("no safetensors header"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|_| not_identity("truncated safetensors header"))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| not_identity("no safetensors header"))?;
    let metadata: BTreeMap<String, String> = json
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => Ok(metadata),
        Some(other) if other.starts_with("pfstorer-identity/") => Err(Error::Input(format!(
            "{}: identity format {other:?} is not supported (expected {FORMAT})",
            crate::fsutil::printable_path(path)
        ))),
        _ => Err(not_identity(
            "a safetensors file without pfstorer identity metadata",
        )),
    }
}

/// Identities stored by name: `(name, path)`, sorted.
pub fn list_stored() -> Result<Vec<(String, PathBuf)>> {
    let dir = identities_dir()?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(SUFFIX) {
            if !name.starts_with('.') {
                out.push((name.to_string(), entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A loaded (or freshly trained) identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Tensors by stored name, on the CPU in f32.
    pub tensors: HashMap<String, Tensor>,
    /// `__metadata__` entries (JSON strings where structured).
    pub metadata: BTreeMap<String, String>,
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::Input(format!(
        "{}: not a usable identity file ({what}); the file may be truncated or corrupt",
        path.display()
    ))
}

impl Identity {
    /// Loads an identity by name or path (see [`resolve`]).
    pub fn load(path_or_name: &str) -> Result<Self> {
        let path = resolve(path_or_name)?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::Input(format!(
                "identity {path_or_name:?} not found ({}); `pfstorer ids list` shows stored identities",
                path.display()
            )));
        }
        Self::load_file(&path)
    }

    pub fn load_file(path: &Path) -> Result<Self> {
        // The header first: a file that is not an identity is refused without reading it all.
        check_identity_file(path)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| corrupt(path, &e.to_string()))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(Error::Input(format!(
                    "{}: identity format {other:?} is not supported (expected {FORMAT})",
                    path.display()
                )))
            }
            None => return Err(corrupt(path, "no pfstorer identity metadata")),
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| corrupt(path, &e.to_string()))?
            .into_iter()
            // f16 (identities since the faces work) and f32 (older ones) alike, in f32.
            .map(|(k, t)| match t.dtype() {
                DType::F16 | DType::BF16 => t.to_dtype(DType::F32).map(|t| (k, t)),
                _ => Ok((k, t)),
            })
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let identity = Identity { tensors, metadata };
        for host in identity.hosts()? {
            for spec in PersonalizationBlock::parameter_specs(host.dim) {
                let key = format!("{}.{}", block_prefix(&host.path), spec.key);
                let t = identity.tensor(&key)?;
                if t.dims() != spec.shape.as_slice() {
                    return Err(corrupt(path, &format!("`{key}` has shape {:?}", t.dims())));
                }
            }
        }
        let token = identity.tensor("token.embedding")?;
        if token.rank() != 2 || token.dim(0)? != 1 || token.dim(1)? == 0 {
            return Err(corrupt(
                path,
                &format!(
                    "`token.embedding` has shape {:?}, expected [1, width]",
                    token.dims()
                ),
            ));
        }
        if let Some(init) = identity.tensors.get("token.init_embedding") {
            if init.dims() != token.dims() {
                return Err(corrupt(
                    path,
                    &format!(
                        "`token.init_embedding` has shape {:?}, the token {:?}",
                        init.dims(),
                        token.dims()
                    ),
                ));
            }
        }
        let latents = identity.tensor("ref.latents")?;
        if latents.rank() != 4 || latents.dims().contains(&0) {
            return Err(corrupt(
                path,
                &format!(
                    "`ref.latents` has shape {:?}, expected [references, channels, height, width]",
                    latents.dims()
                ),
            ));
        }
        // A NaN or infinity anywhere would turn every restoration black.
        let mut names: Vec<&String> = identity.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &identity.tensors[name];
            if t.dtype().is_float() {
                let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(corrupt(
                        path,
                        &format!("`{name}` holds NaN or infinite values"),
                    ));
                }
            }
        }
        Ok(identity)
    }

    /// Whether [`Identity::save`] writes the trained tensors in f16: a finished identity does
    /// (half the file; the restore it gives stays within the f16 parity bound, see
    /// `tests/personalize_model.rs`), a checkpoint keeps f32 so `--resume` continues bit for bit.
    pub fn stores_half(&self) -> bool {
        !self.metadata.contains_key("optimizer_steps")
    }

    /// Writes the identity atomically to `path` (see [`Identity::stores_half`]); refuses an
    /// existing file unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        crate::fsutil::check_overwrite(path, force)?;
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut buffers = Vec::with_capacity(names.len());
        let half = self.stores_half();
        for name in &names {
            let t = self.tensors[*name].to_device(&Device::Cpu)?;
            // The descriptors stay f32: they are small, and distances near 0.6 decide matches.
            if half && !name.starts_with("id.") {
                let values: Vec<half::f16> = t.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                buffers.push((
                    name.to_string(),
                    t.dims().to_vec(),
                    bytes,
                    safetensors::Dtype::F16,
                ));
            } else {
                let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                buffers.push((
                    name.to_string(),
                    t.dims().to_vec(),
                    bytes,
                    safetensors::Dtype::F32,
                ));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, bytes, dtype)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Input(format!("identity tensor `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        let data = safetensors::tensor::serialize(views, Some(metadata))
            .map_err(|e| Error::Input(format!("cannot serialise identity: {e}")))?;
        crate::fsutil::write_atomic(path, crate::fsutil::WriteMode::from_force(force), |tmp| {
            std::fs::write(tmp, &data).map_err(|e| Error::io(tmp, e))
        })
    }

    /// The dlib-ID descriptors of the reference photos (`[references, 128]`), when the identity
    /// was made with them (pfstorer after the faces work); `None` for older identities.
    pub fn reference_embeddings(&self) -> Result<Option<Vec<Vec<f32>>>> {
        match self.tensors.get(EMBEDDINGS_KEY) {
            Some(t) => Ok(Some(t.to_dtype(DType::F32)?.to_vec2()?)),
            None => Ok(None),
        }
    }

    /// The mean of [`Identity::reference_embeddings`]: what faces are matched against.
    pub fn embedding_mean(&self) -> Result<Option<Vec<f32>>> {
        match self.tensors.get(EMBEDDING_MEAN_KEY) {
            Some(t) => Ok(Some(t.to_dtype(DType::F32)?.to_vec1()?)),
            None => Ok(None),
        }
    }

    /// Stores the references' descriptors and their mean.
    pub fn set_embeddings(&mut self, embeddings: &[Vec<f32>]) -> Result<()> {
        let n = embeddings.len();
        let dim = embeddings.first().map(Vec::len).unwrap_or(0);
        if n == 0 || dim == 0 || embeddings.iter().any(|e| e.len() != dim) {
            return Err(Error::Input("identity embeddings: empty or ragged".into()));
        }
        let flat: Vec<f32> = embeddings.iter().flatten().copied().collect();
        let mean: Vec<f32> = (0..dim)
            .map(|k| embeddings.iter().map(|e| e[k]).sum::<f32>() / n as f32)
            .collect();
        self.tensors.insert(
            EMBEDDINGS_KEY.into(),
            Tensor::from_vec(flat, (n, dim), &Device::Cpu)?,
        );
        self.tensors.insert(
            EMBEDDING_MEAN_KEY.into(),
            Tensor::from_vec(mean, dim, &Device::Cpu)?,
        );
        Ok(())
    }

    pub fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| Error::Input(format!("identity file lacks tensor `{key}`")))
    }

    pub fn name(&self) -> &str {
        self.metadata.get("name").map(String::as_str).unwrap_or("")
    }

    /// The hosts recorded in the metadata.
    pub fn hosts(&self) -> Result<Vec<HostSpec>> {
        let json = self
            .metadata
            .get("hosts")
            .ok_or_else(|| Error::Input("identity metadata lacks `hosts`".into()))?;
        serde_json::from_str(json)
            .map_err(|e| Error::Input(format!("identity metadata `hosts`: {e}")))
    }

    /// Refuses an identity trained on another base model.
    pub fn check_base(&self, fingerprint: &str) -> Result<()> {
        match self.metadata.get("base_fingerprint") {
            Some(f) if f == fingerprint => Ok(()),
            Some(f) => Err(Error::Input(format!(
                "identity {:?} was trained for another base model (fingerprint {}…, this model {}…); \
                 personalize again with this --base",
                self.name(),
                &f[..f.len().min(12)],
                &fingerprint[..fingerprint.len().min(12)]
            ))),
            None => Err(Error::Input("identity metadata lacks `base_fingerprint`".into())),
        }
    }

    /// The personalization blocks on `device` in `dtype`, checked against `hosts` (the UNet's).
    pub fn blocks(
        &self,
        hosts: &[HostSpec],
        dtype: DType,
        device: &Device,
    ) -> Result<BTreeMap<String, PersonalizationBlock>> {
        let stored = self.hosts()?;
        if stored != hosts {
            let paths = |hs: &[HostSpec]| hs.iter().map(|h| h.path.clone()).collect::<Vec<_>>();
            if paths(&stored) != paths(hosts) {
                return Err(Error::Input(format!(
                    "identity blocks {:?} do not fit this UNet's hosts {:?}",
                    paths(&stored),
                    paths(hosts)
                )));
            }
            // Same places, other sizes: say which size differs.
            let describe = |h: &HostSpec| {
                format!(
                    "{} ({} wide, {} heads of {})",
                    h.path, h.dim, h.heads, h.d_head
                )
            };
            let (s, h) = stored
                .iter()
                .zip(hosts)
                .find(|(s, h)| s != h)
                .expect("the lists differ");
            return Err(Error::Input(format!(
                "identity block {} does not fit this UNet's {}",
                describe(s),
                describe(h)
            )));
        }
        let map: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("pers."))
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        let vb = candle_nn::VarBuilder::from_tensors(map, dtype, device);
        hosts
            .iter()
            .map(|h| {
                let block = PersonalizationBlock::new(
                    h.dim,
                    h.heads,
                    h.d_head,
                    vb.pp(block_prefix(&h.path)),
                )?;
                Ok((h.path.clone(), block))
            })
            .collect()
    }

    /// The learned token `[1, width]`.
    pub fn token(&self, device: &Device) -> Result<Tensor> {
        Ok(self.tensor("token.embedding")?.to_device(device)?)
    }

    /// Number of stored reference latents.
    pub fn reference_count(&self) -> Result<usize> {
        Ok(self.tensor("ref.latents")?.dim(0)?)
    }

    /// Reference latent `index` (`[1, 4, h, w]`).
    pub fn reference_latent(&self, index: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let latents = self.tensor("ref.latents")?;
        let k = latents.dim(0)?;
        if index >= k {
            return Err(Error::Input(format!(
                "reference index {index} out of range: the identity holds {k} references"
            )));
        }
        Ok(latents
            .narrow(0, index, 1)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// The positive prompt's context with the learned token (`[1, 77, C]`), and its tokens.
    pub fn positive_context(&self, base: &BaseModel) -> Result<(Tensor, PromptTokens)> {
        let prompt = PromptTokens::default_positive(&base.tokenizer)?;
        let token = self.token(&base.device)?.to_dtype(base.dtype)?;
        let context = prompt.context(base.text_encoder()?, Some(&token))?;
        Ok((context, prompt))
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC, RFC 3339).
pub fn utc_timestamp(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// What the identity metadata records besides the trained tensors.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityInfo {
    pub name: String,
    pub base_fingerprint: String,
    /// `(sha256, crop)` per reference, in the stored latents' order.
    pub ref_sources: Vec<serde_json::Value>,
    /// Training arguments (seed, iterations, learning rates, …) as JSON.
    pub training: serde_json::Value,
}

impl Identity {
    /// The identity of a (partly) trained run.
    pub fn from_trainer(
        trainer: &super::trainer::Trainer,
        info: &IdentityInfo,
    ) -> Result<Identity> {
        let params = &trainer.params;
        let mut tensors = HashMap::new();
        let (ica, gammas) = params.block_vars()?;
        let mut gamma_means = BTreeMap::new();
        for (name, var) in &ica {
            tensors.insert(name.clone(), var.as_tensor().copy()?);
        }
        for (name, var) in &gammas {
            let g = var.as_tensor().copy()?;
            let mean: f32 = g.mean_all()?.to_scalar()?;
            let host = name
                .trim_start_matches("pers.")
                .trim_end_matches(".gamma")
                .to_string();
            gamma_means.insert(host, mean);
            tensors.insert(name.clone(), g);
        }
        tensors.insert("token.embedding".into(), params.token.as_tensor().copy()?);
        tensors.insert("token.init_embedding".into(), params.init_token.copy()?);
        tensors.insert("ref.latents".into(), trainer.reference_latents()?);
        let base = trainer.base;
        let negative = PromptTokens::default_negative(&base.tokenizer)?;
        let placeholder_id = base.tokenizer.token_id("*</w>");
        let json = |v: serde_json::Value| v.to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let metadata: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("name", info.name.clone()),
            ("base_fingerprint", info.base_fingerprint.clone()),
            (
                "vae_scale_factor",
                base.config.diffusion.scale_factor.to_string(),
            ),
            (
                "hosts",
                json(serde_json::to_value(&params.hosts).map_err(json_err)?),
            ),
            ("unet", format!("{:?}", base.config.unet)),
            (
                "placeholder",
                json(serde_json::json!({"text": super::PLACEHOLDER, "id": placeholder_id})),
            ),
            (
                "init_word",
                json(serde_json::json!({
                    "text": super::INIT_WORD,
                    "id": super::token::init_word_id(&base.tokenizer)?
                })),
            ),
            (
                "prompts",
                json(serde_json::json!({"positive": trainer.prompt, "negative": negative})),
            ),
            ("ref_path", "sd_no_sft".into()),
            ("null_lq", "vae_mean(zeros)".into()),
            (
                "ref_sources",
                json(serde_json::Value::Array(info.ref_sources.clone())),
            ),
            ("training", json(info.training.clone())),
            ("iterations_done", trainer.iteration.to_string()),
            (
                "gamma_mean",
                json(serde_json::to_value(&gamma_means).map_err(json_err)?),
            ),
            ("date", utc_timestamp(now)),
            ("version", format!("pfstorer {}", env!("CARGO_PKG_VERSION"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(Identity { tensors, metadata })
    }

    /// A resumable checkpoint: the identity so far plus the optimizer moments
    /// (`optim.*` tensors, `optimizer_steps` metadata).
    pub fn checkpoint_from_trainer(
        trainer: &super::trainer::Trainer,
        info: &IdentityInfo,
    ) -> Result<Identity> {
        let mut identity = Self::from_trainer(trainer, info)?;
        let (moments, steps) = trainer.optimizer_state()?;
        identity.tensors.extend(moments);
        identity
            .metadata
            .insert("optimizer_steps".into(), steps.to_string());
        Ok(identity)
    }

    /// The optimizer moments of a checkpoint and the updates they cover, if it has them.
    pub fn optimizer_state(&self) -> Option<(HashMap<String, Tensor>, usize)> {
        let steps = self.metadata.get("optimizer_steps")?.parse().ok()?;
        let moments = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("optim."))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Some((moments, steps))
    }
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Input(format!("identity metadata: {e}"))
}
