//! A `VarBuilder` backend that checks a checkpoint against the model being built.
//!
//! Every tensor the model asks for is recorded. Missing and mis-shaped tensors do not abort the
//! build at the first one: a placeholder is returned and the problem remembered, so that
//! [`CheckedWeights::finish`] can list all of them in one error. Tensors in the file that the model
//! never asked for are summarised by prefix and count.

use super::store::TensorStore;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Where the tensors come from.
pub enum Source {
    Store(Arc<TensorStore>),
    /// Records names and shapes only; every tensor is a zero broadcast to the requested shape,
    /// so full-size models can be "built" without allocating their weights.
    ShapesOnly,
    /// Seeded random weights for benchmarks: matrices and kernels N(0, 1/fan_in), 1-D
    /// `*weight` 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1) (the fixtures' recipe). Each tensor
    /// is drawn from its own generator seeded by the seed and its name, so values do not depend
    /// on construction order.
    Random(u64),
}

#[derive(Default)]
struct Log {
    requested: BTreeMap<String, Vec<usize>>,
    missing: Vec<String>,
    misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Stored as an integer or bool where the model wants floating-point values.
    wrong_dtype: Vec<(String, DType)>,
}

#[derive(Clone)]
pub struct CheckedWeights {
    source: Arc<Source>,
    log: Arc<Mutex<Log>>,
    /// False for [`CheckedWeights::check_only`]: every check runs, no weight is read.
    materialise: bool,
}

/// What a successful check found besides the model's own tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Tensors requested by the model.
    pub used: usize,
    /// Tensors present in the file but not requested, grouped by their first two name
    /// components: (prefix, count).
    pub unused: Vec<(String, usize)>,
}

impl LoadReport {
    /// One line for the user, or `None` when every tensor was used.
    pub fn unused_summary(&self) -> Option<String> {
        if self.unused.is_empty() {
            return None;
        }
        let total: usize = self.unused.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = self
            .unused
            .iter()
            .map(|(p, n)| format!("{p}* ({n})"))
            .collect();
        Some(format!(
            "{total} tensors not used by the model: {}",
            parts.join(", ")
        ))
    }
}

impl CheckedWeights {
    pub fn new(source: Source) -> Self {
        CheckedWeights {
            source: Arc::new(source),
            log: Arc::new(Mutex::new(Log::default())),
            materialise: true,
        }
    }

    /// The same source and log, but tensors are only checked (name, shape, dtype) and served as
    /// zero-cost placeholders: for networks a task does not run, whose keys must still match.
    pub fn check_only(&self) -> Self {
        CheckedWeights {
            materialise: false,
            ..self.clone()
        }
    }

    pub fn from_store(store: Arc<TensorStore>) -> Self {
        Self::new(Source::Store(store))
    }

    pub fn shapes_only() -> Self {
        Self::new(Source::ShapesOnly)
    }

    /// A `VarBuilder` over this backend. All builders made from clones share one log.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every name the model requested with its shape.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.log.lock().unwrap().requested.clone()
    }

    /// Ends the build: an error listing every missing or mis-shaped tensor under `prefixes`, or a
    /// report of the file's tensors under `prefixes` that the model did not use.
    pub fn finish(&self, prefixes: &[&str]) -> Result<LoadReport> {
        let log = self.log.lock().unwrap();
        let what = match self.source.as_ref() {
            Source::Store(s) => s.path().display().to_string(),
            Source::ShapesOnly => "shape check".to_string(),
            Source::Random(_) => "random weights".to_string(),
        };
        if !log.missing.is_empty() || !log.misshaped.is_empty() || !log.wrong_dtype.is_empty() {
            let mut parts = Vec::new();
            if !log.missing.is_empty() {
                parts.push(format!(
                    "{} missing: {}",
                    log.missing.len(),
                    abbreviate(&log.missing)
                ));
            }
            if !log.misshaped.is_empty() {
                let items: Vec<String> = log
                    .misshaped
                    .iter()
                    .map(|(n, want, got)| format!("{n} (model {want:?}, file {got:?})"))
                    .collect();
                parts.push(format!(
                    "{} with the wrong shape: {}",
                    items.len(),
                    abbreviate(&items)
                ));
            }
            if !log.wrong_dtype.is_empty() {
                let items: Vec<String> = log
                    .wrong_dtype
                    .iter()
                    .map(|(n, stored)| format!("{n} (stored as {stored:?})"))
                    .collect();
                parts.push(format!(
                    "{} not floating-point: {}",
                    items.len(),
                    abbreviate(&items)
                ));
            }
            return Err(Error::Weights(format!(
                "{what}: does not match the configured architecture: {}",
                parts.join("; ")
            )));
        }
        let mut unused: BTreeMap<String, usize> = BTreeMap::new();
        if let Source::Store(store) = self.source.as_ref() {
            for name in store.shapes().keys() {
                let in_scope = prefixes.iter().any(|p| name.starts_with(p));
                if !in_scope || log.requested.contains_key(name) {
                    continue;
                }
                *unused.entry(group_prefix(name)).or_default() += 1;
            }
        }
        Ok(LoadReport {
            used: log.requested.len(),
            unused: unused.into_iter().collect(),
        })
    }

    /// Tensors in the file outside all of `prefixes` (other sub-models, EMA, loss, optimizer
    /// extras), grouped like [`LoadReport::unused`].
    pub fn outside(&self, prefixes: &[&str]) -> Vec<(String, usize)> {
        let mut groups: BTreeMap<String, usize> = BTreeMap::new();
        if let Source::Store(store) = self.source.as_ref() {
            for name in store.shapes().keys() {
                if !prefixes.iter().any(|p| name.starts_with(p)) {
                    *groups.entry(group_prefix(name)).or_default() += 1;
                }
            }
        }
        groups.into_iter().collect()
    }
}

