//! Section 3.2: functional forms of the win-rate gain against d = sqrt(KL).
//!
//! What is fitted: the GAIN of a policy's win rate over the SFT policy of the same size and
//! seed, `gain = win_rate - win_rate(sft)`, against `d = sqrt(max(kl, 0))` (a slightly negative
//! Monte-Carlo KL estimate counts as d = 0). The SFT policy itself (d = 0, gain = 0 by
//! definition) is not a data point. Every DAA checkpoint is a point (all betas, all
//! checkpoints, every seed separately).
//!
//! Forms (all linear in their coefficients, solved by least squares):
//! - `log_d`: R(d) = d (alpha - b ln d), defined as 0 at d = 0 (Gao et al. 2023, paper eq. 5).
//! - `quad_kl`: a KL + c KL^2, through the origin.
//! - `quad_d`: a d + c d^2, through the origin.
//! - `quad_kl_icpt`, `quad_d_icpt`: the same with a free intercept c0 (3 coefficients).
//!
//! Decision: the comparison of claim C5 uses the three forms through the origin. The gain is 0
//! at d = 0 by construction, so a form that must pass through the origin is the like-for-like
//! alternative to R(d), and all three then have two coefficients, so in-sample RMSEs compare
//! fairly. The intercept variants are reported as well (the paper does not say whether its
//! quadratic in KL had an intercept); leave-one-out RMSE is reported for every form.
//!
//! RMSE is sqrt(mean squared residual) (divided by n, not n - p). Leave-one-out RMSE refits
//! without each point in turn and predicts it. Bootstrap intervals resample points with
//! replacement (seeded) and take percentile intervals of the refitted coefficients;
//! resamples whose design is rank deficient are skipped and counted (`n_boot_ok`).

use super::stats::{Resampler, lstsq, percentile_interval};
use super::table::{ResultRow, STANDARD_OBJECTIVES, fkey};
use super::{csv_num, csv_str};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Label used for "all sizes" / "all standard objectives" in pooled groups.
pub const POOLED: &str = "*";

/// A functional form of gain against d.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// d (alpha - b ln d); coefficients [alpha, b].
    LogD,
    /// a KL + c KL^2; coefficients [a, c].
    QuadKl,
    /// a d + c d^2; coefficients [a, c].
    QuadD,
    /// c0 + a KL + c KL^2; coefficients [c0, a, c].
    QuadKlIcpt,
    /// c0 + a d + c d^2; coefficients [c0, a, c].
    QuadDIcpt,
}

impl Form {
    pub const ALL: [Form; 5] = [
        Form::LogD,
        Form::QuadKl,
        Form::QuadD,
        Form::QuadKlIcpt,
        Form::QuadDIcpt,
    ];
    /// The three two-coefficient forms through the origin that claim C5 compares.
    pub const MAIN: [Form; 3] = [Form::LogD, Form::QuadKl, Form::QuadD];

    pub fn name(self) -> &'static str {
        match self {
            Form::LogD => "log_d",
            Form::QuadKl => "quad_kl",
            Form::QuadD => "quad_d",
            Form::QuadKlIcpt => "quad_kl_icpt",
            Form::QuadDIcpt => "quad_d_icpt",
        }
    }

    pub fn coef_names(self) -> &'static [&'static str] {
        match self {
            Form::LogD => &["alpha", "b"],
            Form::QuadKl | Form::QuadD => &["a", "c"],
            Form::QuadKlIcpt | Form::QuadDIcpt => &["c0", "a", "c"],
        }
    }

    pub fn n_params(self) -> usize {
        self.coef_names().len()
    }

    /// Feature vector at d (the prediction is its dot product with the coefficients).
    pub fn features(self, d: f64) -> Vec<f64> {
        let kl = d * d;
        match self {
            Form::LogD => {
                let dlnd = if d > 0.0 { d * d.ln() } else { 0.0 };
                vec![d, -dlnd]
            }
            Form::QuadKl => vec![kl, kl * kl],
            Form::QuadD => vec![d, d * d],
            Form::QuadKlIcpt => vec![1.0, kl, kl * kl],
            Form::QuadDIcpt => vec![1.0, d, d * d],
        }
    }

    /// The form's value at d with the given coefficients.
    pub fn eval(self, coef: &[f64], d: f64) -> f64 {
        self.features(d).iter().zip(coef).map(|(f, c)| f * c).sum()
    }
}

