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

use super::rmsprop_fused::{self, Coeffs};
use crate::model::profile;

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
    ///
    /// Each gradient's sum of squares is an f32 sum; they are added in f64 in order, on the
    /// gradients' device, and read back once: one device synchronisation per step rather than
    /// one per parameter (the same value as adding them on the host).
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut total: Option<Tensor> = None;
        for g in grads.iter().flatten() {
            let sq = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?;
            total = Some(match total {
                None => sq,
                Some(t) => (t + sq)?,
            });
        }
        Ok(match total {
            None => 0.0,
            Some(t) => t.to_scalar::<f64>()?.sqrt(),
        })
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
        let dev = self.vars.first().map(|v| v.device().clone());
        let dev = dev.unwrap_or(candle_core::Device::Cpu);
        let norm = profile::section("optim.grad_norm", &dev, || Self::grad_norm(grads))?;
        let clip = match self.cfg.max_grad_norm {
            Some(m) => (m / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self
            .lr_override
            .unwrap_or_else(|| scheduled_lr(self.cfg.lr, self.cfg.warmup_steps, self.step));
        let clip = (clip < 1.0).then_some(clip);
        let k = Coeffs::new(clip, self.cfg.alpha, self.cfg.eps, lr);
        let (alpha, eps) = (self.cfg.alpha, self.cfg.eps);
        profile::section("optim.update", &dev, || {
            for ((var, sq), g) in self.vars.iter().zip(self.square_avg.iter_mut()).zip(grads) {
                let Some(g) = g else { continue };
                // Two in-place passes where they apply (f32 on the CPU or CUDA): the same values.
                if rmsprop_fused::usable(var.as_tensor(), sq, g) {
                    rmsprop_fused::update(var.as_tensor(), sq, g, k)?;
                } else {
                    composite_update(var, sq, g, clip, alpha, eps, lr)?;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
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
    /// The tensors share the live state's storage, which the next step updates in place: save
    /// them before stepping again, or copy them.
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
            // A copy of its own: the update writes the state in place.
            *sq = t.to_dtype(DType::F32)?.to_device(sq.device())?.copy()?;
        }
        self.step = step;
        Ok(())
    }
}

/// One update of `var` and its squared average `sq` by `g` with candle ops (any dtype and
/// device): the definition that [`rmsprop_fused`] computes in two passes.
fn composite_update(
    var: &Var,
    sq: &mut Tensor,
    g: &Tensor,
    clip: Option<f64>,
    alpha: f64,
    eps: f64,
    lr: f64,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?;
    let g = match clip {
        Some(c) => (g * c)?,
        None => g,
    };
    let next_sq = ((&*sq * alpha)? + (g.sqr()? * (1.0 - alpha))?)?;
    let denom = (next_sq.sqrt()? + eps)?;
    let upd = ((g / denom)? * lr)?;
    let p = var.as_tensor();
    let next = (p.to_dtype(DType::F32)? - upd)?.to_dtype(p.dtype())?;
    var.set(&next)?;
    *sq = next_sq;
    Ok(())
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

    #[test]
    fn fused_update_is_the_composite_bit_for_bit() {
        let dev = candle_core::Device::Cpu;
        let n = 4099;
        let rand = |std: f32| Tensor::randn(0f32, std, n, &dev).unwrap();
        // Values across many magnitudes, zeros and a negative zero among them.
        let mut g = rand(1.0).to_vec1::<f32>().unwrap();
        for (i, x) in g.iter_mut().enumerate() {
            *x *= 10f32.powi((i % 13) as i32 - 6);
        }
        g[0] = 0.0;
        g[1] = -0.0;
        let g = Tensor::from_vec(g, n, &dev).unwrap();
        for clip in [None, Some(0.37)] {
            let (p0, sq0) = (rand(0.5), rand(1e-3).abs().unwrap());
            let (va, vb) = (
                Var::from_tensor(&p0.copy().unwrap()).unwrap(),
                Var::from_tensor(&p0.copy().unwrap()).unwrap(),
            );
            let (mut sa, sb) = (sq0.copy().unwrap(), sq0.copy().unwrap());
            let k = Coeffs::new(clip, 0.99, 1e-8, 3e-4);
            for _ in 0..3 {
                composite_update(&va, &mut sa, &g, clip, 0.99, 1e-8, 3e-4).unwrap();
                assert!(rmsprop_fused::usable(vb.as_tensor(), &sb, &g));
                rmsprop_fused::update(vb.as_tensor(), &sb, &g, k).unwrap();
            }
            let bits = |t: &Tensor| {
                t.to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&sa), bits(&sb), "square_avg, clip {clip:?}");
            assert_eq!(
                bits(va.as_tensor()),
                bits(vb.as_tensor()),
                "param, clip {clip:?}"
            );
            assert_ne!(bits(va.as_tensor()), bits(&p0), "the parameter moved");
        }
        // Not applicable: another dtype, or a gradient of another shape.
        let b = Tensor::zeros(n, DType::BF16, &dev).unwrap();
        let f = Tensor::zeros(n, DType::F32, &dev).unwrap();
        assert!(!rmsprop_fused::usable(&b, &f, &f));
        assert!(!rmsprop_fused::usable(&f, &f, &f.narrow(0, 0, 7).unwrap()));
    }

    #[test]
    fn grad_norm_adds_the_f32_sums_in_f64_in_order() {
        let dev = candle_core::Device::Cpu;
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
        let vals = [
            vec![1e-3f32, 3.0, -7.25, 1e4],
            vec![0.1f32; 1000],
            vec![-2.5e-4f32, 1.0 / 3.0],
        ];
        let grads = vec![
            Some(t(vals[0].clone())),
            None,
            Some(t(vals[1].clone()).to_dtype(DType::BF16).unwrap()),
            Some(t(vals[2].clone())),
        ];
        // The host sum the norm is defined by: each gradient's f32 sum of squares, read back
        // and added in f64 in order.
        let mut want = 0f64;
        for g in grads.iter().flatten() {
            let g = g.to_dtype(DType::F32).unwrap();
            want += g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        let got = RmsProp::grad_norm(&grads).unwrap();
        assert_eq!(
            got.to_bits(),
            want.sqrt().to_bits(),
            "{got} vs {}",
            want.sqrt()
        );
        assert_eq!(RmsProp::grad_norm(&[None, None]).unwrap(), 0.0);
        assert_eq!(RmsProp::grad_norm(&[]).unwrap(), 0.0);
    }
}