/// The first two dot-separated components (`model_ema.diffusion_model`), or the whole name.
fn group_prefix(name: &str) -> String {
    let mut parts = name.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(_)) => format!("{a}.{b}."),
        (Some(a), Some(_), None) => format!("{a}."),
        _ => name.to_string(),
    }
}

fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(", ... and {} more", items.len() - SHOWN));
    }
    s
}

/// The seeded random value of tensor `name` (fan-in scaled normal for matrices and kernels,
/// around 1 for norm weights, small for biases): the same for a name and seed on every machine.
pub fn random_tensor(shape: &Shape, name: &str, seed: u64) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let name_hash = crate::seeds::fnv1a(name.as_bytes());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ name_hash);
    let dims = shape.dims();
    let n = shape.elem_count();
    let (mean, std) = if dims.len() >= 2 {
        (0.0, 1.0 / ((n / dims[0]).max(1) as f32).sqrt())
    } else if name.ends_with("weight") {
        (1.0, 0.1)
    } else {
        (0.0, 0.1)
    };
    let values: Vec<f32> = (0..n)
        .map(|_| mean + std * rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
}

fn placeholder(shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
}

impl SimpleBackend for CheckedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut log = self.log.lock().unwrap();
        log.requested
            .insert(name.to_string(), shape.dims().to_vec());
        match self.source.as_ref() {
            Source::ShapesOnly => placeholder(&shape, dtype, dev),
            Source::Random(_) if !self.materialise => placeholder(&shape, dtype, dev),
            Source::Random(seed) => random_tensor(&shape, name, *seed)?
                .to_dtype(dtype)?
                .to_device(dev),
            Source::Store(store) => match store.shape(name) {
                None => {
                    log.missing.push(name.to_string());
                    placeholder(&shape, dtype, dev)
                }
                Some(found) if found.dims() != shape.dims() => {
                    log.misshaped.push((
                        name.to_string(),
                        shape.dims().to_vec(),
                        found.dims().to_vec(),
                    ));
                    placeholder(&shape, dtype, dev)
                }
                Some(_) if dtype.is_float() && !store.dtype(name).is_some_and(|d| d.is_float()) => {
                    // An integer tensor is never a weight, whatever its shape: converting it
                    // would turn relabelled bits into numbers.
                    let stored = store.dtype(name).unwrap_or(DType::U8);
                    log.wrong_dtype.push((name.to_string(), stored));
                    placeholder(&shape, dtype, dev)
                }
                Some(_) if !self.materialise => placeholder(&shape, dtype, dev),
                Some(_) => {
                    drop(log);
                    store
                        .load(name, dtype, dev)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                }
            },
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.source.as_ref() {
            Source::ShapesOnly | Source::Random(_) => Err(candle_core::Error::Msg(format!(
                "a generated source cannot serve `{name}` without a shape"
            ))),
            Source::Store(store) => {
                if let Some(s) = store.shape(name) {
                    self.log
                        .lock()
                        .unwrap()
                        .requested
                        .insert(name.to_string(), s.dims().to_vec());
                    if !self.materialise {
                        return placeholder(&s, dtype, dev);
                    }
                }
                store
                    .load(name, dtype, dev)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.source.as_ref() {
            Source::ShapesOnly | Source::Random(_) => true,
            Source::Store(store) => store.contains(name),
        }
    }
}
