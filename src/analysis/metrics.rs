//! Sections 3.4 and 3.5: does a training-side metric track the win rate?
//!
//! Metrics against win rate: implicit-reward accuracy and held-out DAA loss (Fig. 4), and
//! sqrt(-E[implicit reward of the chosen response]) on held-out pairs (Fig. 5).
//!
//! E[r(x, y_w)] >= 0: the square root of a negative number is undefined. We use the signed
//! square root `-sqrt(r)` for r > 0 (and 0 at r = 0), which keeps the point on the axis,
//! keeps the transform monotone (so Spearman correlations are unaffected by the choice), and
//! places such policies to the left of the SFT policy (x = 0), where a policy that raised the
//! likelihood of chosen responses belongs. `MetricCorrelation::n_nonneg_chosen` counts them.
//!
//! Points: every DAA row (all betas, checkpoints and seeds; SFT rows excluded, their DAA metrics
//! being undefined). Groups: per (objective, size), per objective with sizes pooled, and per
//! size and overall with the standard objectives pooled. A group with a non-finite value in
//! any of its rows gets no correlation (`corr: None`) and names the row in `problem`.
//! Intervals: percentile bootstrap over points (pairs resampled together), seeded.

use super::fits::POOLED;
use super::stats::{Resampler, mean, percentile_interval, ranks};
use super::table::{ResultRow, STANDARD_OBJECTIVES};
use super::{csv_num, csv_str};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Pearson correlation; `None` with fewer than 3 points, non-finite values, or a constant
/// variable.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|v| (v - my).powi(2)).sum();
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    Some((sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

/// Spearman rank correlation (Pearson of average ranks); `None` as for `pearson`.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    pearson(&ranks(x), &ranks(y))
}

/// Correlations of one set of points with bootstrap percentile intervals.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Correlation {
    pub n: usize,
    pub pearson: f64,
    pub pearson_lo: f64,
    pub pearson_hi: f64,
    pub spearman: f64,
    pub spearman_lo: f64,
    pub spearman_hi: f64,
    /// Bootstrap resamples in which both correlations were defined.
    pub n_boot_ok: usize,
}

impl Correlation {
    /// Whether the Spearman interval excludes 0.
    pub fn spearman_excludes_zero(&self) -> bool {
        self.spearman_lo > 0.0 || self.spearman_hi < 0.0
    }
}

/// Pearson and Spearman of (x, y) with 95% percentile-bootstrap intervals over `n_boot`
/// resamples of the pairs. `None` when either correlation is undefined on the data.
pub fn correlation(x: &[f64], y: &[f64], n_boot: usize, seed: u64) -> Option<Correlation> {
    let p = pearson(x, y)?;
    let s = spearman(x, y)?;
    let mut rs = Resampler::new(seed);
    let (mut bp, mut bs) = (Vec::with_capacity(n_boot), Vec::with_capacity(n_boot));
    for _ in 0..n_boot {
        let idx = rs.draw(x.len());
        let xx: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let yy: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        if let (Some(a), Some(b)) = (pearson(&xx, &yy), spearman(&xx, &yy)) {
            bp.push(a);
            bs.push(b);
        }
    }
    let (pl, ph) = percentile_interval(&bp, 0.95);
    let (sl, sh) = percentile_interval(&bs, 0.95);
    Some(Correlation {
        n: x.len(),
        pearson: p,
        pearson_lo: pl,
        pearson_hi: ph,
        spearman: s,
        spearman_lo: sl,
        spearman_hi: sh,
        n_boot_ok: bp.len(),
    })
}

/// A metric plotted against the win rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Implicit-reward accuracy on held-out pairs (Fig. 4 left).
    ImplicitAccuracy,
    /// Held-out DAA loss (Fig. 4 right).
    HeldoutLoss,
    /// sqrt(-E[implicit reward of the chosen response]), signed (Fig. 5).
    SqrtNegChosenReward,
}

impl Metric {
    pub const ALL: [Metric; 3] = [
        Metric::ImplicitAccuracy,
        Metric::HeldoutLoss,
        Metric::SqrtNegChosenReward,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::ImplicitAccuracy => "implicit_accuracy",
            Metric::HeldoutLoss => "heldout_loss",
            Metric::SqrtNegChosenReward => "sqrt_neg_chosen_reward",
        }
    }

    /// The metric's value for one row (NaN stays NaN).
    pub fn value(self, r: &ResultRow) -> f64 {
        match self {
            Metric::ImplicitAccuracy => r.implicit_accuracy,
            Metric::HeldoutLoss => r.heldout_loss,
            Metric::SqrtNegChosenReward => signed_sqrt_neg(r.chosen_reward),
        }
    }
}

/// sqrt(-r) for r <= 0 and -sqrt(r) for r > 0 (see the module docs); NaN stays NaN.
pub fn signed_sqrt_neg(r: f64) -> f64 {
    if r > 0.0 { -r.sqrt() } else { (-r).sqrt() }
}

/// The correlation of one metric with the win rate in one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricCorrelation {
    /// An objective, or `*` for the standard objectives pooled.
    pub objective: String,
    /// A size, or `*` for all sizes pooled.
    pub size: String,
    pub metric: Metric,
    /// Rows in the group.
    pub n: usize,
    /// `None` when undefined; `problem` says why.
    pub corr: Option<Correlation>,
    pub problem: Option<String>,
    /// Rows with E[r(x, y_w)] > 0 (only for `SqrtNegChosenReward`, else 0).
    pub n_nonneg_chosen: usize,
}

