//! A recurrent (GRU) policy over the action history, evaluated exactly on the whole tree.
//!
//! The policy reads a start token and then the actions taken so far, one GRU step per token,
//! and maps the hidden state to logits over the three actions, like a language model over a
//! three-word vocabulary. Because the tree has only 13 decision states, one forward pass
//! evaluates all of them at once (1 root, 3 depth-1 states, 9 depth-2 states, batched by
//! depth), and the exact log-probability of each of the 27 trajectories is the sum of its three
//! per-step log-probabilities. No sampling is involved anywhere.
//!
//! The cell is written out from basic candle ops (torch's GRU convention, gates r, z, n) so
//! that every parameter is differentiable. Parameters are f64 so that the enumerated
//! probabilities sum to one to ~1e-12.

use super::mdp::{N_ACTIONS, N_TRAJ};
use candle_core::{D, DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// Embedding index of the start token (actions use 0..3).
const BOS: usize = N_ACTIONS;

/// Sizes of the GRU policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Width of the token (start token + 3 actions) embedding.
    pub embed_dim: usize,
    /// GRU hidden size.
    pub hidden: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            embed_dim: 8,
            hidden: 16,
        }
    }
}

/// A GRU policy; all parameters are candle `Var`s (f64).
#[derive(Debug)]
pub struct GruPolicy {
    hidden: usize,
    /// (4, E): start token, a0, a1, a2.
    emb: Var,
    /// (3H, E) and (3H,): input-to-hidden weights of the r, z, n gates, stacked.
    w_ih: Var,
    b_ih: Var,
    /// (3H, H) and (3H,): hidden-to-hidden weights of the r, z, n gates, stacked.
    w_hh: Var,
    b_hh: Var,
    /// (3, H) and (3,): the action head.
    w_out: Var,
    b_out: Var,
}

/// The policy evaluated on the whole tree.
#[derive(Debug, Clone)]
pub struct TreeEval {
    /// Raw logits by depth: (1, 3) at `s1`, (3, 3) at `s2..s4`, (9, 3) at `s5..s13`
    /// (row `3a + b` is the state after `a_a a_b`).
    pub logits: [Tensor; 3],
    /// Exact log-probabilities of the 27 trajectories, in enumeration order (27,).
    pub traj_logp: Tensor,
}

impl TreeEval {
    /// Raw logits (f64) of a decision state given by its action prefix (length 0, 1 or 2).
    pub fn state_logits(&self, prefix: &[usize]) -> Result<[f64; N_ACTIONS]> {
        let row = match prefix {
            [] => self.logits[0].get(0)?,
            [a] => self.logits[1].get(*a)?,
            [a, b] => self.logits[2].get(3 * a + b)?,
            _ => candle_core::bail!(
                "a decision state has a prefix of at most 2 actions, got {prefix:?}"
            ),
        };
        let v = row.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok([v[0], v[1], v[2]])
    }

    /// The 27 trajectory probabilities (f64, enumeration order).
    pub fn probs(&self) -> Result<Vec<f64>> {
        let lp = self.traj_logp.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(lp.into_iter().map(f64::exp).collect())
    }
}

fn uniform(rng: &mut StdRng, bound: f64, shape: &[usize], dev: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, dev)?)
}

/// `x w^T + b` for x (n, k), w (m, k), b (m,) as a broadcast product and a sum. The matrices
/// here hold a few hundred numbers; candle's CPU matmul hands every product to a rayon thread
/// pool, whose wake-ups cost far more than the arithmetic (the whole section ran ~2.5x slower
/// on 2 cores), while elementwise ops stay on the calling thread.
fn linear(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    x.unsqueeze(1)?
        .broadcast_mul(&w.as_tensor().unsqueeze(0)?)?
        .sum(2)?
        .broadcast_add(b.as_tensor())
}

impl GruPolicy {
    /// A freshly initialised policy, deterministic in `seed` (torch's default GRU / Linear
    /// init: uniform in +-1/sqrt(H); embedding standard normal).
    pub fn new(cfg: &PolicyConfig, seed: u64, dev: &Device) -> Result<Self> {
        if cfg.hidden == 0 || cfg.embed_dim == 0 {
            candle_core::bail!(
                "toy_mdp policy: hidden and embed_dim must be positive, got {cfg:?}"
            );
        }
        let (e, h) = (cfg.embed_dim, cfg.hidden);
        let mut rng = StdRng::seed_from_u64(seed);
        let emb: Vec<f64> = (0..(N_ACTIONS + 1) * e)
            .map(|_| rng.sample(StandardNormal))
            .collect();
        let emb = Var::from_tensor(&Tensor::from_vec(emb, (N_ACTIONS + 1, e), dev)?)?;
        let k = 1.0 / (h as f64).sqrt();
        Ok(Self {
            hidden: h,
            emb,
            w_ih: uniform(&mut rng, k, &[3 * h, e], dev)?,
            b_ih: uniform(&mut rng, k, &[3 * h], dev)?,
            w_hh: uniform(&mut rng, k, &[3 * h, h], dev)?,
            b_hh: uniform(&mut rng, k, &[3 * h], dev)?,
            w_out: uniform(&mut rng, k, &[N_ACTIONS, h], dev)?,
            b_out: uniform(&mut rng, k, &[N_ACTIONS], dev)?,
        })
    }