/// Fitting options.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FitOptions {
    /// Bootstrap resamples (0: no intervals; the bounds are NaN).
    pub n_boot: usize,
    pub seed: u64,
    /// Coverage of the percentile intervals.
    pub level: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            n_boot: 1000,
            seed: 0,
            level: 0.95,
        }
    }
}

/// One fitted form.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub form: Form,
    /// Coefficients in the order of `Form::coef_names`.
    pub coef: Vec<f64>,
    /// Bootstrap percentile interval of each coefficient (NaN without bootstrap).
    pub coef_lo: Vec<f64>,
    pub coef_hi: Vec<f64>,
    pub n: usize,
    /// In-sample root mean squared residual.
    pub rmse: f64,
    /// Leave-one-out RMSE (NaN when a refit without one point is not identifiable).
    pub loo_rmse: f64,
    /// Bootstrap resamples that gave a fit.
    pub n_boot_ok: usize,
}

impl Fit {
    /// Predicted gain over the SFT policy at d = sqrt(KL). Add the SFT win rate to overlay it
    /// on a win-rate plot.
    pub fn predict(&self, d: f64) -> f64 {
        self.form.eval(&self.coef, d)
    }

    /// `n + 1` points (d, predicted gain) evenly spaced on [0, d_max], for overlays.
    pub fn curve(&self, d_max: f64, n: usize) -> Vec<(f64, f64)> {
        (0..=n)
            .map(|i| {
                let d = d_max * i as f64 / n.max(1) as f64;
                (d, self.predict(d))
            })
            .collect()
    }

    /// d at which the fitted curve peaks, when it has an interior maximum:
    /// log_d: exp(alpha / b - 1) for b > 0; quad_d: -a / (2c) for c < 0 (and a > 0);
    /// quad_kl: sqrt(-a / (2c)) for c < 0 (and a > 0). The intercept forms peak where their
    /// quadratic part does.
    pub fn peak_d(&self) -> Option<f64> {
        let (a, c) = match self.form {
            Form::LogD => {
                let (alpha, b) = (self.coef[0], self.coef[1]);
                return (b > 0.0).then(|| (alpha / b - 1.0).exp());
            }
            Form::QuadKl | Form::QuadD => (self.coef[0], self.coef[1]),
            Form::QuadKlIcpt | Form::QuadDIcpt => (self.coef[1], self.coef[2]),
        };
        if !(c < 0.0 && a > 0.0) {
            return None;
        }
        let v = -a / (2.0 * c);
        match self.form {
            Form::QuadKl | Form::QuadKlIcpt => Some(v.sqrt()),
            _ => Some(v),
        }
    }
}

fn solve(form: Form, d: &[f64], y: &[f64]) -> Option<Vec<f64>> {
    let x: Vec<Vec<f64>> = d.iter().map(|&t| form.features(t)).collect();
    lstsq(&x, y)
}

fn rmse(form: Form, coef: &[f64], d: &[f64], y: &[f64]) -> f64 {
    let ss: f64 = d
        .iter()
        .zip(y)
        .map(|(&t, &v)| (v - form.eval(coef, t)).powi(2))
        .sum();
    (ss / d.len() as f64).sqrt()
}

