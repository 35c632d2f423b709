//! Direct Alignment Algorithm losses (SPEC section 1) as small pure functions.
//!
//! All losses are functions of the log-ratio margin
//! `h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]`
//! of summed response log-probs; the per-pair losses are averaged over the batch.
//!
//! The candle versions are differentiable (used in training); the `f64` versions compute the
//! same values for evaluation and tests. `-log sigmoid(z)` is computed as `softplus(-z)` in a
//! form that is stable for |z| up to 1e4 and beyond.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// A DAA objective. Values are per pair; see the module documentation for `h`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum Objective {
    /// `-log sigmoid(beta*h)`; with label smoothing eps (conservative DPO):
    /// `-(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h)`.
    Dpo {
        #[serde(default)]
        label_smoothing: f64,
    },
    /// IPO as the DPO reference code (which the paper ran) writes it: `(h - 1/(2*beta))^2`.
    Ipo,
    /// IPO as the paper writes it: `(beta*h - 1)^2` (= beta^2 (h - 1/beta)^2). A different
    /// loss from [`Objective::Ipo`]; only used when asked for by name.
    IpoPaper,
    /// SLiC hinge: `max(0, 1 - beta*h)`.
    Slic,
    /// Length-regularized DPO (Park et al. 2024):
    /// `-log sigmoid(beta*h - alpha*(|y_w| - |y_l|))`.
    Rdpo { alpha: f64 },
}

impl Objective {
    /// Short name for tables and file names: dpo, ipo, ipo_paper, slic, rdpo.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Dpo { .. } => "dpo",
            Objective::Ipo => "ipo",
            Objective::IpoPaper => "ipo_paper",
            Objective::Slic => "slic",
            Objective::Rdpo { .. } => "rdpo",
        }
    }

    /// Parse a short name; R-DPO takes its alpha, DPO label smoothing 0.
    pub fn from_name(name: &str, rdpo_alpha: f64) -> anyhow::Result<Self> {
        Ok(match name {
            "dpo" => Objective::Dpo {
                label_smoothing: 0.0,
            },
            "ipo" => Objective::Ipo,
            "ipo_paper" => Objective::IpoPaper,
            "slic" => Objective::Slic,
            "rdpo" => Objective::Rdpo { alpha: rdpo_alpha },
            s => {
                anyhow::bail!("unknown objective {s:?}: expected dpo, ipo, ipo_paper, slic or rdpo")
            }
        })
    }
}

/// `-log sigmoid(z)` = softplus(-z), stable for large |z|.
pub fn neg_log_sigmoid(z: f64) -> f64 {
    if z > 0.0 {
        (-z).exp().ln_1p()
    } else {
        -z + z.exp().ln_1p()
    }
}

/// Per-pair loss from the margin `h` and the response lengths (tokens, for R-DPO).
pub fn pair_loss(obj: Objective, beta: f64, h: f64, len_w: f64, len_l: f64) -> f64 {
    match obj {
        Objective::Dpo { label_smoothing: e } => {
            (1.0 - e) * neg_log_sigmoid(beta * h) + e * neg_log_sigmoid(-beta * h)
        }
        Objective::Ipo => (h - 1.0 / (2.0 * beta)).powi(2),
        Objective::IpoPaper => (beta * h - 1.0).powi(2),
        Objective::Slic => (1.0 - beta * h).max(0.0),
        Objective::Rdpo { alpha } => neg_log_sigmoid(beta * h - alpha * (len_w - len_l)),
    }
}

/// The margin h from the four summed log-probs.
pub fn margin(pol_w: f64, pol_l: f64, ref_w: f64, ref_l: f64) -> f64 {
    (pol_w - ref_w) - (pol_l - ref_l)
}

/// Softplus(-z) = -log sigmoid(z) on tensors, stable: max(-z, 0) + log1p(exp(-|z|)).
///
/// Both kinks sit at z = 0, where the derivative is -1/2. `relu` and `abs` have a zero
/// (sub)gradient there, which would zero the gradient of every pair whose margin is exactly
/// 0, as it is at a DPO run's first step when the policy and the reference compute their
/// log-probs with the same kernels. candle's `maximum` splits the gradient of a tie in
/// half, which gives -1/2 + 0 at z = 0.
pub fn neg_log_sigmoid_t(z: &Tensor) -> Result<Tensor> {
    let neg = z.neg()?;
    let relu = neg.maximum(&z.zeros_like()?)?;
    let abs = z.maximum(&neg)?;
    let tail = (abs.neg()?.exp()? + 1.0)?.log()?;
    relu + tail
}

/// Statistics of one batch of pairs, as the reference code logs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub reward_margin: f64,
    /// Fraction of pairs whose chosen implicit reward is STRICTLY above the rejected one.
    pub accuracy: f64,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
}

