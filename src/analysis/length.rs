//! Section 3.3: how much of the implicit reward is explained by length.
//!
//! Fig. 3 right: for each (objective, size, checkpoint, beta) an ordinary least-squares
//! regression of the implicit log-ratio log pi(y|x)/pi_ref(y|x) of held-out policy samples on
//! the sample length |y|, reporting R^2. The paper writes the regression without an intercept
//! (eq. 6); we fit it WITH an intercept, so that R^2 is the usual centred one (the squared
//! correlation of log-ratio and length) and measures how much of the VARIATION of the implicit
//! reward length explains; an uncentred R^2 through the origin would be near 1 whenever the
//! log-ratio is far from 0, whatever its relation to length. Seeds are kept apart (one
//! regression per seed); average R^2 over seeds where one number per cell is wanted.
//!
//! Fig. 3 left, "length-corrected win rate": the paper uses the phrase ("higher win rates on a
//! length-correct basis") without defining it. `length_controlled_win_rate` is our stand-in,
//! stated here so that no one mistakes it for the paper's: a logistic regression of the
//! per-comparison outcome (1 win, 0 loss, 0.5 tie) on the length difference between the policy
//! sample and the reference summary, read off at a length difference of zero, i.e. the win rate
//! the policy would have if its samples were as long as the references (the idea behind
//! length-controlled win rates in AlpacaEval, in its simplest one-covariate form).

use super::stats::mean;
use super::table::{SampleRow, fkey};
use super::{csv_num, csv_str};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Simple linear regression y = intercept + slope * x.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ols {
    pub slope: f64,
    pub intercept: f64,
    /// Centred R^2 = 1 - SS_res / SS_tot.
    pub r2: f64,
    pub n: usize,
}

/// OLS of y on x with an intercept. `None` when fewer than 3 points, a value is not finite, or
/// x or y has no variance (R^2 undefined).
pub fn ols(x: &[f64], y: &[f64]) -> Option<Ols> {
    let n = x.len();
    if n < 3 || n != y.len() || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|v| (v - my).powi(2)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_res: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (b - intercept - slope * a).powi(2))
        .sum();
    Some(Ols {
        slope,
        intercept,
        r2: (1.0 - ss_res / syy).max(0.0),
        n,
    })
}

/// The length regression of one (objective, size, beta, checkpoint, seed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthFit {
    pub objective: String,
    pub size: String,
    pub beta: f64,
    pub checkpoint: f64,
    pub seed: u64,
    /// Samples in the group (including any with a non-finite log-ratio).
    pub n: usize,
    /// Slope of log-ratio on length (per token); NaN when undefined.
    pub gamma: f64,
    pub intercept: f64,
    /// NaN when undefined (fewer than 3 finite samples, constant length or log-ratio, or a
    /// non-finite log-ratio in the group).
    pub r2: f64,
}

/// One regression per (objective, size, beta, checkpoint, seed), sorted by those keys.
/// A group with a non-finite log-ratio gets NaN results (never a fit on the remaining rows).
pub fn length_fits(samples: &[SampleRow]) -> Vec<LengthFit> {
    type Key = (String, String, i64, i64, u64);
    let mut groups: BTreeMap<Key, Vec<&SampleRow>> = BTreeMap::new();
    for s in samples {
        let key = (
            s.objective.clone(),
            s.size.clone(),
            fkey(s.beta),
            fkey(s.checkpoint),
            s.seed,
        );
        groups.entry(key).or_default().push(s);
    }
    groups
        .into_values()
        .map(|g| {
            let x: Vec<f64> = g.iter().map(|s| s.length as f64).collect();
            let y: Vec<f64> = g.iter().map(|s| s.log_ratio).collect();
            let fit = ols(&x, &y);
            let first = g[0];
            LengthFit {
                objective: first.objective.clone(),
                size: first.size.clone(),
                beta: first.beta,
                checkpoint: first.checkpoint,
                seed: first.seed,
                n: g.len(),
                gamma: fit.map_or(f64::NAN, |f| f.slope),
                intercept: fit.map_or(f64::NAN, |f| f.intercept),
                r2: fit.map_or(f64::NAN, |f| f.r2),
            }
        })
        .collect()
}

