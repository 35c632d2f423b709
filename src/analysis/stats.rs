//! Small numerical helpers for the analysis: least squares, means, quantiles, ranks, bootstrap
//! resampling. Everything here works on plain slices of `f64` and is deterministic given a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// z of the two-sided 95% normal interval; used to turn a 95% CI into a standard error.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Arithmetic mean; NaN for an empty slice.
pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        f64::NAN
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Standard error implied by a symmetric 95% interval `[lo, hi]`.
pub fn se_from_ci95(lo: f64, hi: f64) -> f64 {
    (hi - lo).abs() / (2.0 * Z95)
}

/// Least squares `y ~ X c` without an implicit intercept (put a column of ones in `x` for one).
///
/// `x` holds one row of features per observation. Solved by Householder QR on column-scaled
/// features, so features of very different magnitude (KL and KL^2) stay well conditioned.
/// Returns `None` when there are fewer observations than features, a value is not finite, or
/// the design is rank deficient (a column is zero or a combination of the others).
pub fn lstsq(x: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let n = x.len();
    if n == 0 || n != y.len() {
        return None;
    }
    let p = x[0].len();
    if p == 0 || n < p || x.iter().any(|r| r.len() != p) {
        return None;
    }
    if x.iter().flatten().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    // Column-major copy, each column scaled to unit norm.
    let mut scale = vec![0.0; p];
    let mut a: Vec<Vec<f64>> = Vec::with_capacity(p);
    for (j, s) in scale.iter_mut().enumerate() {
        let col: Vec<f64> = x.iter().map(|r| r[j]).collect();
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return None;
        }
        *s = norm;
        a.push(col.into_iter().map(|v| v / norm).collect());
    }
    let mut b = y.to_vec();
    for k in 0..p {
        let norm = a[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm < 1e-10 {
            return None;
        }
        let alpha = if a[k][k] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = a[k][k..].to_vec();
        v[0] -= alpha;
        let vv: f64 = v.iter().map(|t| t * t).sum();
        if vv > 0.0 {
            for col in a.iter_mut().skip(k) {
                let s = 2.0 * v.iter().zip(&col[k..]).map(|(p, q)| p * q).sum::<f64>() / vv;
                for (c, vi) in col[k..].iter_mut().zip(&v) {
                    *c -= s * vi;
                }
            }
            let s = 2.0 * v.iter().zip(&b[k..]).map(|(p, q)| p * q).sum::<f64>() / vv;
            for (c, vi) in b[k..].iter_mut().zip(&v) {
                *c -= s * vi;
            }
        }
        if a[k][k].abs() < 1e-10 {
            return None;
        }
    }
    let mut c = vec![0.0; p];
    for k in (0..p).rev() {
        let mut acc = b[k];
        for j in k + 1..p {
            acc -= a[j][k] * c[j];
        }
        c[k] = acc / a[k][k];
    }
    let out: Vec<f64> = c.iter().zip(&scale).map(|(ci, s)| ci / s).collect();
    out.iter().all(|v| v.is_finite()).then_some(out)
}

/// Quantile of an ascending-sorted, non-empty slice by linear interpolation between order
/// statistics (q in [0, 1]).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let t = pos - lo as f64;
    sorted[lo] * (1.0 - t) + sorted[hi] * t
}

/// Median of the finite values; NaN if there are none.
pub fn median(x: &[f64]) -> f64 {
    let mut v: Vec<f64> = x.iter().copied().filter(|t| t.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, 0.5)
}

/// Percentile interval at `level` (e.g. 0.95) of bootstrap replicates; NaNs are ignored.
/// Returns (NaN, NaN) when no finite replicate exists.
pub fn percentile_interval(replicates: &[f64], level: f64) -> (f64, f64) {
    let mut v: Vec<f64> = replicates
        .iter()
        .copied()
        .filter(|t| t.is_finite())
        .collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let a = (1.0 - level) / 2.0;
    (quantile_sorted(&v, a), quantile_sorted(&v, 1.0 - a))
}

/// Ranks 1..=n with ties given their average rank.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// A seeded generator of bootstrap index sets (sampling with replacement).
pub struct Resampler {
    rng: StdRng,
}

impl Resampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// `n` indices drawn uniformly with replacement from `0..n`.
    pub fn draw(&mut self, n: usize) -> Vec<usize> {
        (0..n).map(|_| self.rng.random_range(0..n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lstsq_solves_exact_system() {
        // y = 2 + 3 x - 0.5 x^2 on 6 points.
        let xs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let rows: Vec<Vec<f64>> = xs.iter().map(|&x| vec![1.0, x, x * x]).collect();
        let y: Vec<f64> = xs.iter().map(|&x| 2.0 + 3.0 * x - 0.5 * x * x).collect();
        let c = lstsq(&rows, &y).unwrap();
        for (got, want) in c.iter().zip([2.0, 3.0, -0.5]) {
            assert!((got - want).abs() < 1e-9, "{c:?}");
        }
    }

    #[test]
    fn lstsq_rejects_rank_deficient() {
        let rows: Vec<Vec<f64>> = (0..5).map(|i| vec![i as f64, 2.0 * i as f64]).collect();
        assert!(lstsq(&rows, &[1.0, 2.0, 3.0, 4.0, 5.0]).is_none());
        assert!(lstsq(&[vec![1.0, 2.0]], &[1.0]).is_none());
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile_sorted(&v, 0.5), 3.0);
        assert_eq!(quantile_sorted(&v, 0.125), 1.5);
        assert_eq!(median(&[f64::NAN, 4.0, 1.0]), 2.5);
    }
}