/// Correlation of `metric` with win rate over `rows` (all of them must be usable).
pub fn metric_correlation(
    objective: &str,
    size: &str,
    metric: Metric,
    rows: &[&ResultRow],
    n_boot: usize,
    seed: u64,
) -> MetricCorrelation {
    let x: Vec<f64> = rows.iter().map(|r| metric.value(r)).collect();
    let y: Vec<f64> = rows.iter().map(|r| r.win_rate).collect();
    let bad = rows
        .iter()
        .zip(x.iter().zip(&y))
        .find(|(_, (a, b))| !a.is_finite() || !b.is_finite());
    let n_nonneg_chosen = match metric {
        Metric::SqrtNegChosenReward => rows.iter().filter(|r| r.chosen_reward > 0.0).count(),
        _ => 0,
    };
    let (corr, problem) = if let Some((r, _)) = bad {
        (
            None,
            Some(format!(
                "{}/{} beta={} checkpoint={} seed={}: {} or win_rate is not finite",
                r.objective,
                r.size,
                r.beta,
                r.checkpoint,
                r.seed,
                metric.name()
            )),
        )
    } else {
        match correlation(&x, &y, n_boot, seed) {
            Some(c) => (Some(c), None),
            None => (
                None,
                Some(format!(
                    "{objective}/{size}: correlation undefined ({} points, or a constant variable)",
                    rows.len()
                )),
            ),
        }
    };
    MetricCorrelation {
        objective: objective.to_string(),
        size: size.to_string(),
        metric,
        n: rows.len(),
        corr,
        problem,
        n_nonneg_chosen,
    }
}

/// Every metric against win rate in every group (see the module docs), sorted by group.
pub fn metric_correlations(rows: &[ResultRow], n_boot: usize, seed: u64) -> Vec<MetricCorrelation> {
    let mut groups: BTreeMap<(String, String), Vec<&ResultRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.is_sft()) {
        groups
            .entry((r.objective.clone(), r.size.clone()))
            .or_default()
            .push(r);
        groups
            .entry((r.objective.clone(), POOLED.into()))
            .or_default()
            .push(r);
        if STANDARD_OBJECTIVES.contains(&r.objective.as_str()) {
            groups
                .entry((POOLED.into(), r.size.clone()))
                .or_default()
                .push(r);
            groups
                .entry((POOLED.into(), POOLED.into()))
                .or_default()
                .push(r);
        }
    }
    let mut out = Vec::new();
    for ((o, s), g) in &groups {
        for m in Metric::ALL {
            out.push(metric_correlation(o, s, m, g, n_boot, seed));
        }
    }
    out
}

/// Write metric correlations as CSV (atomically). Non-finite numbers are empty fields.
pub fn write_metrics_csv(path: &Path, cs: &[MetricCorrelation]) -> Result<()> {
    let mut s = String::from(
        "objective,size,metric,n,pearson,pearson_lo,pearson_hi,spearman,spearman_lo,spearman_hi,n_nonneg_chosen,problem\n",
    );
    for c in cs {
        let k = c.corr;
        let g = |f: fn(&Correlation) -> f64| csv_num(k.as_ref().map_or(f64::NAN, f));
        let cells = [
            csv_str(&c.objective),
            csv_str(&c.size),
            c.metric.name().to_string(),
            c.n.to_string(),
            g(|c| c.pearson),
            g(|c| c.pearson_lo),
            g(|c| c.pearson_hi),
            g(|c| c.spearman),
            g(|c| c.spearman_lo),
            g(|c| c.spearman_hi),
            c.n_nonneg_chosen.to_string(),
            csv_str(c.problem.as_deref().unwrap_or("")),
        ];
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    crate::util::write_atomic(path, s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn perfect_linear_relation_has_pearson_one() {
        let x: Vec<f64> = (0..30).map(|v| v as f64).collect();
        let y: Vec<f64> = x.iter().map(|v| 2.0 * v + 1.0).collect();
        let c = correlation(&x, &y, 200, 1).unwrap();
        assert!((c.pearson - 1.0).abs() < 1e-12 && (c.spearman - 1.0).abs() < 1e-12);
        assert!(c.pearson_lo > 0.999 && c.spearman_excludes_zero());
        let neg: Vec<f64> = x.iter().map(|v| -v).collect();
        assert!((pearson(&x, &neg).unwrap() + 1.0).abs() < 1e-12);
    }

    #[test]
    fn independent_noise_has_correlation_near_zero() {
        let mut rng = StdRng::seed_from_u64(5);
        let nd = Normal::new(0.0, 1.0).unwrap();
        let x: Vec<f64> = (0..400).map(|_| nd.sample(&mut rng)).collect();
        let y: Vec<f64> = (0..400).map(|_| nd.sample(&mut rng)).collect();
        let c = correlation(&x, &y, 500, 2).unwrap();
        assert!(c.pearson.abs() < 0.15 && c.spearman.abs() < 0.15, "{c:?}");
        assert!(c.pearson_lo < 0.0 && c.pearson_hi > 0.0, "{c:?}");
        assert!(!c.spearman_excludes_zero(), "{c:?}");
    }

    #[test]
    fn spearman_sees_monotone_not_linear() {
        let x: Vec<f64> = (1..=20).map(|v| v as f64).collect();
        let y: Vec<f64> = x.iter().map(|v| v.powi(5)).collect();
        assert!((spearman(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &y).unwrap() < 0.95);
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
    }

    #[test]
    fn signed_sqrt_handles_positive_rewards() {
        assert_eq!(signed_sqrt_neg(-4.0), 2.0);
        assert_eq!(signed_sqrt_neg(4.0), -2.0);
        assert_eq!(signed_sqrt_neg(0.0), 0.0);
        assert!(signed_sqrt_neg(f64::NAN).is_nan());
    }
}