/// Fit one form to points (d, y). Errors when the points are fewer than the coefficients,
/// contain non-finite values, or do not identify the coefficients.
pub fn fit_form(form: Form, d: &[f64], y: &[f64], opts: &FitOptions) -> Result<Fit> {
    let n = d.len();
    if n != y.len() {
        bail!("{}: {} d values but {} gains", form.name(), n, y.len());
    }
    if let Some(i) = d.iter().chain(y).position(|v| !v.is_finite()) {
        bail!("{}: non-finite value at position {i}", form.name());
    }
    if n < form.n_params() {
        bail!(
            "{}: {n} points for {} coefficients",
            form.name(),
            form.n_params()
        );
    }
    let Some(coef) = solve(form, d, y) else {
        bail!(
            "{}: the {n} points do not identify the coefficients",
            form.name()
        );
    };
    let in_rmse = rmse(form, &coef, d, y);

    let mut loo_ss = 0.0;
    let mut loo_ok = n > form.n_params();
    if loo_ok {
        for i in 0..n {
            let dd: Vec<f64> = d
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, v)| *v)
                .collect();
            let yy: Vec<f64> = y
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, v)| *v)
                .collect();
            match solve(form, &dd, &yy) {
                Some(c) => loo_ss += (y[i] - form.eval(&c, d[i])).powi(2),
                None => {
                    loo_ok = false;
                    break;
                }
            }
        }
    }
    let loo_rmse = if loo_ok {
        (loo_ss / n as f64).sqrt()
    } else {
        f64::NAN
    };

    let p = form.n_params();
    let mut reps: Vec<Vec<f64>> = vec![Vec::with_capacity(opts.n_boot); p];
    let mut rs = Resampler::new(opts.seed);
    let mut n_boot_ok = 0;
    for _ in 0..opts.n_boot {
        let idx = rs.draw(n);
        let dd: Vec<f64> = idx.iter().map(|&i| d[i]).collect();
        let yy: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        if let Some(c) = solve(form, &dd, &yy) {
            n_boot_ok += 1;
            for (r, v) in reps.iter_mut().zip(c) {
                r.push(v);
            }
        }
    }
    let (coef_lo, coef_hi): (Vec<f64>, Vec<f64>) = reps
        .iter()
        .map(|r| percentile_interval(r, opts.level))
        .unzip();
    Ok(Fit {
        form,
        coef,
        coef_lo,
        coef_hi,
        n,
        rmse: in_rmse,
        loo_rmse,
        n_boot_ok,
    })
}

/// One (d, gain) point: a DAA checkpoint of one seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GainPoint {
    pub objective: String,
    pub size: String,
    pub beta: f64,
    pub checkpoint: f64,
    pub seed: u64,
    /// sqrt(max(kl, 0)).
    pub d: f64,
    /// win_rate - win_rate of the SFT row of the same size and seed.
    pub gain: f64,
}

/// A DAA row that could not become a gain point, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dropped {
    pub objective: String,
    pub size: String,
    pub reason: String,
}

/// Gain points of every DAA row, and the rows that could not be used.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GainPoints {
    pub points: Vec<GainPoint>,
    pub dropped: Vec<Dropped>,
}

/// Turn result rows into gain points. The baseline of a DAA row is the mean win rate of the
/// SFT rows of its size and seed, else (the usual case when several DAA seeds start from one
/// SFT model) of all SFT rows of its size. A DAA row is dropped (and listed with the reason)
/// when its kl or win_rate is not finite, or when its size has no SFT row with a finite win
/// rate.
pub fn gain_points(rows: &[ResultRow]) -> GainPoints {
    let mut sft: BTreeMap<(&str, u64), Vec<f64>> = BTreeMap::new();
    let mut sft_any_seed: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.is_sft() && r.win_rate.is_finite()) {
        sft.entry((r.size.as_str(), r.seed))
            .or_default()
            .push(r.win_rate);
        sft_any_seed
            .entry(r.size.as_str())
            .or_default()
            .push(r.win_rate);
    }
    let mut out = GainPoints::default();
    for r in rows.iter().filter(|r| !r.is_sft()) {
        let drop = |reason: String| Dropped {
            objective: r.objective.clone(),
            size: r.size.clone(),
            reason,
        };
        let what = format!(
            "{}/{} beta={} checkpoint={} seed={}",
            r.objective, r.size, r.beta, r.checkpoint, r.seed
        );
        if !r.kl.is_finite() || !r.win_rate.is_finite() {
            out.dropped
                .push(drop(format!("{what}: kl or win_rate is not finite")));
            continue;
        }
        let Some(base) = sft
            .get(&(r.size.as_str(), r.seed))
            .or_else(|| sft_any_seed.get(r.size.as_str()))
        else {
            out.dropped.push(drop(format!(
                "{what}: no SFT row (objective \"sft\") with a finite win rate for size {}",
                r.size
            )));
            continue;
        };
        let base = base.iter().sum::<f64>() / base.len() as f64;
        out.points.push(GainPoint {
            objective: r.objective.clone(),
            size: r.size.clone(),
            beta: r.beta,
            checkpoint: r.checkpoint,
            seed: r.seed,
            d: r.kl.max(0.0).sqrt(),
            gain: r.win_rate - base,
        });
    }
    out
}

/// The fits of one group of points.
#[derive(Debug, Clone, Serialize)]
pub struct FitGroup {
    /// An objective, or `*` for the three standard objectives pooled.
    pub objective: String,
    /// A size, or `*` for all sizes pooled.
    pub size: String,
    pub n: usize,
    /// The forms that could be fitted, in `Form::ALL` order.
    pub fits: Vec<Fit>,
    /// Forms that could not be fitted and dropped rows of this group, with reasons.
    pub problems: Vec<String>,
}