    /// The parameters with their names, in a fixed order.
    pub fn named_vars(&self) -> Vec<(&'static str, Var)> {
        vec![
            ("emb", self.emb.clone()),
            ("w_ih", self.w_ih.clone()),
            ("b_ih", self.b_ih.clone()),
            ("w_hh", self.w_hh.clone()),
            ("b_hh", self.b_hh.clone()),
            ("w_out", self.w_out.clone()),
            ("b_out", self.b_out.clone()),
        ]
    }

    /// The parameters, in the order of [`GruPolicy::named_vars`].
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// An independent copy (new storage; training the copy leaves `self` untouched).
    pub fn deep_clone(&self) -> Result<Self> {
        let c = |v: &Var| Var::from_tensor(&v.as_tensor().detach().copy()?);
        Ok(Self {
            hidden: self.hidden,
            emb: c(&self.emb)?,
            w_ih: c(&self.w_ih)?,
            b_ih: c(&self.b_ih)?,
            w_hh: c(&self.w_hh)?,
            b_hh: c(&self.b_hh)?,
            w_out: c(&self.w_out)?,
            b_out: c(&self.b_out)?,
        })
    }

    /// One GRU step. `gi` = W_ih x + b_ih, `gh` = W_hh h + b_hh (last dim 3H), `h` the previous
    /// hidden state; all three broadcast against each other.
    fn cell(&self, gi: &Tensor, gh: &Tensor, h: &Tensor) -> Result<Tensor> {
        let hs = self.hidden;
        let g = |t: &Tensor, i: usize| t.narrow(D::Minus1, i * hs, hs);
        let r = candle_nn::ops::sigmoid(&g(gi, 0)?.broadcast_add(&g(gh, 0)?)?)?;
        let z = candle_nn::ops::sigmoid(&g(gi, 1)?.broadcast_add(&g(gh, 1)?)?)?;
        let n = g(gi, 2)?
            .broadcast_add(&r.broadcast_mul(&g(gh, 2)?)?)?
            .tanh()?;
        // (1 - z) * n + z * h  =  n + z * (h - n)
        n.broadcast_add(&z.broadcast_mul(&h.broadcast_sub(&n)?)?)
    }

    fn hh(&self, h: &Tensor) -> Result<Tensor> {
        linear(h, &self.w_hh, &self.b_hh)
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        linear(h, &self.w_out, &self.b_out)
    }