/// The loss tensor (mean over pairs, differentiable) and the batch statistics.
///
/// Inputs are (n,) f32 tensors of summed log-probs: policy chosen / rejected (with gradients),
/// reference chosen / rejected (constants), and the response lengths in tokens.
pub fn daa_loss(
    obj: Objective,
    beta: f64,
    pol_w: &Tensor,
    pol_l: &Tensor,
    ref_w: &Tensor,
    ref_l: &Tensor,
    len_w: &Tensor,
    len_l: &Tensor,
) -> Result<(Tensor, PairStats)> {
    let ratio_w = (pol_w - ref_w.detach())?;
    let ratio_l = (pol_l - ref_l.detach())?;
    let h = (&ratio_w - &ratio_l)?;
    let per_pair = match obj {
        Objective::Dpo { label_smoothing: e } => {
            let z = (&h * beta)?;
            let a = neg_log_sigmoid_t(&z)?;
            if e == 0.0 {
                a
            } else {
                ((a * (1.0 - e))? + (neg_log_sigmoid_t(&z.neg()?)? * e)?)?
            }
        }
        Objective::Ipo => (&h - 1.0 / (2.0 * beta))?.sqr()?,
        Objective::IpoPaper => ((&h * beta)? - 1.0)?.sqr()?,
        Objective::Slic => ((&h * beta)?.neg()? + 1.0)?.relu()?,
        Objective::Rdpo { alpha } => {
            let dl = (len_w - len_l)?;
            neg_log_sigmoid_t(&((&h * beta)? - (dl * alpha)?)?)?
        }
    };
    let loss = per_pair.mean_all()?;
    let rw = (ratio_w.detach() * beta)?.to_vec1::<f32>()?;
    let rl = (ratio_l.detach() * beta)?.to_vec1::<f32>()?;
    let n = rw.len().max(1) as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let acc = rw.iter().zip(&rl).filter(|(a, b)| a > b).count() as f64 / n;
    let stats = PairStats {
        loss: loss.to_scalar::<f32>()? as f64,
        reward_chosen: mean(&rw),
        reward_rejected: mean(&rl),
        reward_margin: mean(&rw) - mean(&rl),
        accuracy: acc,
        logp_chosen: mean(&pol_w.detach().to_vec1::<f32>()?),
        logp_rejected: mean(&pol_l.detach().to_vec1::<f32>()?),
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// d/dz softplus(-z) = -sigmoid(-z) everywhere, z = 0 included (-1/2 there, not the
    /// zero subgradient of relu and abs).
    #[test]
    fn neg_log_sigmoid_gradient_is_right_at_zero() {
        let zs = [-30.0f32, -2.0, -1e-7, 0.0, 1e-7, 2.0, 30.0];
        let z = candle_core::Var::new(&zs[..], &Device::Cpu).unwrap();
        let y = neg_log_sigmoid_t(z.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        for ((&z, &g), &v) in zs.iter().zip(&g).zip(&v) {
            let want = -1.0 / (1.0 + (z as f64).exp());
            assert!(
                (g as f64 - want).abs() < 1e-6,
                "z {z}: gradient {g}, want {want}"
            );
            assert!(
                (v as f64 - neg_log_sigmoid(z as f64)).abs() < 1e-5,
                "z {z}: value {v}"
            );
        }
    }

    #[test]
    fn stable_for_large_margins() {
        for z in [-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4] {
            let v = neg_log_sigmoid(z);
            assert!(v.is_finite() && v >= 0.0, "{z} -> {v}");
        }
        assert!((neg_log_sigmoid(-1e4) - 1e4).abs() < 1e-9);
        assert!(neg_log_sigmoid(1e4) < 1e-300);
        let t = Tensor::new(&[-1e4f32, -50.0, 0.0, 50.0, 1e4], &Device::Cpu).unwrap();
        let v = neg_log_sigmoid_t(&t).unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        assert!((v[0] - 1e4).abs() < 1e-2 && v[4] == 0.0 && (v[2] - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn tensor_and_scalar_forms_agree() {
        let dev = Device::Cpu;
        let pw = Tensor::new(&[-3.0f32, -10.0, -2.5], &dev).unwrap();
        let pl = Tensor::new(&[-4.0f32, -9.0, -2.0], &dev).unwrap();
        let rw = Tensor::new(&[-3.5f32, -9.5, -3.0], &dev).unwrap();
        let rl = Tensor::new(&[-3.8f32, -9.2, -2.2], &dev).unwrap();
        let lw = Tensor::new(&[5f32, 7.0, 3.0], &dev).unwrap();
        let ll = Tensor::new(&[4f32, 9.0, 3.0], &dev).unwrap();
        let objs = [
            Objective::Dpo {
                label_smoothing: 0.0,
            },
            Objective::Dpo {
                label_smoothing: 0.2,
            },
            Objective::Ipo,
            Objective::IpoPaper,
            Objective::Slic,
            Objective::Rdpo { alpha: 0.1 },
        ];
        for obj in objs {
            let (l, s) = daa_loss(obj, 0.3, &pw, &pl, &rw, &rl, &lw, &ll).unwrap();
            let l = l.to_scalar::<f32>().unwrap() as f64;
            let pwv = pw.to_vec1::<f32>().unwrap();
            let plv = pl.to_vec1::<f32>().unwrap();
            let rwv = rw.to_vec1::<f32>().unwrap();
            let rlv = rl.to_vec1::<f32>().unwrap();
            let lwv = lw.to_vec1::<f32>().unwrap();
            let llv = ll.to_vec1::<f32>().unwrap();
            let exp: f64 = (0..3)
                .map(|i| {
                    let h = margin(pwv[i] as f64, plv[i] as f64, rwv[i] as f64, rlv[i] as f64);
                    pair_loss(obj, 0.3, h, lwv[i] as f64, llv[i] as f64)
                })
                .sum::<f64>()
                / 3.0;
            assert!((l - exp).abs() < 1e-5, "{obj:?}: {l} vs {exp}");
            // ratios chosen: 0.5, -0.5, 0.5; rejected: -0.2, 0.2, 0.2 -> strict wins 2 of 3
            assert!((s.accuracy - 2.0 / 3.0).abs() < 1e-9);
        }
    }
}