/// Write the length table as CSV (atomically). Non-finite numbers are empty fields.
pub fn write_length_csv(path: &Path, fits: &[LengthFit]) -> Result<()> {
    let mut s = String::from("objective,size,beta,checkpoint,seed,n,gamma,intercept,r2\n");
    for f in fits {
        let cells = [
            csv_str(&f.objective),
            csv_str(&f.size),
            csv_num(f.beta),
            csv_num(f.checkpoint),
            f.seed.to_string(),
            f.n.to_string(),
            csv_num(f.gamma),
            csv_num(f.intercept),
            csv_num(f.r2),
        ];
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    crate::util::write_atomic(path, s.as_bytes())
}

/// Result of `length_controlled_win_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthControlled {
    pub n: usize,
    /// Plain mean of the outcomes.
    pub raw_win_rate: f64,
    /// sigmoid(intercept): predicted win rate at zero length difference.
    pub length_controlled_win_rate: f64,
    pub intercept: f64,
    /// Change of the log-odds of winning per token of extra length.
    pub slope_per_token: f64,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Our stand-in for the paper's undefined "length-corrected win rate" (see the module docs):
/// logistic regression of `outcomes` (1 win, 0 loss, 0.5 tie) on `length_diff` (policy sample
/// length minus reference length, tokens), fitted by Newton's method with a tiny ridge on the
/// slope (so that perfectly separated data stay finite), read off at zero length difference.
/// `None` with fewer than 2 comparisons, unequal lengths, non-finite values or outcomes outside
/// [0, 1].
pub fn length_controlled_win_rate(
    outcomes: &[f64],
    length_diff: &[f64],
) -> Option<LengthControlled> {
    let n = outcomes.len();
    if n < 2
        || n != length_diff.len()
        || outcomes.iter().any(|v| !(0.0..=1.0).contains(v))
        || length_diff.iter().any(|v| !v.is_finite())
    {
        return None;
    }
    // Centre-free parameterisation: log-odds = a + b * diff; we want a itself.
    let scale = length_diff
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f64::max)
        .max(1.0);
    let z: Vec<f64> = length_diff.iter().map(|v| v / scale).collect();
    let ridge = 1e-6 * n as f64;
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (y, zi) in outcomes.iter().zip(&z) {
            let p = sigmoid(a + b * zi);
            let w = (p * (1.0 - p)).max(1e-12);
            ga += y - p;
            gb += (y - p) * zi;
            haa += w;
            hab += w * zi;
            hbb += w * zi * zi;
        }
        gb -= ridge * b;
        hbb += ridge;
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-300 {
            break;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        a += da.clamp(-5.0, 5.0);
        b += db.clamp(-5.0, 5.0);
        if da.abs() < 1e-10 && db.abs() < 1e-10 {
            break;
        }
    }
    (a.is_finite() && b.is_finite()).then(|| LengthControlled {
        n,
        raw_win_rate: mean(outcomes),
        length_controlled_win_rate: sigmoid(a),
        intercept: a,
        slope_per_token: b / scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn exact_linear_relation_has_r2_one() {
        let x: Vec<f64> = (1..=20).map(|v| v as f64).collect();
        let y: Vec<f64> = x.iter().map(|v| 0.3 * v - 2.0).collect();
        let f = ols(&x, &y).unwrap();
        assert!((f.r2 - 1.0).abs() < 1e-12, "{f:?}");
        assert!((f.slope - 0.3).abs() < 1e-12 && (f.intercept + 2.0).abs() < 1e-10);
    }

    #[test]
    fn independent_noise_has_r2_near_zero() {
        let mut rng = StdRng::seed_from_u64(3);
        let nd = Normal::new(0.0, 1.0).unwrap();
        let x: Vec<f64> = (0..2000).map(|_| nd.sample(&mut rng)).collect();
        let y: Vec<f64> = (0..2000).map(|_| nd.sample(&mut rng)).collect();
        let f = ols(&x, &y).unwrap();
        assert!(f.r2 < 0.01, "{f:?}");
    }

    #[test]
    fn length_fits_group_and_flag_undefined() {
        let mk = |size: &str, seed: u64, len: usize, lr: f64| SampleRow {
            objective: "dpo".into(),
            beta: 0.1,
            size: size.into(),
            checkpoint: 1.0,
            seed,
            log_ratio: lr,
            length: len,
        };
        let mut s = Vec::new();
        for l in 1..=6 {
            s.push(mk("a", 0, l, 2.0 * l as f64 + 1.0));
            s.push(mk("b", 0, l, 1.0)); // constant log-ratio: R^2 undefined
        }
        s.push(mk("a", 1, 3, f64::NAN));
        s.push(mk("a", 1, 4, 1.0));
        s.push(mk("a", 1, 5, 2.0));
        s.push(mk("a", 1, 6, 2.0));
        let fits = length_fits(&s);
        assert_eq!(fits.len(), 3);
        let a0 = &fits[0];
        assert_eq!((a0.size.as_str(), a0.seed, a0.n), ("a", 0, 6));
        assert!((a0.gamma - 2.0).abs() < 1e-12 && (a0.r2 - 1.0).abs() < 1e-12);
        assert!(
            fits[1].r2.is_nan(),
            "NaN log-ratio must not be skipped silently"
        );
        assert!(fits[2].r2.is_nan() && fits[2].size == "b");
    }

    #[test]
    fn length_control_removes_a_pure_length_effect() {
        // Outcome depends only on length: P(win) = sigmoid(0.5 * diff); samples mostly longer.
        let mut rng = StdRng::seed_from_u64(11);
        let nd = Normal::new(2.0, 2.0).unwrap();
        let mut o = Vec::new();
        let mut dl = Vec::new();
        for _ in 0..4000 {
            let diff: f64 = nd.sample(&mut rng);
            let diff = diff.round();
            let p = sigmoid(0.5 * diff);
            let u: f64 = rand::Rng::random(&mut rng);
            o.push(if u < p { 1.0 } else { 0.0 });
            dl.push(diff);
        }
        let r = length_controlled_win_rate(&o, &dl).unwrap();
        assert!(r.raw_win_rate > 0.65, "{r:?}");
        assert!((r.length_controlled_win_rate - 0.5).abs() < 0.05, "{r:?}");
        assert!((r.slope_per_token - 0.5).abs() < 0.1, "{r:?}");
        assert!(length_controlled_win_rate(&[1.0], &[0.0]).is_none());
        assert!(length_controlled_win_rate(&[2.0, 0.0], &[0.0, 1.0]).is_none());
    }
}
