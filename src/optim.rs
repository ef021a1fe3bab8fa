//! AdamW with decoupled weight decay (the update of `torch.optim.AdamW` and `candle_nn::AdamW`)
//! whose moments can be saved and restored, so an interrupted personalization resumes exactly
//! where it stopped (candle's optimizer keeps its moments private).

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Hyper-parameters of one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    first_moment: Var,
    second_moment: Var,
}

/// One parameter group: named variables sharing [`AdamWParams`].
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros =
                    || -> Result<Var> { Ok(Var::zeros(var.shape(), var.dtype(), var.device())?) };
                Ok(Slot {
                    name,
                    first_moment: zeros()?,
                    second_moment: zeros()?,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            params,
            step: 0,
        })
    }

    /// Updates taken so far (the bias-correction step count).
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update from `grads`; variables without a gradient are left alone (as torch does).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(|var| grads.get(var.as_tensor()).cloned())
    }

    /// One update with each variable's gradient given by `grad_of` (`None`: left alone), for
    /// gradients that were accumulated or averaged outside a [`GradStore`].
    pub fn step_with(&mut self, grad_of: impl Fn(&Var) -> Option<Tensor>) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let correction1 = 1.0 / (1.0 - p.beta1.powi(self.step as i32));
        let correction2 = 1.0 / (1.0 - p.beta2.powi(self.step as i32));
        for slot in &self.slots {
            let theta = slot.var.as_tensor();
            let Some(grad) = grad_of(&slot.var) else {
                continue;
            };
            let grad = &grad;
            let m = ((slot.first_moment.as_tensor() * p.beta1)? + (grad * (1.0 - p.beta1))?)?;
            let v =
                ((slot.second_moment.as_tensor() * p.beta2)? + (grad.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m * correction1)?;
            let v_hat = (&v * correction2)?;
            let decayed = (theta * (1.0 - p.lr * p.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            slot.var.set(&(decayed - (update * p.lr)?)?)?;
            slot.first_moment.set(&m)?;
            slot.second_moment.set(&v)?;
        }
        Ok(())
    }

    /// The moments as `<prefix>.<name>.m` / `.v` tensors (CPU, f32) and the step count.
    pub fn state(&self, prefix: &str) -> Result<(HashMap<String, Tensor>, usize)> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            let cpu = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            out.insert(
                format!("{prefix}.{}.m", slot.name),
                cpu(slot.first_moment.as_tensor())?,
            );
            out.insert(
                format!("{prefix}.{}.v", slot.name),
                cpu(slot.second_moment.as_tensor())?,
            );
        }
        Ok((out, self.step))
    }

    /// Restores what [`AdamW::state`] saved; every moment must be present with its shape.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        step: usize,
    ) -> Result<()> {
        for slot in &self.slots {
            for (suffix, moment) in [("m", &slot.first_moment), ("v", &slot.second_moment)] {
                let key = format!("{prefix}.{}.{suffix}", slot.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Input(format!("checkpoint has no optimizer moment `{key}`"))
                })?;
                if t.dims() != moment.dims() {
                    return Err(Error::Input(format!(
                        "checkpoint moment `{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        moment.dims()
                    )));
                }
                moment.set(&t.to_dtype(moment.dtype())?.to_device(moment.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    fn params() -> AdamWParams {
        AdamWParams {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    fn loss(x: &Var) -> Tensor {
        // A fixed non-quadratic objective so that moments matter.
        let target = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        ((x.as_tensor() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sqr()
            .unwrap())
        .sum_all()
        .unwrap()
    }

    #[test]
    fn matches_candles_adamw() {
        let init = Tensor::new(&[1.0f32, 0.0, -1.0], &Device::Cpu).unwrap();
        let ours_var = Var::from_tensor(&init).unwrap();
        let theirs_var = Var::from_tensor(&init).unwrap();
        let mut ours = AdamW::new(vec![("x".into(), ours_var.clone())], params()).unwrap();
        let p = params();
        let mut theirs = candle_nn::AdamW::new(
            vec![theirs_var.clone()],
            candle_nn::ParamsAdamW {
                lr: p.lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
            },
        )
        .unwrap();
        for _ in 0..20 {
            ours.step(&loss(&ours_var).backward().unwrap()).unwrap();
            theirs.step(&loss(&theirs_var).backward().unwrap()).unwrap();
        }
        let diff =
            crate::kernels::test_util::max_diff(ours_var.as_tensor(), theirs_var.as_tensor());
        assert!(diff < 1e-6, "max abs difference to candle's AdamW {diff}");
        assert_eq!(ours.steps_taken(), 20);
    }

    #[test]
    fn saved_state_resumes_exactly() {
        let init = Tensor::new(&[1.0f32, 0.0, -1.0], &Device::Cpu).unwrap();
        let straight = Var::from_tensor(&init).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), straight.clone())], params()).unwrap();
        for _ in 0..10 {
            opt.step(&loss(&straight).backward().unwrap()).unwrap();
        }

        let split = Var::from_tensor(&init).unwrap();
        let mut first = AdamW::new(vec![("x".into(), split.clone())], params()).unwrap();
        for _ in 0..4 {
            first.step(&loss(&split).backward().unwrap()).unwrap();
        }
        let (state, step) = first.state("opt").unwrap();
        assert_eq!(step, 4);
        // A fresh optimizer (as after a restart) over the same values.
        let resumed_var = Var::from_tensor(split.as_tensor()).unwrap();
        let mut resumed = AdamW::new(vec![("x".into(), resumed_var.clone())], params()).unwrap();
        resumed.load_state("opt", &state, step).unwrap();
        for _ in 0..6 {
            resumed
                .step(&loss(&resumed_var).backward().unwrap())
                .unwrap();
        }
        let a: Vec<f32> = straight.as_tensor().to_vec1().unwrap();
        let b: Vec<f32> = resumed_var.as_tensor().to_vec1().unwrap();
        assert_eq!(a, b, "resumed run is bit-identical to the straight run");

        // Without the moments the continuation differs: the state is what makes it exact.
        let restarted_var = Var::from_tensor(split.as_tensor()).unwrap();
        let mut restarted =
            AdamW::new(vec![("x".into(), restarted_var.clone())], params()).unwrap();
        for _ in 0..6 {
            restarted
                .step(&loss(&restarted_var).backward().unwrap())
                .unwrap();
        }
        let c: Vec<f32> = restarted_var.as_tensor().to_vec1().unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn missing_or_misshaped_moments_are_refused() {
        let var = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), var)], params()).unwrap();
        let empty = HashMap::new();
        let err = opt.load_state("opt", &empty, 1).unwrap_err().to_string();
        assert!(err.contains("opt.x.m"), "{err}");
        let mut wrong = HashMap::new();
        wrong.insert(
            "opt.x.m".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt.load_state("opt", &wrong, 1).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }
}
