//! RMSProp with torch's semantics, the reference code's warmup schedule, global grad-norm
//! clipping and gradient accumulation.
//!
//! torch.optim.RMSprop (no momentum, not centered, no weight decay):
//!   v <- alpha v + (1 - alpha) g^2;   p <- p - lr g / (sqrt(v) + eps)
//! Schedule (torch LambdaLR stepped after every optimizer step):
//!   lr_k = lr * min(1, (k + 1) / (warmup + 1)) for the k-th step (0-based).
//! Clipping (torch.nn.utils.clip_grad_norm_): with N the global L2 norm of all gradients,
//!   g <- g * min(1, max_norm / (N + 1e-6)).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmsPropConfig {
    pub lr: f64,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Linear warmup steps (150 in the paper).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Global grad-norm clip (10 in the paper); None disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
}

fn default_alpha() -> f64 {
    0.99
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> Option<f64> {
    Some(10.0)
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self {
            lr: 5e-7,
            alpha: default_alpha(),
            eps: default_eps(),
            warmup_steps: 150,
            max_grad_norm: default_clip(),
        }
    }
}

/// The learning rate of the k-th optimizer step (0-based).
pub fn scheduled_lr(base: f64, warmup: usize, step: usize) -> f64 {
    base * ((step + 1) as f64 / (warmup + 1) as f64).min(1.0)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for this step.
    pub lr: f64,
}

pub use crate::sorted_vars as named_vars;

#[derive(Debug)]
pub struct RmsProp {
    vars: Vec<Var>,
    square_avg: Vec<Tensor>,
    cfg: RmsPropConfig,
    step: usize,
    lr_override: Option<f64>,
}

impl RmsProp {
    pub fn config(&self) -> &RmsPropConfig {
        &self.cfg
    }

    /// Number of optimizer steps taken.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Global L2 norm of the gradients (missing gradients count as zero).
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            total += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
        Ok(total.sqrt())
    }

    /// One step with gradients aligned with the variables (None: no gradient, var untouched).
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<StepInfo> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        let norm = Self::grad_norm(grads)?;
        let clip = match self.cfg.max_grad_norm {
            Some(m) => (m / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self
            .lr_override
            .unwrap_or_else(|| scheduled_lr(self.cfg.lr, self.cfg.warmup_steps, self.step));
        let a = self.cfg.alpha;
        for ((var, sq), g) in self.vars.iter().zip(self.square_avg.iter_mut()).zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let g = if clip < 1.0 { (g * clip)? } else { g };
            let next_sq = ((&*sq * a)? + (g.sqr()? * (1.0 - a))?)?;
            let denom = (next_sq.sqrt()? + self.cfg.eps)?;
            let upd = ((g / denom)? * lr)?;
            let p = var.as_tensor();
            let next = (p.to_dtype(DType::F32)? - upd)?.to_dtype(p.dtype())?;
            var.set(&next)?;
            *sq = next_sq;
        }
        self.step += 1;
        Ok(StepInfo {
            grad_norm: norm,
            lr,
        })
    }

    /// Gradients of a `GradStore` aligned with the variables.
    pub fn grads_of(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect()
    }

    /// Optimizer state (squared averages by variable index, and the step count) for checkpoints.
    pub fn state(&self) -> (HashMap<String, Tensor>, usize) {
        let m = self
            .square_avg
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("square_avg.{i}"), t.clone()))
            .collect();
        (m, self.step)
    }

    /// Restore the state written by [`RmsProp::state`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, sq) in self.square_avg.iter_mut().enumerate() {
            let t = tensors.get(&format!("square_avg.{i}")).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimizer state lacks square_avg.{i}"))
            })?;
            if t.dims() != sq.dims() {
                candle_core::bail!(
                    "optimizer state square_avg.{i} has shape {:?}, expected {:?}",
                    t.dims(),
                    sq.dims()
                );
            }
            *sq = t.to_dtype(DType::F32)?.to_device(sq.device())?;
        }
        self.step = step;
        Ok(())
    }
}

impl Optimizer for RmsProp {
    type Config = RmsPropConfig;

    fn new(vars: Vec<Var>, cfg: RmsPropConfig) -> Result<Self> {
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let square_avg = vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), DType::F32, v.device()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            square_avg,
            cfg,
            step: 0,
            lr_override: None,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let g = self.grads_of(grads);
        self.step_with(&g).map(|_| ())
    }

    fn learning_rate(&self) -> f64 {
        self.lr_override
            .unwrap_or_else(|| scheduled_lr(self.cfg.lr, self.cfg.warmup_steps, self.step))
    }

    /// Fix the learning rate, overriding the warmup schedule.
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr_override = Some(lr);
    }
}

/// Sums gradients over micro-batches (gradient accumulation), aligned with a variable list.
#[derive(Debug)]
pub struct GradAccum {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
}

impl GradAccum {
    pub fn new(vars: &[Var]) -> Self {
        Self {
            vars: vars.to_vec(),
            sums: vec![None; vars.len()],
        }
    }

    /// Add the gradients of one micro-batch (its loss already scaled by 1/accumulation).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (v, s) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.detach();
                *s = Some(match s.take() {
                    None => g,
                    Some(prev) => (prev + g)?,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, resetting the accumulator.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        std::mem::replace(&mut self.sums, vec![None; self.vars.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_schedule() {
        assert!((scheduled_lr(1.0, 150, 0) - 1.0 / 151.0).abs() < 1e-15);
        assert!((scheduled_lr(1.0, 150, 149) - 150.0 / 151.0).abs() < 1e-15);
        assert_eq!(scheduled_lr(1.0, 150, 150), 1.0);
        assert_eq!(scheduled_lr(1.0, 0, 0), 1.0);
    }
}
