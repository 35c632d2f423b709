//! SFT (behaviour cloning on the three demonstrations) and DAA training on the single
//! preference, full batch, with exact trajectory log-probabilities.

use super::mdp::{N_TRAJ, Trajectory};
use super::policy::{GruPolicy, TreeEval};
use crate::train::loss::{Objective, PairStats, daa_loss};
use crate::train::optim::{RmsProp, RmsPropConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

/// Behaviour cloning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Full-batch optimizer steps on the three demonstrations.
    pub steps: usize,
    pub optim: RmsPropConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            optim: RmsPropConfig {
                lr: 1e-2,
                warmup_steps: 0,
                ..RmsPropConfig::default()
            },
        }
    }
}

/// DAA settings (shared by every objective and beta).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaaConfig {
    /// Full-batch optimizer steps on the single preference pair.
    pub steps: usize,
    pub optim: RmsPropConfig,
}

impl Default for DaaConfig {
    fn default() -> Self {
        Self {
            steps: 500,
            optim: RmsPropConfig {
                lr: 1e-2,
                warmup_steps: 0,
                ..RmsPropConfig::default()
            },
        }
    }
}

/// The trajectory probabilities at one logged step.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Optimizer steps taken before this snapshot (0 = the starting policy).
    pub step: usize,
    /// The 27 exact probabilities, enumeration order.
    pub probs: Vec<f64>,
}

/// What one training run produced.
#[derive(Debug, Clone)]
pub struct TrainTrace {
    /// Snapshots every `log_every` steps, plus the first and the last.
    pub snapshots: Vec<Snapshot>,
    /// Largest |sum of the 27 probabilities - 1| over EVERY step (not only logged ones).
    pub max_sum_error: f64,
    /// Largest out-of-distribution mass seen at any step, and the step.
    pub peak_ood: (usize, f64),
    /// Loss of the final policy.
    pub final_loss: f64,
    /// For DAA runs: the pair statistics of the final policy (implicit rewards, margin).
    pub final_stats: Option<PairStats>,
    /// The final policy evaluated on the tree (detached).
    pub final_eval: TreeEval,
}

impl TrainTrace {
    pub fn final_probs(&self) -> &[f64] {
        &self.snapshots.last().expect("at least one snapshot").probs
    }
}

struct Tracker {
    log_every: usize,
    snapshots: Vec<Snapshot>,
    max_sum_error: f64,
    peak_ood: (usize, f64),
}

impl Tracker {
    fn new(log_every: usize) -> Self {
        Self {
            log_every: log_every.max(1),
            snapshots: vec![],
            max_sum_error: 0.0,
            peak_ood: (0, f64::NEG_INFINITY),
        }
    }

    fn observe(&mut self, step: usize, last: bool, ev: &TreeEval) -> Result<()> {
        let probs = ev.probs()?;
        let total: f64 = probs.iter().sum();
        self.max_sum_error = self.max_sum_error.max((total - 1.0).abs());
        let ood = super::mdp::GroupMass::from_probs(&probs).ood;
        if ood > self.peak_ood.1 {
            self.peak_ood = (step, ood);
        }
        if step.is_multiple_of(self.log_every) || last {
            self.snapshots.push(Snapshot { step, probs });
        }
        Ok(())
    }
}

fn detached(ev: &TreeEval) -> TreeEval {
    TreeEval {
        logits: ev.logits.clone().map(|t| t.detach()),
        traj_logp: ev.traj_logp.detach(),
    }
}

/// Behaviour cloning: minimise the mean negative log-probability of the three demonstrations,
/// training `policy` in place.
pub fn sft(policy: &GruPolicy, cfg: &SftConfig, log_every: usize) -> Result<TrainTrace> {
    let dev = policy.vars()[0].device().clone();
    let idx: Vec<u32> = Trajectory::DEMOS.iter().map(|t| t.index() as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &dev)?;
    let mut opt = RmsProp::new(policy.vars(), cfg.optim.clone())?;
    let mut tr = Tracker::new(log_every);
    let mut step = 0;
    loop {
        let ev = policy.eval_tree()?;
        let last = step == cfg.steps;
        tr.observe(step, last, &ev)?;
        let loss = ev.traj_logp.index_select(&idx, 0)?.mean_all()?.neg()?;
        if last {
            return Ok(TrainTrace {
                snapshots: tr.snapshots,
                max_sum_error: tr.max_sum_error,
                peak_ood: tr.peak_ood,
                final_loss: loss.to_scalar::<f64>()?,
                final_stats: None,
                final_eval: detached(&ev),
            });
        }
        let grads = loss.backward()?;
        opt.step_with(&opt.grads_of(&grads))
            .with_context(|| format!("toy_mdp SFT step {step}"))?;
        step += 1;
    }
}

/// DAA training on the single preference `(a1,a1,a0) > (a0,a0,a0)`, training `policy` in place.
/// `ref_logp` are the reference (SFT) policy's 27 trajectory log-probabilities.
pub fn daa(
    policy: &GruPolicy,
    ref_logp: &[f64],
    obj: Objective,
    beta: f64,
    cfg: &DaaConfig,
    log_every: usize,
) -> Result<TrainTrace> {
    anyhow::ensure!(ref_logp.len() == N_TRAJ, "expected 27 reference log-probs");
    anyhow::ensure!(
        beta > 0.0 && beta.is_finite(),
        "toy_mdp: beta must be positive, got {beta}"
    );
    let dev = policy.vars()[0].device().clone();
    let (w, l) = (
        Trajectory::PREFERRED.index(),
        Trajectory::DISPREFERRED.index(),
    );
    let ref_w = Tensor::new(&[ref_logp[w] as f32], &dev)?;
    let ref_l = Tensor::new(&[ref_logp[l] as f32], &dev)?;
    // both trajectories have 3 actions (only R-DPO looks at lengths)
    let len = Tensor::new(&[3f32], &dev)?;
    let mut opt = RmsProp::new(policy.vars(), cfg.optim.clone())?;
    let mut tr = Tracker::new(log_every);
    let mut step = 0;
    loop {
        let ev = policy.eval_tree()?;
        let last = step == cfg.steps;
        tr.observe(step, last, &ev)?;
        let pol_w = ev.traj_logp.narrow(0, w, 1)?.to_dtype(DType::F32)?;
        let pol_l = ev.traj_logp.narrow(0, l, 1)?.to_dtype(DType::F32)?;
        let (loss, stats) = daa_loss(obj, beta, &pol_w, &pol_l, &ref_w, &ref_l, &len, &len)?;
        if last {
            return Ok(TrainTrace {
                snapshots: tr.snapshots,
                max_sum_error: tr.max_sum_error,
                peak_ood: tr.peak_ood,
                final_loss: stats.loss,
                final_stats: Some(stats),
                final_eval: detached(&ev),
            });
        }
        let grads = loss.backward()?;
        opt.step_with(&opt.grads_of(&grads))
            .with_context(|| format!("toy_mdp {} beta {beta} step {step}", obj.name()))?;
        step += 1;
    }
}