impl FitGroup {
    pub fn get(&self, form: Form) -> Option<&Fit> {
        self.fits.iter().find(|f| f.form == form)
    }

    /// The main forms ordered by in-sample RMSE, best first.
    pub fn ranking(&self) -> Vec<(Form, f64)> {
        let mut v: Vec<(Form, f64)> = Form::MAIN
            .iter()
            .filter_map(|&f| self.get(f).map(|x| (f, x.rmse)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v
    }
}

/// Fit every form to one set of points, collecting the forms that fail as problems.
pub fn fit_points(
    objective: &str,
    size: &str,
    points: &[&GainPoint],
    opts: &FitOptions,
) -> FitGroup {
    let d: Vec<f64> = points.iter().map(|p| p.d).collect();
    let y: Vec<f64> = points.iter().map(|p| p.gain).collect();
    let mut fits = Vec::new();
    let mut problems = Vec::new();
    for form in Form::ALL {
        match fit_form(form, &d, &y, opts) {
            Ok(f) => fits.push(f),
            Err(e) => problems.push(format!("{objective}/{size}: {e}")),
        }
    }
    FitGroup {
        objective: objective.to_string(),
        size: size.to_string(),
        n: points.len(),
        fits,
        problems,
    }
}

/// Fits per (objective, size), per objective with sizes pooled, and for the three standard
/// objectives and all sizes pooled. `checkpoints`: `None` uses every checkpoint, `Some(c)` only
/// the checkpoint c (e.g. `Some(1.0)` for end of epoch).
pub fn fit_table(rows: &[ResultRow], checkpoints: Option<f64>, opts: &FitOptions) -> Vec<FitGroup> {
    let gp = gain_points(rows);
    let keep = |p: &&GainPoint| checkpoints.is_none_or(|c| fkey(p.checkpoint) == fkey(c));
    let pts: Vec<&GainPoint> = gp.points.iter().filter(keep).collect();
    let mut groups: BTreeMap<(String, String), Vec<&GainPoint>> = BTreeMap::new();
    for p in &pts {
        groups
            .entry((p.objective.clone(), p.size.clone()))
            .or_default()
            .push(p);
        groups
            .entry((p.objective.clone(), POOLED.into()))
            .or_default()
            .push(p);
        if STANDARD_OBJECTIVES.contains(&p.objective.as_str()) {
            groups
                .entry((POOLED.into(), POOLED.into()))
                .or_default()
                .push(p);
        }
    }
    // Groups that exist only through dropped rows still show up, with their problems.
    for d in &gp.dropped {
        groups
            .entry((d.objective.clone(), d.size.clone()))
            .or_default();
    }
    groups
        .into_iter()
        .map(|((o, s), v)| {
            let mut g = fit_points(&o, &s, &v, opts);
            let mine = gp.dropped.iter().filter(|d| {
                (o == POOLED && STANDARD_OBJECTIVES.contains(&d.objective.as_str())
                    || d.objective == o)
                    && (s == POOLED || d.size == s)
            });
            g.problems.extend(mine.map(|d| d.reason.clone()));
            g
        })
        .collect()
}

/// Write the fit table as CSV (atomically): one line per (group, form) with coefficients
/// c0..c2 in `Form::coef_names` order and their bootstrap bounds. Non-finite numbers are
/// empty fields.
pub fn write_fit_csv(path: &Path, groups: &[FitGroup]) -> Result<()> {
    let mut s = String::from(
        "objective,size,form,coef_names,n,c0,c0_lo,c0_hi,c1,c1_lo,c1_hi,c2,c2_lo,c2_hi,rmse,loo_rmse,peak_d,n_boot_ok\n",
    );
    for g in groups {
        for f in &g.fits {
            let mut cells = vec![
                csv_str(&g.objective),
                csv_str(&g.size),
                f.form.name().to_string(),
                csv_str(&f.form.coef_names().join(";")),
                f.n.to_string(),
            ];
            for i in 0..3 {
                let get = |v: &Vec<f64>| v.get(i).copied().unwrap_or(f64::NAN);
                cells.push(csv_num(get(&f.coef)));
                cells.push(csv_num(get(&f.coef_lo)));
                cells.push(csv_num(get(&f.coef_hi)));
            }
            cells.push(csv_num(f.rmse));
            cells.push(csv_num(f.loo_rmse));
            cells.push(csv_num(f.peak_d().unwrap_or(f64::NAN)));
            cells.push(f.n_boot_ok.to_string());
            s.push_str(&cells.join(","));
            s.push('\n');
        }
    }
    crate::util::write_atomic(path, s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    fn grid() -> Vec<f64> {
        (1..=28).map(|i| 0.1 * i as f64).collect()
    }

    fn noisy(f: impl Fn(f64) -> f64, sd: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let noise = Normal::new(0.0, sd).unwrap();
        let d = grid();
        let y = d.iter().map(|&t| f(t) + noise.sample(&mut rng)).collect();
        (d, y)
    }

    #[test]
    fn log_form_recovers_coefficients_within_bootstrap_interval() {
        let (alpha, b) = (0.3, 0.25);
        let (d, y) = noisy(|t| t * (alpha - b * t.ln()), 0.01, 7);
        let f = fit_form(Form::LogD, &d, &y, &FitOptions::default()).unwrap();
        assert_eq!(f.n, d.len());
        for (i, want) in [alpha, b].into_iter().enumerate() {
            assert!(
                f.coef_lo[i] <= want && want <= f.coef_hi[i],
                "coef {i}: {want} outside [{}, {}] ({:?})",
                f.coef_lo[i],
                f.coef_hi[i],
                f.coef
            );
            assert!((f.coef[i] - want).abs() < 0.02, "{:?}", f.coef);
        }
        assert!(f.n_boot_ok > 990);
        assert!(f.rmse < 0.015 && f.loo_rmse >= f.rmse, "{f:?}");
        // Peak of d(alpha - b ln d): exp(alpha/b - 1).
        let peak = f.peak_d().unwrap();
        assert!((peak - (alpha / b - 1.0f64).exp()).abs() < 0.1, "{peak}");
        assert_eq!(f.predict(0.0), 0.0);
        assert_eq!(f.curve(2.0, 4).len(), 5);
    }

    #[test]
    fn rmse_ranks_the_generating_form_first() {
        type Truth = (Form, fn(f64) -> f64);
        let truths: [Truth; 3] = [
            (Form::LogD, |t: f64| t * (0.3 - 0.25 * t.ln())),
            (Form::QuadKl, |t: f64| 0.2 * t * t - 0.03 * t.powi(4)),
            (Form::QuadD, |t: f64| 0.4 * t - 0.2 * t * t),
        ];
        for (k, (form, f)) in truths.iter().enumerate() {
            let (d, y) = noisy(f, 0.005, 100 + k as u64);
            let pts: Vec<GainPoint> = d
                .iter()
                .zip(&y)
                .map(|(&d, &gain)| GainPoint {
                    objective: "dpo".into(),
                    size: "s".into(),
                    beta: 0.1,
                    checkpoint: 1.0,
                    seed: 0,
                    d,
                    gain,
                })
                .collect();
            let refs: Vec<&GainPoint> = pts.iter().collect();
            let g = fit_points(
                "dpo",
                "s",
                &refs,
                &FitOptions {
                    n_boot: 0,
                    ..Default::default()
                },
            );
            let rank = g.ranking();
            assert_eq!(rank.len(), 3);
            assert_eq!(rank[0].0, *form, "data from {form:?} ranked {rank:?}");
            let loo_best = Form::MAIN
                .iter()
                .min_by(|a, b| {
                    g.get(**a)
                        .unwrap()
                        .loo_rmse
                        .total_cmp(&g.get(**b).unwrap().loo_rmse)
                })
                .unwrap();
            assert_eq!(loo_best, form);
        }
    }

    #[test]
    fn fit_errors_name_the_problem() {
        let e = fit_form(
            Form::QuadKlIcpt,
            &[1.0, 2.0],
            &[0.1, 0.2],
            &FitOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 points for 3 coefficients"), "{e}");
        let e = fit_form(
            Form::LogD,
            &[1.0, 1.0, 1.0],
            &[0.1, 0.2, 0.3],
            &FitOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("do not identify"), "{e}");
        let e = fit_form(
            Form::QuadD,
            &[1.0, f64::NAN],
            &[0.1, 0.2],
            &FitOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("non-finite"), "{e}");
    }
}