    /// Evaluate the policy on all 13 decision states and all 27 trajectories (differentiable).
    pub fn eval_tree(&self) -> Result<TreeEval> {
        let hs = self.hidden;
        let dev = self.emb.device();
        // input projections of the four tokens: (4, 3H)
        let gi = linear(self.emb.as_tensor(), &self.w_ih, &self.b_ih)?;
        let gi_act = gi.narrow(0, 0, N_ACTIONS)?; // (3, 3H)
        let gi_bos = gi.narrow(0, BOS, 1)?; // (1, 3H)

        // s1: read the start token from a zero state
        let h0 = Tensor::zeros((1, hs), DType::F64, dev)?;
        let h1 = self.cell(&gi_bos, &self.hh(&h0)?, &h0)?; // (1, H)
        // s2..s4: read a0..a2 from s1's state
        let h2 = self.cell(&gi_act, &self.hh(&h1)?, &h1)?; // (3, H)
        // s5..s13: parent a (dim 0) reads action b (dim 1)
        let gh2 = self.hh(&h2)?.unsqueeze(1)?; // (3, 1, 3H)
        let h3 = self.cell(&gi_act.unsqueeze(0)?, &gh2, &h2.unsqueeze(1)?)?; // (3, 3, H)
        let h3 = h3.reshape((N_ACTIONS * N_ACTIONS, hs))?;

        let logits = [self.head(&h1)?, self.head(&h2)?, self.head(&h3)?];
        let lp0 = candle_nn::ops::log_softmax(&logits[0], D::Minus1)?.reshape((3, 1, 1))?;
        let lp1 = candle_nn::ops::log_softmax(&logits[1], D::Minus1)?.reshape((3, 3, 1))?;
        let lp2 = candle_nn::ops::log_softmax(&logits[2], D::Minus1)?.reshape((3, 3, 3))?;
        let traj_logp = lp0
            .broadcast_add(&lp1)?
            .broadcast_add(&lp2)?
            .reshape(N_TRAJ)?;
        Ok(TreeEval { logits, traj_logp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy_mdp::mdp::{Trajectory, all_trajectories};

    fn log_softmax(l: [f64; 3]) -> [f64; 3] {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + l.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        l.map(|x| x - lse)
    }

    #[test]
    fn enumeration_is_exact_and_matches_per_step_products() {
        for seed in [0, 1, 7] {
            let p = GruPolicy::new(&PolicyConfig::default(), seed, &Device::Cpu).unwrap();
            let ev = p.eval_tree().unwrap();
            let probs = ev.probs().unwrap();
            let total: f64 = probs.iter().sum();
            assert!((total - 1.0).abs() < 1e-12, "seed {seed}: sum {total}");
            let lp = ev.traj_logp.to_vec1::<f64>().unwrap();
            for t in all_trajectories() {
                let [a, b, c] = t.0;
                let s = log_softmax(ev.state_logits(&[]).unwrap())[a]
                    + log_softmax(ev.state_logits(&[a]).unwrap())[b]
                    + log_softmax(ev.state_logits(&[a, b]).unwrap())[c];
                assert!(
                    (s - lp[t.index()]).abs() < 1e-12,
                    "{t}: {s} vs {}",
                    lp[t.index()]
                );
            }
        }
    }

    #[test]
    fn recurrence_matches_a_step_by_step_rollout() {
        // Run the cell token by token for one trajectory and compare with the batched tree.
        let p = GruPolicy::new(
            &PolicyConfig {
                embed_dim: 3,
                hidden: 5,
            },
            3,
            &Device::Cpu,
        )
        .unwrap();
        let ev = p.eval_tree().unwrap();
        let t = Trajectory([2, 0, 1]);
        let emb = p.emb.as_tensor();
        let mut h = Tensor::zeros((1, 5), DType::F64, &Device::Cpu).unwrap();
        let mut tokens = vec![BOS];
        tokens.extend_from_slice(&t.0[..2]);
        for (depth, &tok) in tokens.iter().enumerate() {
            let x = emb.narrow(0, tok, 1).unwrap();
            let gi = x
                .matmul(&p.w_ih.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(p.b_ih.as_tensor())
                .unwrap();
            assert!(
                (linear(&x, &p.w_ih, &p.b_ih).unwrap() - &gi)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    < 1e-12
            );
            h = p.cell(&gi, &p.hh(&h).unwrap(), &h).unwrap();
            let l = p
                .head(&h)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let want = ev.state_logits(&t.0[..depth]).unwrap();
            for k in 0..3 {
                assert!(
                    (l[k] - want[k]).abs() < 1e-12,
                    "depth {depth}: {l:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let p = GruPolicy::new(&PolicyConfig::default(), 5, &Device::Cpu).unwrap();
        let lp = p.eval_tree().unwrap().traj_logp;
        // weighted sum over all trajectories so every state matters
        let w: Vec<f64> = (0..27).map(|i| 1.0 + i as f64 / 10.0).collect();
        let w = Tensor::from_vec(w, 27, &Device::Cpu).unwrap();
        let loss = (lp * w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in p.named_vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt();
            assert!(n > 1e-8 && n.is_finite(), "{name}: gradient norm {n}");
        }
    }

    #[test]
    fn deep_clone_is_independent_and_seeds_differ() {
        let dev = Device::Cpu;
        let a = GruPolicy::new(&PolicyConfig::default(), 1, &dev).unwrap();
        let b = a.deep_clone().unwrap();
        let before = a.eval_tree().unwrap().probs().unwrap();
        let w = b.w_out.as_tensor().clone();
        b.w_out.set(&(w + 1.0).unwrap()).unwrap();
        assert_eq!(a.eval_tree().unwrap().probs().unwrap(), before);
        assert_ne!(b.eval_tree().unwrap().probs().unwrap(), before);
        let c = GruPolicy::new(&PolicyConfig::default(), 2, &dev).unwrap();
        assert_ne!(c.eval_tree().unwrap().probs().unwrap(), before);
        let a2 = GruPolicy::new(&PolicyConfig::default(), 1, &dev).unwrap();
        assert_eq!(a2.eval_tree().unwrap().probs().unwrap(), before);
    }
}
