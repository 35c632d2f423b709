//! A verdict for each claim C1-C9 of the specification (SPEC section 3), computed from the
//! results table, the per-sample length data and the toy-MDP summaries.
//!
//! The rules, with their thresholds, are written down in docs/claims.md; the `rule` string of
//! each verdict repeats them. Two principles hold throughout:
//!
//! - A claim is broken into parts (cells: an objective and a size, a beta, ...), each of which
//!   holds, fails, or cannot be evaluated (no rows, a NaN in a value the part needs, fewer
//!   points than it needs). Parts are combined with three-valued logic: a combination is
//!   `Holds` or `Fails` only when it would be so whatever the unevaluated parts turned out to
//!   be, and `NotEvaluated` otherwise. Missing data therefore never makes a claim pass.
//! - "The same policy over seeds" is the mean over seeds; its standard error is
//!   sqrt(sum se_i^2) / k, each se_i read off the row's 95% win-rate interval.

use super::fits::{FitOptions, Form, GainPoint, fit_form, gain_points};
use super::length::length_fits;
use super::metrics::{Metric, metric_correlation, signed_sqrt_neg, spearman};
use super::stats::{median, se_from_ci95};
use super::table::{ResultRow, STANDARD_OBJECTIVES, SampleRow, ToyMdpSummary, fkey};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Outcome of a claim or of one of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerdictKind {
    #[serde(rename = "holds")]
    Holds,
    #[serde(rename = "fails")]
    Fails,
    #[serde(rename = "not evaluated")]
    NotEvaluated,
}

impl VerdictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Holds => "holds",
            VerdictKind::Fails => "fails",
            VerdictKind::NotEvaluated => "not evaluated",
        }
    }

    fn from_bool(b: bool) -> Self {
        if b {
            VerdictKind::Holds
        } else {
            VerdictKind::Fails
        }
    }
}

use VerdictKind::{Fails, Holds, NotEvaluated};

/// The verdict on one claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// "C1" .. "C9".
    pub id: String,
    pub verdict: VerdictKind,
    /// The rule applied, thresholds included.
    pub rule: String,
    /// The numbers the verdict rests on: every part with its own verdict and values.
    pub numbers: Value,
    /// One or a few sentences for a reader.
    pub summary: String,
}

/// The thresholds of the rules (docs/claims.md explains each).
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    /// One-sided z for "clearly above": a rise or fall must exceed z x the combined standard
    /// error of the two win rates (C1, C2, C8).
    pub hump_z: f64,
    /// ... and at least this much absolute win rate.
    pub min_margin: f64,
    /// Betas a curve needs (C1, C3, C4, C6, C8).
    pub min_betas: usize,
    /// Checkpoints a beta needs for the intra-epoch rule (C2).
    pub min_checkpoints: usize,
    /// Fraction of a cell's betas, smallest first, that count as "wide KL budget" (C2).
    pub wide_fraction: f64,
    /// Fraction of the shared betas at which IPO's KL must be the lowest (C3).
    pub c3_kl_fraction: f64,
    /// R(d) must reach at most this fraction of the quadratic-in-KL RMSE (C5).
    pub c5_kl_ratio_max: f64,
    /// The quadratic in d must have an RMSE within this band of R(d)'s (C5).
    pub c5_d_ratio_band: (f64, f64),
    /// Points a fit needs (C5).
    pub min_fit_points: usize,
    /// Shared (objective, beta, checkpoint) keys the size comparison needs (C6).
    pub min_length_keys: usize,
    /// |Spearman| at or above which a metric "predicts" win rate (with its 95% bootstrap
    /// interval excluding 0) (C7).
    pub c7_rho: f64,
    /// Points a correlation needs (C7).
    pub min_corr_points: usize,
    /// Bootstrap resamples for correlation intervals (C7).
    pub n_boot: usize,
    /// Seed of every bootstrap.
    pub seed: u64,
    /// OOD mass gain that counts as "substantial" for one toy run (C9).
    pub c9_ood_substantial: f64,
    /// Fraction of an objective's toy runs that must move substantial mass OOD (C9).
    pub c9_run_fraction: f64,
    /// Toy runs an objective needs (C9).
    pub c9_min_runs: usize,
    /// Range over DPO seeds (of OOD or preferred mass) that counts as "differs run to run" (C9).
    pub c9_spread: f64,
    /// Seeds a DPO beta needs for the spread (C9).
    pub c9_min_seeds: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            hump_z: 1.645,
            min_margin: 0.01,
            min_betas: 3,
            min_checkpoints: 3,
            wide_fraction: 1.0 / 3.0,
            c3_kl_fraction: 2.0 / 3.0,
            c5_kl_ratio_max: 0.75,
            c5_d_ratio_band: (2.0 / 3.0, 1.5),
            min_fit_points: 5,
            min_length_keys: 3,
            c7_rho: 0.5,
            min_corr_points: 8,
            n_boot: 1000,
            seed: 0,
            c9_ood_substantial: 0.10,
            c9_run_fraction: 0.25,
            c9_min_runs: 4,
            c9_spread: 0.20,
            c9_min_seeds: 3,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Three-valued combination.

/// `Holds` if at least `need` parts hold, `Fails` if that is impossible even were every
/// unevaluated part to hold, else `NotEvaluated`. No parts: `NotEvaluated`.
pub fn at_least(parts: &[VerdictKind], need: usize) -> VerdictKind {
    if parts.is_empty() {
        return NotEvaluated;
    }
    let h = parts.iter().filter(|v| **v == Holds).count();
    let m = parts.iter().filter(|v| **v == NotEvaluated).count();
    if h >= need {
        Holds
    } else if h + m < need {
        Fails
    } else {
        NotEvaluated
    }
}

/// Every part holds (three-valued); no parts: `NotEvaluated`.
pub fn all_of(parts: &[VerdictKind]) -> VerdictKind {
    at_least(parts, parts.len())
}

/// At least half (rounded up).
fn half(n: usize) -> usize {
    n.div_ceil(2).max(1)
}

/// More than half.
fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// One part of a claim.
#[derive(Debug, Clone)]
struct Part {
    label: String,
    verdict: VerdictKind,
    detail: String,
    numbers: Value,
}

impl Part {
    fn missing(label: impl Into<String>, reason: impl Into<String>) -> Self {
        Part {
            label: label.into(),
            verdict: NotEvaluated,
            detail: reason.into(),
            numbers: json!({}),
        }
    }

    fn json(&self) -> Value {
        let mut v = match &self.numbers {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        v.insert("part".into(), json!(self.label));
        v.insert("verdict".into(), json!(self.verdict.as_str()));
        v.insert("detail".into(), json!(self.detail));
        Value::Object(v)
    }
}

fn verdicts(parts: &[Part]) -> Vec<VerdictKind> {
    parts.iter().map(|p| p.verdict).collect()
}

fn count_str(parts: &[Part]) -> String {
    let c = |k| parts.iter().filter(|p| p.verdict == k).count();
    format!(
        "{}/{} hold, {} fail, {} not evaluated",
        c(Holds),
        parts.len(),
        c(Fails),
        c(NotEvaluated)
    )
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

// ---------------------------------------------------------------------------------------------
// Reading the table.

/// One policy of a cell averaged over seeds.
#[derive(Debug, Clone, Copy)]
struct Pt {
    beta: f64,
    checkpoint: f64,
    kl: f64,
    win: f64,
    se: f64,
    chosen: f64,
    n_seeds: usize,
}

impl Pt {
    fn d(&self) -> f64 {
        self.kl.max(0.0).sqrt()
    }
}

fn describe(r: &ResultRow) -> String {
    format!(
        "{}/{} beta={} checkpoint={} seed={}",
        r.objective, r.size, r.beta, r.checkpoint, r.seed
    )
}

/// Mean over the rows (seeds) of one policy. Requires finite kl, win_rate and its interval,
/// and chosen_reward when `need_chosen`.
fn average(rows: &[&ResultRow], need_chosen: bool) -> Result<Pt, String> {
    let Some(first) = rows.first() else {
        return Err("no rows".into());
    };
    for r in rows {
        let mut bad = Vec::new();
        for (name, v) in [
            ("kl", r.kl),
            ("win_rate", r.win_rate),
            ("win_rate_lo", r.win_rate_lo),
            ("win_rate_hi", r.win_rate_hi),
        ] {
            if !v.is_finite() {
                bad.push(name);
            }
        }
        if need_chosen && !r.chosen_reward.is_finite() {
            bad.push("chosen_reward");
        }
        if !bad.is_empty() {
            return Err(format!("{}: {} not finite", describe(r), bad.join(", ")));
        }
    }
    let k = rows.len() as f64;
    let m = |f: fn(&ResultRow) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / k;
    let se2: f64 = rows
        .iter()
        .map(|r| se_from_ci95(r.win_rate_lo, r.win_rate_hi).powi(2))
        .sum();
    Ok(Pt {
        beta: first.beta,
        checkpoint: first.checkpoint,
        kl: m(|r| r.kl),
        win: m(|r| r.win_rate),
        se: se2.sqrt() / k,
        chosen: m(|r| r.chosen_reward),
        n_seeds: rows.len(),
    })
}

/// DAA rows of one objective and size.
fn cell_rows<'a>(rows: &'a [ResultRow], objective: &str, size: &str) -> Vec<&'a ResultRow> {
    rows.iter()
        .filter(|r| !r.is_sft() && r.objective == objective && r.size == size)
        .collect()
}

/// Rows grouped by (beta, checkpoint) keys.
fn by_beta_ckpt<'a>(rows: &[&'a ResultRow]) -> BTreeMap<(i64, i64), Vec<&'a ResultRow>> {
    let mut m: BTreeMap<(i64, i64), Vec<&ResultRow>> = BTreeMap::new();
    for r in rows {
        m.entry((fkey(r.beta), fkey(r.checkpoint)))
            .or_default()
            .push(r);
    }
    m
}

/// End-of-epoch policies of one objective and size, one per beta, sorted by beta.
fn final_points(
    rows: &[ResultRow],
    objective: &str,
    size: &str,
    need_chosen: bool,
) -> Result<Vec<Pt>, String> {
    let cell = cell_rows(rows, objective, size);
    if cell.is_empty() {
        return Err(format!("no rows for {objective}/{size}"));
    }
    let fin: Vec<&ResultRow> = cell.into_iter().filter(|r| r.is_end_of_epoch()).collect();
    if fin.is_empty() {
        return Err(format!("no end-of-epoch rows for {objective}/{size}"));
    }
    by_beta_ckpt(&fin)
        .values()
        .map(|g| average(g, need_chosen))
        .collect()
}

/// The SFT policy of a size (mean over its rows), placed at kl = 0 and chosen reward 0.
fn sft_point(rows: &[ResultRow], size: &str) -> Result<Pt, String> {
    let s: Vec<&ResultRow> = rows
        .iter()
        .filter(|r| r.is_sft() && r.size == size)
        .collect();
    if s.is_empty() {
        return Err(format!("no SFT row (objective \"sft\") for size {size}"));
    }
    for r in &s {
        if !(r.win_rate.is_finite() && r.win_rate_lo.is_finite() && r.win_rate_hi.is_finite()) {
            return Err(format!(
                "{}: win_rate or its interval not finite",
                describe(r)
            ));
        }
    }
    let k = s.len() as f64;
    let se2: f64 = s
        .iter()
        .map(|r| se_from_ci95(r.win_rate_lo, r.win_rate_hi).powi(2))
        .sum();
    Ok(Pt {
        beta: f64::NAN,
        checkpoint: 0.0,
        kl: 0.0,
        win: s.iter().map(|r| r.win_rate).sum::<f64>() / k,
        se: se2.sqrt() / k,
        chosen: 0.0,
        n_seeds: s.len(),
    })
}

/// Sizes present in the rows, smallest n_params first (a size's largest n_params counts).
fn sizes_of(rows: &[ResultRow]) -> Vec<(String, u64)> {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        let e = m.entry(r.size.as_str()).or_insert(0);
        *e = (*e).max(r.n_params);
    }
    let mut v: Vec<(String, u64)> = m.into_iter().map(|(s, n)| (s.to_string(), n)).collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn margin(th: &Thresholds, a: &Pt, b: &Pt) -> f64 {
    se_margin(th, a.se, b.se)
}

/// What a difference of two independent estimates with standard errors `a` and `b` must exceed
/// to count as clear: z x its standard error, and at least `min_margin`.
fn se_margin(th: &Thresholds, a: f64, b: f64) -> f64 {
    (th.hump_z * (a * a + b * b).sqrt()).max(th.min_margin)
}

/// Over-optimization of an end-of-epoch curve on the betas `common` (ascending; the smallest
/// beta has the widest KL budget): the highest win rate over them minus the win rate at the
/// smallest, with the standard error of that difference taken as of two independent win rates
/// (also when the peak is the smallest beta itself, where the difference is 0).
fn overoptimization(pts: &[Pt], common: &[i64]) -> (f64, f64) {
    let first = at_beta(pts, common[0]);
    let peak = highest_win(common.iter().map(|&k| at_beta(pts, k))).unwrap_or(first);
    (
        peak.win - first.win,
        (peak.se * peak.se + first.se * first.se).sqrt(),
    )
}

/// The point with the highest win rate (the first of equals); `None` for no points.
fn highest_win(pts: impl IntoIterator<Item = Pt>) -> Option<Pt> {
    pts.into_iter()
        .reduce(|best, p| if p.win > best.win { p } else { best })
}

fn beta_str(b: f64) -> String {
    if b.is_finite() {
        format!("{b}")
    } else {
        "sft".into()
    }
}

// ---------------------------------------------------------------------------------------------
// The hump (C1, C8).

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    SqrtKl,
    /// The implicit reward of the chosen response, beta included (SPEC's r(x, y_w)).
    SqrtNegChosen,
    /// The same without beta: E[log pi/pi_ref (y_w)], which the paper's section 3.5 equates with
    /// minus the forward KL (the SFT policy, beta 0, sits at 0).
    SqrtNegChosenLogRatio,
}

impl Axis {
    fn x(self, p: &Pt) -> f64 {
        match self {
            Axis::SqrtKl => p.d(),
            Axis::SqrtNegChosen => signed_sqrt_neg(p.chosen),
            Axis::SqrtNegChosenLogRatio if p.beta > 0.0 => signed_sqrt_neg(p.chosen / p.beta),
            Axis::SqrtNegChosenLogRatio => signed_sqrt_neg(p.chosen),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Axis::SqrtKl => "sqrt(KL)",
            Axis::SqrtNegChosen => "sqrt(-E[r(x,y_w)])",
            Axis::SqrtNegChosenLogRatio => "sqrt(-E[r(x,y_w)]/beta)",
        }
    }

    fn needs_chosen(self) -> bool {
        self != Axis::SqrtKl
    }
}

/// Whether the end-of-epoch curve (SFT at x = 0 plus one point per beta) rises then falls.
fn hump(label: String, sft: &Pt, pts: &[Pt], axis: Axis, th: &Thresholds) -> Part {
    if pts.len() < th.min_betas {
        return Part::missing(
            label,
            format!(
                "{} betas at end of epoch, the rule needs {}",
                pts.len(),
                th.min_betas
            ),
        );
    }
    let mut curve: Vec<(f64, Pt)> = vec![(0.0, *sft)];
    curve.extend(pts.iter().map(|p| (axis.x(p), *p)));
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = curve.len();
    let mut imax = 0;
    for (i, c) in curve.iter().enumerate() {
        if c.1.win > curve[imax].1.win {
            imax = i;
        }
    }
    let (xp, peak) = curve[imax];
    let (xf, first) = curve[0];
    let (xl, last) = curve[n - 1];
    let rise = peak.win - first.win;
    let fall = peak.win - last.win;
    let (mr, mf) = (margin(th, &peak, &first), margin(th, &peak, &last));
    let interior = imax != 0 && imax != n - 1;
    let ok = interior && rise >= mr && fall >= mf;
    let detail = if interior {
        format!(
            "win rate {} at {}={} (beta={}), rises {} from {}={} ({}), falls {} to {}={} (beta={}); margins {}/{}",
            f3(peak.win),
            axis.name(),
            f3(xp),
            beta_str(peak.beta),
            f3(rise),
            axis.name(),
            f3(xf),
            beta_str(first.beta),
            f3(fall),
            axis.name(),
            f3(xl),
            beta_str(last.beta),
            f3(mr),
            f3(mf)
        )
    } else {
        format!(
            "maximum win rate {} is at the {} end ({}={}, beta={})",
            f3(peak.win),
            if imax == 0 { "low" } else { "high" },
            axis.name(),
            f3(xp),
            beta_str(peak.beta)
        )
    };
    let points: Vec<Value> = curve
        .iter()
        .map(|(x, p)| json!({"beta": p.beta, "x": x, "kl": p.kl, "win_rate": p.win, "se": p.se, "n_seeds": p.n_seeds}))
        .collect();
    Part {
        label,
        verdict: VerdictKind::from_bool(ok),
        detail,
        numbers: json!({
            "peak_x": xp, "peak_beta": peak.beta, "peak_win_rate": peak.win,
            "rise": rise, "rise_margin": mr, "fall": fall, "fall_margin": mf,
            "last_beta": last.beta, "points": points,
        }),
    }
}

fn hump_claim(id: &str, rows: &[ResultRow], axis: Axis, th: &Thresholds) -> Verdict {
    let rule = format!(
        "For each of dpo, ipo, slic and each model size: the end-of-epoch curve (the SFT policy at \
         {x} = 0 plus one point per beta, seeds averaged, sorted by {x}) has its highest win rate at \
         an interior point, and that maximum exceeds both the first (smallest {x}) and the last \
         (largest {x}) point by at least max({m}, {z} x the combined standard error of the two win \
         rates). Needs an SFT row per size and >= {b} betas{extra}. An objective holds if at least \
         half of the sizes hold; the claim holds if every objective holds (three-valued: \
         unevaluated parts never count as holding).",
        x = axis.name(),
        m = th.min_margin,
        z = th.hump_z,
        b = th.min_betas,
        extra = match axis {
            Axis::SqrtKl => "",
            Axis::SqrtNegChosen =>
                "; x = sqrt(-E[r]) with E[r] the mean implicit reward of the chosen held-out \
                 response (signed square root -sqrt(E[r]) when E[r] > 0)",
            Axis::SqrtNegChosenLogRatio =>
                "; x = sqrt(-E[r]/beta), E[r]/beta the mean log-ratio log pi/pi_ref of the \
                 chosen held-out response (signed square root when positive)",
        }
    );
    let sizes = sizes_of(rows);
    if sizes.is_empty() {
        return not_evaluated(id, rule, "no result rows");
    }
    let need_chosen = axis.needs_chosen();
    let mut obj_v = Vec::new();
    let mut numbers = serde_json::Map::new();
    let mut summary = Vec::new();
    for obj in STANDARD_OBJECTIVES {
        let parts: Vec<Part> = sizes
            .iter()
            .map(|(size, _)| {
                let label = format!("{obj}/{size}");
                match (
                    sft_point(rows, size),
                    final_points(rows, obj, size, need_chosen),
                ) {
                    (Err(e), _) | (_, Err(e)) => Part::missing(label, e),
                    (Ok(s), Ok(p)) => hump(label, &s, &p, axis, th),
                }
            })
            .collect();
        let v = at_least(&verdicts(&parts), half(parts.len()));
        obj_v.push(v);
        let best = parts
            .iter()
            .find(|p| p.verdict == Holds)
            .or_else(|| parts.iter().find(|p| p.verdict == Fails))
            .or(parts.first());
        summary.push(format!(
            "{obj} {} (sizes: {}){}",
            v.as_str(),
            count_str(&parts),
            best.map(|p| format!("; {}: {}", p.label, p.detail))
                .unwrap_or_default()
        ));
        numbers.insert(
            obj.into(),
            json!({"verdict": v.as_str(), "parts": parts.iter().map(Part::json).collect::<Vec<_>>()}),
        );
    }
    let v = all_of(&obj_v);
    numbers.insert("thresholds".into(), json!(th));
    Verdict {
        id: id.into(),
        verdict: v,
        rule,
        numbers: Value::Object(numbers),
        summary: format!("{id} {}: {}", v.as_str(), summary.join(". ")),
    }
}

fn not_evaluated(id: &str, rule: String, reason: &str) -> Verdict {
    Verdict {
        id: id.into(),
        verdict: NotEvaluated,
        rule,
        numbers: json!({"reason": reason}),
        summary: format!("{id} not evaluated: {reason}"),
    }
}

/// Assemble a verdict from named parts combined by `v`.
fn assemble(
    id: &str,
    rule: String,
    v: VerdictKind,
    groups: Vec<(String, Vec<Part>)>,
    extra: Value,
    th: &Thresholds,
) -> Verdict {
    let mut numbers = serde_json::Map::new();
    let mut summary = Vec::new();
    for (name, parts) in &groups {
        numbers.insert(
            name.clone(),
            json!(parts.iter().map(Part::json).collect::<Vec<_>>()),
        );
        let shown = parts
            .iter()
            .find(|p| p.verdict == Fails)
            .or_else(|| parts.iter().find(|p| p.verdict == NotEvaluated))
            .or(parts.first());
        summary.push(format!(
            "{name}: {}{}",
            count_str(parts),
            shown
                .map(|p| format!(" (e.g. {}: {})", p.label, p.detail))
                .unwrap_or_default()
        ));
    }
    if let Value::Object(m) = extra {
        numbers.extend(m);
    }
    numbers.insert("thresholds".into(), json!(th));
    Verdict {
        id: id.into(),
        verdict: v,
        rule,
        numbers: Value::Object(numbers),
        summary: format!("{id} {}: {}", v.as_str(), summary.join(". ")),
    }
}

// ---------------------------------------------------------------------------------------------
// The claims.

/// C1 (hump): win rate against sqrt(KL) rises then falls across betas, for every objective.
pub fn c1_hump(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    hump_claim("C1", rows, Axis::SqrtKl, th)
}

/// C8 (likelihoods): win rate against sqrt(-E[r(x, y_w)]) shows the same hump. The verdict
/// uses SPEC's axis (the implicit reward, beta included); the same rule on the log-ratio without
/// beta (the paper's forward-KL reading of the axis, section 3.5) is reported beside it, under
/// `numbers.without_beta`, and does not change the verdict.
pub fn c8_likelihood_hump(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let mut v = hump_claim("C8", rows, Axis::SqrtNegChosen, th);
    let alt = hump_claim("C8", rows, Axis::SqrtNegChosenLogRatio, th);
    if let Value::Object(m) = &mut v.numbers {
        let mut a = match alt.numbers {
            Value::Object(a) => a,
            other => serde_json::Map::from_iter([("reason".to_string(), other)]),
        };
        a.remove("thresholds");
        a.insert("axis".into(), json!(Axis::SqrtNegChosenLogRatio.name()));
        a.insert("verdict".into(), json!(alt.verdict.as_str()));
        m.insert("without_beta".into(), Value::Object(a));
    }
    let alt_summary = alt.summary.strip_prefix("C8 ").unwrap_or(&alt.summary);
    v.summary = format!(
        "{}. Without beta on the axis ({}, reported, not judged): {alt_summary}",
        v.summary,
        Axis::SqrtNegChosenLogRatio.name()
    );
    v
}

/// C2 (early peak): at wide KL budgets the best checkpoint is the earliest one, and later
/// checkpoints have higher KL and lower win rate.
pub fn c2_early_peak(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let rule = format!(
        "For each of dpo, ipo, slic and each size, the wide-budget betas are the smallest \
         ceil({w:.3} x B) of the cell's B betas. For each of them (>= {c} checkpoints, seeds \
         averaged): the earliest checkpoint has the highest win rate, the last checkpoint has a \
         higher KL than the earliest, and the earliest's win rate exceeds the last's by at least \
         max({m}, {z} x combined standard error). A cell holds if at least half of its wide betas \
         hold; the claim holds if at least half of all (objective, size) cells hold \
         (three-valued).",
        w = th.wide_fraction,
        c = th.min_checkpoints,
        m = th.min_margin,
        z = th.hump_z
    );
    let sizes = sizes_of(rows);
    if sizes.is_empty() {
        return not_evaluated("C2", rule, "no result rows");
    }
    let mut cells = Vec::new();
    for obj in STANDARD_OBJECTIVES {
        for (size, _) in &sizes {
            cells.push(c2_cell(rows, obj, size, th));
        }
    }
    let v = at_least(&verdicts(&cells), half(cells.len()));
    assemble("C2", rule, v, vec![("cells".into(), cells)], json!({}), th)
}

fn c2_cell(rows: &[ResultRow], obj: &str, size: &str, th: &Thresholds) -> Part {
    let label = format!("{obj}/{size}");
    let cell = cell_rows(rows, obj, size);
    if cell.is_empty() {
        return Part::missing(label, format!("no rows for {obj}/{size}"));
    }
    let groups = by_beta_ckpt(&cell);
    let mut betas: BTreeMap<i64, Vec<&Vec<&ResultRow>>> = BTreeMap::new();
    for ((b, _), g) in &groups {
        betas.entry(*b).or_default().push(g);
    }
    let n_wide = ((betas.len() as f64 * th.wide_fraction).ceil() as usize).max(1);
    let mut parts = Vec::new();
    for (_, gs) in betas.iter().take(n_wide) {
        let beta = gs[0][0].beta;
        let blabel = format!("beta={beta}");
        let pts: Result<Vec<Pt>, String> = gs.iter().map(|g| average(g, false)).collect();
        let pts = match pts {
            Err(e) => {
                parts.push(Part::missing(blabel, e));
                continue;
            }
            Ok(p) => p,
        };
        if pts.len() < th.min_checkpoints {
            parts.push(Part::missing(
                blabel,
                format!(
                    "{} checkpoints, the rule needs {}",
                    pts.len(),
                    th.min_checkpoints
                ),
            ));
            continue;
        }
        // pts are sorted by checkpoint (BTreeMap key order).
        let (first, last) = (pts[0], pts[pts.len() - 1]);
        let best = pts
            .iter()
            .enumerate()
            .fold(0, |bi, (i, p)| if p.win > pts[bi].win { i } else { bi });
        let m = margin(th, &first, &last);
        let drop = first.win - last.win;
        let ok = best == 0 && last.kl > first.kl && drop >= m;
        parts.push(Part {
            label: blabel,
            verdict: VerdictKind::from_bool(ok),
            detail: format!(
                "best checkpoint {} (win {}); checkpoint {}: win {} KL {}, checkpoint {}: win {} KL {}; drop {} vs margin {}",
                pts[best].checkpoint,
                f3(pts[best].win),
                first.checkpoint,
                f3(first.win),
                f3(first.kl),
                last.checkpoint,
                f3(last.win),
                f3(last.kl),
                f3(drop),
                f3(m)
            ),
            numbers: json!({
                "beta": beta,
                "checkpoints": pts.iter().map(|p| json!({"checkpoint": p.checkpoint, "kl": p.kl, "win_rate": p.win, "se": p.se})).collect::<Vec<_>>(),
                "best_checkpoint": pts[best].checkpoint, "drop": drop, "margin": m,
            }),
        });
    }
    let v = at_least(&verdicts(&parts), half(parts.len()));
    Part {
        label,
        verdict: v,
        detail: format!(
            "wide betas: {}; {}",
            count_str(&parts),
            parts
                .iter()
                .map(|p| format!("{}: {}", p.label, p.detail))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        numbers: json!({"betas": parts.iter().map(Part::json).collect::<Vec<_>>()}),
    }
}

/// Common beta keys of several point sets.
fn common_betas(sets: &[&Vec<Pt>]) -> Vec<i64> {
    let mut it = sets
        .iter()
        .map(|s| s.iter().map(|p| fkey(p.beta)).collect::<BTreeSet<i64>>());
    let Some(first) = it.next() else {
        return Vec::new();
    };
    it.fold(first, |acc, s| acc.intersection(&s).copied().collect())
        .into_iter()
        .collect()
}

fn at_beta(pts: &[Pt], key: i64) -> Pt {
    *pts.iter()
        .find(|p| fkey(p.beta) == key)
        .expect("key from common_betas")
}

/// C3 (IPO): at the same betas IPO reaches lower KL and over-optimizes less than DPO and SLiC.
pub fn c3_ipo(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let rule = format!(
        "Per size, on the betas that dpo, ipo and slic share at end of epoch (>= {b}, seeds \
         averaged): (a) IPO's KL is below both DPO's and SLiC's at >= {f:.3} of the shared betas; \
         (b) IPO's over-optimization OO, the highest win rate over the shared betas minus the win \
         rate at the smallest shared beta, is clearly smaller than DPO's and than SLiC's: by at \
         least max({z} x the standard error of the difference, {m}), an OO's standard error being \
         that of the difference of its two win rates (so a size where no objective \
         over-optimizes, or where the OOs differ within the judge's noise, does not count for \
         the claim). A size holds if (a) and (b) hold; the claim holds if at least half of the \
         sizes hold (three-valued).",
        b = th.min_betas,
        f = th.c3_kl_fraction,
        z = th.hump_z,
        m = th.min_margin
    );
    let sizes = sizes_of(rows);
    if sizes.is_empty() {
        return not_evaluated("C3", rule, "no result rows");
    }
    let mut cells = Vec::new();
    for (size, _) in &sizes {
        let label = size.clone();
        let pts: Result<Vec<Vec<Pt>>, String> = STANDARD_OBJECTIVES
            .iter()
            .map(|o| final_points(rows, o, size, false))
            .collect();
        let pts = match pts {
            Err(e) => {
                cells.push(Part::missing(label, e));
                continue;
            }
            Ok(p) => p,
        };
        let (dpo, ipo, slic) = (&pts[0], &pts[1], &pts[2]);
        let common = common_betas(&[dpo, ipo, slic]);
        if common.len() < th.min_betas {
            cells.push(Part::missing(
                label,
                format!(
                    "{} shared betas, the rule needs {}",
                    common.len(),
                    th.min_betas
                ),
            ));
            continue;
        }
        let kl_lower = common
            .iter()
            .filter(|&&k| at_beta(ipo, k).kl < at_beta(dpo, k).kl.min(at_beta(slic, k).kl))
            .count();
        let need = (th.c3_kl_fraction * common.len() as f64).ceil() as usize;
        let ((oo_d, se_d), (oo_i, se_i), (oo_s, se_s)) = (
            overoptimization(dpo, &common),
            overoptimization(ipo, &common),
            overoptimization(slic, &common),
        );
        let (m_d, m_s) = (se_margin(th, se_i, se_d), se_margin(th, se_i, se_s));
        let a = kl_lower >= need;
        let b = oo_d - oo_i >= m_d && oo_s - oo_i >= m_s;
        let kls: Vec<Value> = common
            .iter()
            .map(|&k| {
                json!({"beta": at_beta(dpo, k).beta, "kl_dpo": at_beta(dpo, k).kl,
                       "kl_ipo": at_beta(ipo, k).kl, "kl_slic": at_beta(slic, k).kl})
            })
            .collect();
        cells.push(Part {
            label,
            verdict: all_of(&[VerdictKind::from_bool(a), VerdictKind::from_bool(b)]),
            detail: format!(
                "IPO KL lowest at {kl_lower}/{} shared betas (need {need}); over-optimization dpo {} ipo {} slic {} (IPO's must be lower by at least {} and {})",
                common.len(),
                f3(oo_d),
                f3(oo_i),
                f3(oo_s),
                f3(m_d),
                f3(m_s)
            ),
            numbers: json!({"kl": kls, "ipo_kl_lowest": kl_lower, "need": need,
                            "overopt_dpo": oo_d, "overopt_ipo": oo_i, "overopt_slic": oo_s,
                            "overopt_se_dpo": se_d, "overopt_se_ipo": se_i, "overopt_se_slic": se_s,
                            "margin_dpo": m_d, "margin_slic": m_s,
                            "kl_part": a, "overopt_part": b}),
        });
    }
    let v = at_least(&verdicts(&cells), half(cells.len()));
    assemble("C3", rule, v, vec![("sizes".into(), cells)], json!({}), th)
}

/// The empirical peak of an end-of-epoch curve (SFT at d = 0 included): (d, win).
fn empirical_peak(sft: &Pt, pts: &[Pt]) -> (f64, f64, f64) {
    // The SFT point has kl = 0 and beta NaN.
    let p = highest_win(std::iter::once(*sft).chain(pts.iter().copied())).unwrap_or(*sft);
    (p.d(), p.win, p.beta)
}

/// C4 (scale): the smallest model reaches higher KL at the same beta and over-optimizes
/// soonest; larger models trade off better.
pub fn c4_scale(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let rule = format!(
        "Sizes ordered by n_params. Per objective (dpo, ipo, slic), the smallest size S is compared \
         with each larger size L on their shared end-of-epoch betas (>= {b}, seeds averaged): \
         (a) KL(S) > KL(L) at more than half of the shared betas; (b) the empirical peak of S's \
         curve (SFT at d = 0 plus the shared betas; the point with the highest win rate) is at a \
         smaller sqrt(KL) than L's; (c) L's highest win rate over the shared betas exceeds S's by at \
         least max({z} x the standard error of the difference, {m}). \
         An objective holds if (a), (b), (c) hold against every larger size; the claim holds if \
         at least half of the objectives hold (three-valued). Needs >= 2 sizes.",
        b = th.min_betas,
        z = th.hump_z,
        m = th.min_margin
    );
    let sizes = sizes_of(rows);
    if sizes.len() < 2 {
        return not_evaluated(
            "C4",
            rule,
            &format!(
                "{} model size(s) in the rows, the rule needs 2",
                sizes.len()
            ),
        );
    }
    let small = &sizes[0].0;
    let mut objs = Vec::new();
    let mut all_pairs = Vec::new();
    for obj in STANDARD_OBJECTIVES {
        let mut pairs = Vec::new();
        for (large, _) in &sizes[1..] {
            let label = format!("{obj}: {small} vs {large}");
            let got = (|| -> Result<_, String> {
                Ok((
                    sft_point(rows, small)?,
                    final_points(rows, obj, small, false)?,
                    sft_point(rows, large)?,
                    final_points(rows, obj, large, false)?,
                ))
            })();
            let (ss, ps, sl, pl) = match got {
                Err(e) => {
                    pairs.push(Part::missing(label, e));
                    continue;
                }
                Ok(x) => x,
            };
            let common = common_betas(&[&ps, &pl]);
            if common.len() < th.min_betas {
                pairs.push(Part::missing(
                    label,
                    format!(
                        "{} shared betas, the rule needs {}",
                        common.len(),
                        th.min_betas
                    ),
                ));
                continue;
            }
            let ps: Vec<Pt> = common.iter().map(|&k| at_beta(&ps, k)).collect();
            let pl: Vec<Pt> = common.iter().map(|&k| at_beta(&pl, k)).collect();
            let higher = ps.iter().zip(&pl).filter(|(a, b)| a.kl > b.kl).count();
            let a = higher >= majority(common.len());
            let (ds, ws, bs) = empirical_peak(&ss, &ps);
            let (dl, wl, bl) = empirical_peak(&sl, &pl);
            let b = ds < dl;
            let best = |p: &Vec<Pt>| highest_win(p.iter().copied()).expect("shared betas");
            let (best_s, best_l) = (best(&ps), best(&pl));
            let (bw_s, bw_l) = (best_s.win, best_l.win);
            let m = margin(th, &best_s, &best_l);
            let c = bw_l - bw_s >= m;
            pairs.push(Part {
                label,
                verdict: all_of(&[a, b, c].map(VerdictKind::from_bool)),
                detail: format!(
                    "{small} KL higher at {higher}/{} betas; peaks at sqrt(KL) {} (beta {}, win {}) vs {} (beta {}, win {}); best DAA win {} vs {} (margin {})",
                    common.len(),
                    f3(ds),
                    beta_str(bs),
                    f3(ws),
                    f3(dl),
                    beta_str(bl),
                    f3(wl),
                    f3(bw_s),
                    f3(bw_l),
                    f3(m)
                ),
                numbers: json!({
                    "kl_small": ps.iter().map(|p| p.kl).collect::<Vec<_>>(),
                    "kl_large": pl.iter().map(|p| p.kl).collect::<Vec<_>>(),
                    "betas": ps.iter().map(|p| p.beta).collect::<Vec<_>>(),
                    "small_kl_higher": higher, "peak_d_small": ds, "peak_d_large": dl,
                    "best_win_small": bw_s, "best_win_large": bw_l, "best_win_margin": m,
                    "kl_part": a, "peak_part": b, "tradeoff_part": c,
                }),
            });
        }
        objs.push(all_of(&verdicts(&pairs)));
        all_pairs.extend(pairs);
    }
    let v = at_least(&objs, half(objs.len()));
    let per_obj: BTreeMap<&str, &str> = STANDARD_OBJECTIVES
        .iter()
        .zip(&objs)
        .map(|(o, v)| (*o, v.as_str()))
        .collect();
    assemble(
        "C4",
        rule,
        v,
        vec![("pairs".into(), all_pairs)],
        json!({"objectives": per_obj, "size_order": sizes}),
        th,
    )
}

/// C5 (fit): d(alpha - b ln d) fits the win-rate gain with about half the RMSE of a quadratic
/// in KL, and about as well as a quadratic in d.
pub fn c5_fit(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let (lo, hi) = th.c5_d_ratio_band;
    let rule = format!(
        "Per (objective in dpo, ipo, slic; size): fit the win-rate gain over the SFT policy of the \
         same size and seed against d = sqrt(KL) on every checkpoint and seed (>= {n} points; every \
         DAA row of the cell must have finite kl and win_rate and a matching SFT row) with three \
         two-coefficient forms through the origin: R(d) = d(alpha - b ln d), a KL + c KL^2, \
         a d + c d^2 (least squares, in-sample RMSE). (a) RMSE(R) <= {k} x RMSE(quad KL); \
         (b) {lo:.3} <= RMSE(quad d) / RMSE(R) <= {hi:.3}. The claim holds if (a) holds in at \
         least half of the cells and (b) holds in at least half of the cells (three-valued).",
        n = th.min_fit_points,
        k = th.c5_kl_ratio_max,
    );
    let sizes = sizes_of(rows);
    if sizes.is_empty() {
        return not_evaluated("C5", rule, "no result rows");
    }
    let gp = gain_points(rows);
    let opts = FitOptions {
        n_boot: 0,
        seed: th.seed,
        level: 0.95,
    };
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    let mut ratios_kl = Vec::new();
    let mut ratios_d = Vec::new();
    for obj in STANDARD_OBJECTIVES {
        for (size, _) in &sizes {
            let label = format!("{obj}/{size}");
            if let Some(d) = gp
                .dropped
                .iter()
                .find(|d| d.objective == obj && &d.size == size)
            {
                pa.push(Part::missing(label.clone(), d.reason.clone()));
                pb.push(Part::missing(label, d.reason.clone()));
                continue;
            }
            let pts: Vec<&GainPoint> = gp
                .points
                .iter()
                .filter(|p| p.objective == obj && &p.size == size)
                .collect();
            if pts.len() < th.min_fit_points {
                let why = format!("{} points, the rule needs {}", pts.len(), th.min_fit_points);
                pa.push(Part::missing(label.clone(), why.clone()));
                pb.push(Part::missing(label, why));
                continue;
            }
            let d: Vec<f64> = pts.iter().map(|p| p.d).collect();
            let y: Vec<f64> = pts.iter().map(|p| p.gain).collect();
            let fits: Result<Vec<_>, _> = Form::MAIN
                .iter()
                .map(|&f| fit_form(f, &d, &y, &opts))
                .collect();
            let fits = match fits {
                Err(e) => {
                    pa.push(Part::missing(label.clone(), e.to_string()));
                    pb.push(Part::missing(label, e.to_string()));
                    continue;
                }
                Ok(f) => f,
            };
            let (r, qk, qd) = (&fits[0], &fits[1], &fits[2]);
            let a = r.rmse <= th.c5_kl_ratio_max * qk.rmse;
            let b = qd.rmse >= lo * r.rmse && qd.rmse <= hi * r.rmse;
            let rk = r.rmse / qk.rmse;
            let rd = qd.rmse / r.rmse;
            ratios_kl.push(rk);
            ratios_d.push(rd);
            let nums = json!({
                "n": r.n,
                "rmse_log_d": r.rmse, "rmse_quad_kl": qk.rmse, "rmse_quad_d": qd.rmse,
                "loo_rmse_log_d": r.loo_rmse, "loo_rmse_quad_kl": qk.loo_rmse, "loo_rmse_quad_d": qd.loo_rmse,
                "alpha": r.coef[0], "b": r.coef[1], "peak_d": r.peak_d(),
                "ratio_log_d_to_quad_kl": rk, "ratio_quad_d_to_log_d": rd,
            });
            pa.push(Part {
                label: label.clone(),
                verdict: VerdictKind::from_bool(a),
                detail: format!(
                    "RMSE R(d) {} vs quad KL {} (ratio {}), n={}",
                    f3(r.rmse),
                    f3(qk.rmse),
                    f3(rk),
                    r.n
                ),
                numbers: nums.clone(),
            });
            pb.push(Part {
                label,
                verdict: VerdictKind::from_bool(b),
                detail: format!(
                    "RMSE quad d {} vs R(d) {} (ratio {})",
                    f3(qd.rmse),
                    f3(r.rmse),
                    f3(rd)
                ),
                numbers: nums,
            });
        }
    }
    let va = at_least(&verdicts(&pa), half(pa.len()));
    let vb = at_least(&verdicts(&pb), half(pb.len()));
    let v = all_of(&[va, vb]);
    assemble(
        "C5",
        rule,
        v,
        vec![("a_vs_quad_kl".into(), pa), ("b_vs_quad_d".into(), pb)],
        json!({"a": va.as_str(), "b": vb.as_str(),
               "median_ratio_log_d_to_quad_kl": median(&ratios_kl),
               "median_ratio_quad_d_to_log_d": median(&ratios_d)}),
        th,
    )
}

/// C6 (length): R^2 of the implicit log-ratio on length is higher for smaller models and for
/// smaller KL budgets (larger beta). Sizes are ordered by the n_params of the result rows.
pub fn c6_length(rows: &[ResultRow], samples: &[SampleRow], th: &Thresholds) -> Verdict {
    let rule = format!(
        "From held-out policy samples of dpo, ipo, slic: R^2 of the OLS regression (with \
         intercept) of log pi/pi_ref on length per (objective, size, beta, checkpoint, seed), \
         averaged over seeds (a NaN R^2 in any seed leaves the cell unevaluated). Sizes ordered by \
         the n_params of the result rows. (a) Size: for the (objective, beta, checkpoint) keys \
         that the smallest and the largest size share (>= {k}), R^2(smallest) > R^2(largest) in \
         more than half of them. (b) Budget: per (objective, size, checkpoint) with >= {b} betas, \
         the Spearman correlation of beta and R^2 is > 0 in more than half of those groups. The \
         claim holds if (a) and (b) hold (three-valued).",
        k = th.min_length_keys,
        b = th.min_betas
    );
    let std: Vec<SampleRow> = samples
        .iter()
        .filter(|s| STANDARD_OBJECTIVES.contains(&s.objective.as_str()))
        .cloned()
        .collect();
    if std.is_empty() {
        return not_evaluated("C6", rule, "no sample rows for dpo, ipo or slic");
    }
    let n_params: BTreeMap<String, u64> = sizes_of(rows).into_iter().collect();
    let mut sample_sizes: Vec<String> = std
        .iter()
        .map(|s| s.size.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(s) = sample_sizes.iter().find(|s| !n_params.contains_key(*s)) {
        return not_evaluated(
            "C6",
            rule,
            &format!("size {s} of the sample rows has no result row to give its n_params"),
        );
    }
    if sample_sizes.len() < 2 {
        return not_evaluated("C6", rule, "sample rows cover fewer than 2 model sizes");
    }
    sample_sizes.sort_by_key(|s| (n_params[s], s.clone()));
    // Mean R^2 over seeds per (objective, size, beta, checkpoint).
    type Key = (String, String, i64, i64);
    let mut acc: BTreeMap<Key, (Vec<f64>, f64, f64)> = BTreeMap::new();
    for f in length_fits(&std) {
        let e = acc
            .entry((
                f.objective.clone(),
                f.size.clone(),
                fkey(f.beta),
                fkey(f.checkpoint),
            ))
            .or_insert((Vec::new(), f.beta, f.checkpoint));
        e.0.push(f.r2);
    }
    let r2: BTreeMap<Key, (f64, f64, f64)> = acc
        .into_iter()
        .map(|(k, (v, b, c))| {
            let m = if v.iter().all(|x| x.is_finite()) {
                v.iter().sum::<f64>() / v.len() as f64
            } else {
                f64::NAN
            };
            (k, (m, b, c))
        })
        .collect();
    let (small, large) = (&sample_sizes[0], &sample_sizes[sample_sizes.len() - 1]);
    // (a)
    let mut pa = Vec::new();
    for ((o, s, b, c), (v_small, beta, ck)) in &r2 {
        if s != small {
            continue;
        }
        let Some((v_large, _, _)) = r2.get(&(o.clone(), large.clone(), *b, *c)) else {
            continue;
        };
        let label = format!("{o} beta={beta} checkpoint={ck}");
        if !v_small.is_finite() || !v_large.is_finite() {
            pa.push(Part::missing(
                label,
                "R^2 undefined (NaN) for a seed of this key",
            ));
            continue;
        }
        pa.push(Part {
            label,
            verdict: VerdictKind::from_bool(v_small > v_large),
            detail: format!("R^2 {small} {} vs {large} {}", f3(*v_small), f3(*v_large)),
            numbers: json!({"r2_small": v_small, "r2_large": v_large}),
        });
    }
    let va = if pa.len() < th.min_length_keys {
        let why = format!(
            "{} (objective, beta, checkpoint) keys shared by {small} and {large}, the rule needs {}",
            pa.len(),
            th.min_length_keys
        );
        pa = vec![Part::missing("shared keys", why)];
        NotEvaluated
    } else {
        at_least(&verdicts(&pa), majority(pa.len()))
    };
    // (b)
    type GKey = (String, String, i64);
    let mut groups: BTreeMap<GKey, (f64, Vec<(f64, f64)>)> = BTreeMap::new();
    for ((o, s, _, c), (v, beta, ck)) in &r2 {
        let e = groups
            .entry((o.clone(), s.clone(), *c))
            .or_insert((*ck, Vec::new()));
        e.1.push((*beta, *v));
    }
    let mut pb = Vec::new();
    for ((o, s, _), (ck, v)) in &groups {
        let label = format!("{o}/{s} checkpoint={ck}");
        if v.len() < th.min_betas {
            pb.push(Part::missing(
                label,
                format!("{} betas, the rule needs {}", v.len(), th.min_betas),
            ));
            continue;
        }
        if v.iter().any(|(_, r)| !r.is_finite()) {
            pb.push(Part::missing(label, "R^2 undefined (NaN) at some beta"));
            continue;
        }
        let bs: Vec<f64> = v.iter().map(|x| x.0).collect();
        let rs: Vec<f64> = v.iter().map(|x| x.1).collect();
        let rho = spearman(&bs, &rs);
        pb.push(Part {
            label,
            verdict: VerdictKind::from_bool(rho.is_some_and(|r| r > 0.0)),
            detail: format!(
                "Spearman(beta, R^2) = {}",
                rho.map(f3).unwrap_or_else(|| "undefined (constant)".into())
            ),
            numbers: json!({"betas": bs, "r2": rs, "spearman": rho}),
        });
    }
    let vb = at_least(&verdicts(&pb), majority(pb.len()));
    let mut per_size = BTreeMap::new();
    for s in &sample_sizes {
        let v: Vec<f64> = r2
            .iter()
            .filter(|((_, ss, _, _), _)| ss == s)
            .map(|(_, x)| x.0)
            .collect();
        per_size.insert(s.clone(), median(&v));
    }
    let v = all_of(&[va, vb]);
    assemble(
        "C6",
        rule,
        v,
        vec![("a_size".into(), pa), ("b_budget".into(), pb)],
        json!({"a": va.as_str(), "b": vb.as_str(), "size_order": sample_sizes,
               "median_r2_per_size": per_size}),
        th,
    )
}

/// C7 (no signal): within one size, implicit-reward accuracy and held-out loss do not predict
/// win rate.
pub fn c7_no_signal(rows: &[ResultRow], th: &Thresholds) -> Verdict {
    let rule = format!(
        "Per (objective in dpo, ipo, slic; size), over every DAA row (all betas, checkpoints, \
         seeds; >= {n} rows, all with finite values): a metric predicts win rate if its Spearman \
         correlation with win rate has |rho| >= {r} and a 95% bootstrap interval ({b} resamples, \
         seed {s}) excluding 0. A cell holds if neither implicit-reward accuracy nor held-out loss \
         predicts; the claim holds if at least half of the cells hold (three-valued). \
         Correlations pooled over sizes are reported, not judged.",
        n = th.min_corr_points,
        r = th.c7_rho,
        b = th.n_boot,
        s = th.seed
    );
    let sizes = sizes_of(rows);
    if sizes.is_empty() {
        return not_evaluated("C7", rule, "no result rows");
    }
    let metrics = [Metric::ImplicitAccuracy, Metric::HeldoutLoss];
    let mut cells = Vec::new();
    let mut pooled = serde_json::Map::new();
    for obj in STANDARD_OBJECTIVES {
        for (size, _) in &sizes {
            let label = format!("{obj}/{size}");
            let cell = cell_rows(rows, obj, size);
            if cell.len() < th.min_corr_points {
                cells.push(Part::missing(
                    label,
                    format!("{} rows, the rule needs {}", cell.len(), th.min_corr_points),
                ));
                continue;
            }
            let mut sub = Vec::new();
            let mut nums = serde_json::Map::new();
            let mut details = Vec::new();
            for m in metrics {
                let mc = metric_correlation(obj, size, m, &cell, th.n_boot, th.seed);
                match (&mc.corr, &mc.problem) {
                    (Some(c), _) if !(c.spearman_lo.is_finite() && c.spearman_hi.is_finite()) => {
                        // Without an interval the rule cannot tell signal from noise.
                        sub.push(NotEvaluated);
                        details.push(format!(
                            "{} rho {}: no bootstrap interval ({} of {} resamples defined)",
                            m.name(),
                            f3(c.spearman),
                            c.n_boot_ok,
                            th.n_boot
                        ));
                    }
                    (Some(c), _) => {
                        let signal = c.spearman.abs() >= th.c7_rho && c.spearman_excludes_zero();
                        sub.push(VerdictKind::from_bool(!signal));
                        details.push(format!(
                            "{} rho {} [{}, {}]{}",
                            m.name(),
                            f3(c.spearman),
                            f3(c.spearman_lo),
                            f3(c.spearman_hi),
                            if signal { " predicts" } else { "" }
                        ));
                        nums.insert(m.name().into(), json!(c));
                    }
                    (None, p) => {
                        sub.push(NotEvaluated);
                        details.push(format!("{}: {}", m.name(), p.clone().unwrap_or_default()));
                    }
                }
            }
            cells.push(Part {
                label,
                verdict: all_of(&sub),
                detail: details.join("; "),
                numbers: Value::Object(nums),
            });
        }
        let all: Vec<&ResultRow> = rows
            .iter()
            .filter(|r| !r.is_sft() && r.objective == obj)
            .collect();
        let mut o = serde_json::Map::new();
        for m in metrics {
            let mc = metric_correlation(obj, "*", m, &all, th.n_boot, th.seed);
            o.insert(m.name().into(), json!(mc.corr));
        }
        pooled.insert(obj.into(), Value::Object(o));
    }
    let v = at_least(&verdicts(&cells), half(cells.len()));
    assemble(
        "C7",
        rule,
        v,
        vec![("cells".into(), cells)],
        json!({"pooled_over_sizes": pooled}),
        th,
    )
}

/// C9 (OOD): in the toy MDP every DAA moves substantial mass onto trajectories never seen in
/// the data; for DPO the split differs run to run.
pub fn c9_ood(toy: &[ToyMdpSummary], th: &Thresholds) -> Verdict {
    let rule = format!(
        "Toy MDP runs (one row per objective, beta, seed). OOD gain of a run = ood_mass - \
         sft_ood_mass (0 when not given). (a) For each of dpo, ipo, slic (>= {r} runs, all \
         finite): at least {f} of its runs, all betas together, have an OOD gain >= {g}. (b) DPO: \
         for each beta with >= {s} seeds, the range over seeds of ood_mass or of preferred_mass is \
         >= {w}; (b) holds if at least half of those betas do. The claim holds if (a) holds for \
         every objective and (b) holds (three-valued).",
        r = th.c9_min_runs,
        f = th.c9_run_fraction,
        g = th.c9_ood_substantial,
        s = th.c9_min_seeds,
        w = th.c9_spread
    );
    if toy.is_empty() {
        return not_evaluated("C9", rule, "no toy-MDP rows");
    }
    let mut pa = Vec::new();
    for obj in STANDARD_OBJECTIVES {
        let runs: Vec<&ToyMdpSummary> = toy.iter().filter(|t| t.objective == obj).collect();
        if runs.len() < th.c9_min_runs {
            pa.push(Part::missing(
                obj,
                format!("{} runs, the rule needs {}", runs.len(), th.c9_min_runs),
            ));
            continue;
        }
        if let Some(t) = runs
            .iter()
            .find(|t| !t.ood_mass.is_finite() || t.sft_ood_mass.is_some_and(|x| !x.is_finite()))
        {
            pa.push(Part::missing(
                obj,
                format!(
                    "{obj} beta={} seed={}: ood_mass or sft_ood_mass not finite",
                    t.beta, t.seed
                ),
            ));
            continue;
        }
        let gains: Vec<f64> = runs
            .iter()
            .map(|t| t.ood_mass - t.sft_ood_mass.unwrap_or(0.0))
            .collect();
        let k = gains
            .iter()
            .filter(|g| **g >= th.c9_ood_substantial)
            .count();
        let frac = k as f64 / gains.len() as f64;
        let mut tops: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &runs {
            *tops.entry(t.top_ood_trajectory.as_str()).or_default() += 1;
        }
        let top = tops
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(t, _)| *t)
            .unwrap_or("");
        pa.push(Part {
            label: obj.into(),
            verdict: VerdictKind::from_bool(frac >= th.c9_run_fraction),
            detail: format!(
                "{k}/{} runs move >= {} mass OOD (median gain {}, max {}); most frequent top OOD trajectory {top}",
                gains.len(),
                th.c9_ood_substantial,
                f3(median(&gains)),
                f3(gains.iter().copied().fold(f64::MIN, f64::max))
            ),
            numbers: json!({"runs": gains.len(), "substantial": k, "fraction": frac,
                            "median_ood_gain": median(&gains), "top_ood_trajectories": tops}),
        });
    }
    let mut by_beta: BTreeMap<i64, Vec<&ToyMdpSummary>> = BTreeMap::new();
    for t in toy.iter().filter(|t| t.objective == "dpo") {
        by_beta.entry(fkey(t.beta)).or_default().push(t);
    }
    let mut pb = Vec::new();
    for runs in by_beta.values() {
        let label = format!("dpo beta={}", runs[0].beta);
        let seeds: BTreeSet<u64> = runs.iter().map(|t| t.seed).collect();
        if seeds.len() < th.c9_min_seeds {
            pb.push(Part::missing(
                label,
                format!("{} seeds, the rule needs {}", seeds.len(), th.c9_min_seeds),
            ));
            continue;
        }
        if runs
            .iter()
            .any(|t| !t.ood_mass.is_finite() || !t.preferred_mass.is_finite())
        {
            pb.push(Part::missing(
                label,
                "ood_mass or preferred_mass not finite",
            ));
            continue;
        }
        let range = |f: fn(&ToyMdpSummary) -> f64| {
            let v: Vec<f64> = runs.iter().map(|t| f(t)).collect();
            v.iter().copied().fold(f64::MIN, f64::max) - v.iter().copied().fold(f64::MAX, f64::min)
        };
        let (ro, rp) = (range(|t| t.ood_mass), range(|t| t.preferred_mass));
        pb.push(Part {
            label,
            verdict: VerdictKind::from_bool(ro >= th.c9_spread || rp >= th.c9_spread),
            detail: format!(
                "over {} seeds ood_mass ranges {}, preferred_mass ranges {}",
                seeds.len(),
                f3(ro),
                f3(rp)
            ),
            numbers: json!({"seeds": seeds.len(), "ood_range": ro, "preferred_range": rp}),
        });
    }
    if pb.is_empty() {
        pb.push(Part::missing("dpo", "no DPO toy runs"));
    }
    let vb = at_least(&verdicts(&pb), half(pb.len()));
    let mut parts = verdicts(&pa);
    parts.push(vb);
    let v = all_of(&parts);
    assemble(
        "C9",
        rule,
        v,
        vec![("a_ood_mass".into(), pa), ("b_dpo_spread".into(), pb)],
        json!({"b": vb.as_str()}),
        th,
    )
}

/// Every claim with the default thresholds, in order C1..C9.
pub fn evaluate_all(
    rows: &[ResultRow],
    samples: &[SampleRow],
    toy: &[ToyMdpSummary],
) -> Vec<Verdict> {
    evaluate_all_with(rows, samples, toy, &Thresholds::default())
}

/// Every claim with the given thresholds, in order C1..C9.
pub fn evaluate_all_with(
    rows: &[ResultRow],
    samples: &[SampleRow],
    toy: &[ToyMdpSummary],
    th: &Thresholds,
) -> Vec<Verdict> {
    vec![
        c1_hump(rows, th),
        c2_early_peak(rows, th),
        c3_ipo(rows, th),
        c4_scale(rows, th),
        c5_fit(rows, th),
        c6_length(rows, samples, th),
        c7_no_signal(rows, th),
        c8_likelihood_hump(rows, th),
        c9_ood(toy, th),
    ]
}

/// The claims.json object: keys "C1".."C9", each {verdict, rule, numbers, summary}. Errors
/// unless the verdicts are exactly C1..C9, each once.
pub fn claims_json(verdicts: &[Verdict]) -> Result<Value> {
    let want: BTreeSet<String> = (1..=9).map(|i| format!("C{i}")).collect();
    let mut out = serde_json::Map::new();
    for v in verdicts {
        if !want.contains(&v.id) {
            bail!(
                "claims.json: unexpected claim id {:?} (expected C1..C9)",
                v.id
            );
        }
        if out.contains_key(&v.id) {
            bail!("claims.json: claim {} appears twice", v.id);
        }
        out.insert(
            v.id.clone(),
            json!({"verdict": v.verdict, "rule": v.rule, "numbers": v.numbers, "summary": v.summary}),
        );
    }
    if let Some(m) = want.iter().find(|k| !out.contains_key(*k)) {
        bail!("claims.json: claim {m} is missing");
    }
    Ok(Value::Object(out))
}

/// Write claims.json (pretty-printed) atomically.
pub fn write_claims_json(path: &Path, verdicts: &[Verdict]) -> Result<()> {
    let v = claims_json(verdicts)?;
    let mut s = serde_json::to_string_pretty(&v)?;
    s.push('\n');
    crate::util::write_atomic(path, s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal, Uniform};

    /// A synthetic sweep: KL = 0.5 * checkpoint * beta^-0.8 * size factor * objective factor;
    /// win rate = SFT + gain(d) with gain(d) = H x (1 - ln x), x = d / d* (the R(d) form with
    /// its peak H at d*), plus seeded noise.
    #[derive(Clone)]
    struct World {
        /// (name, n_params, KL factor, d*, H)
        sizes: Vec<(&'static str, u64, f64, f64, f64)>,
        /// KL factor per objective (dpo, ipo, slic).
        obj_kl: [f64; 3],
        betas: Vec<f64>,
        checkpoints: Vec<f64>,
        seeds: Vec<u64>,
        sft_win: f64,
        noise: f64,
        /// Replace the gain by a function of (size index, d).
        gain: Option<fn(usize, f64) -> f64>,
        /// Implicit-accuracy as a function of the win rate (None: independent noise).
        acc_from_win: bool,
    }

    impl World {
        fn standard() -> Self {
            World {
                sizes: vec![
                    ("small", 30_000, 2.0, 0.6, 0.08),
                    ("medium", 110_000, 1.5, 1.2, 0.15),
                    ("large", 610_000, 1.0, 1.6, 0.2),
                ],
                obj_kl: [1.0, 0.6, 1.0],
                betas: vec![0.03, 0.1, 0.3, 1.0, 3.0],
                checkpoints: vec![0.25, 0.5, 0.75, 1.0],
                seeds: vec![0],
                sft_win: 0.3,
                noise: 0.003,
                gain: None,
                acc_from_win: false,
            }
        }

        fn rows(&self) -> Vec<ResultRow> {
            let mut rng = StdRng::seed_from_u64(42);
            let nd = Normal::new(0.0, 1.0).unwrap();
            let ud = Uniform::new(0.0, 1.0).unwrap();
            let mut out = Vec::new();
            let mk = |objective: &str,
                      beta: f64,
                      size: &str,
                      n: u64,
                      ck: f64,
                      seed: u64,
                      kl: f64,
                      win: f64| ResultRow {
                objective: objective.into(),
                beta,
                size: size.into(),
                n_params: n,
                checkpoint: ck,
                seed,
                kl,
                kl_se: 0.05,
                win_rate: win,
                win_rate_lo: win - 0.03,
                win_rate_hi: win + 0.03,
                mean_length: 5.0,
                heldout_loss: f64::NAN,
                implicit_accuracy: f64::NAN,
                chosen_reward: -kl,
                config_hash: "test".into(),
                length_corrected_win_rate: None,
            };
            for (si, &(size, n, sf, dstar, h)) in self.sizes.iter().enumerate() {
                for &seed in &self.seeds {
                    let mut r = mk("sft", 0.0, size, n, 0.0, seed, 0.0, self.sft_win);
                    r.chosen_reward = 0.0;
                    out.push(r);
                    for (oi, obj) in STANDARD_OBJECTIVES.iter().enumerate() {
                        for &beta in &self.betas {
                            for &ck in &self.checkpoints {
                                let kl = 0.5 * ck * beta.powf(-0.8) * sf * self.obj_kl[oi];
                                let d = kl.sqrt();
                                let g = match self.gain {
                                    Some(f) => f(si, d),
                                    None => {
                                        let x = d / dstar;
                                        h * x * (1.0 - x.ln())
                                    }
                                };
                                let win = (self.sft_win + g + self.noise * nd.sample(&mut rng))
                                    .clamp(0.01, 0.99);
                                let mut r = mk(obj, beta, size, n, ck, seed, kl, win);
                                let u: f64 = ud.sample(&mut rng);
                                r.implicit_accuracy = if self.acc_from_win {
                                    0.5 + 0.5 * win
                                } else {
                                    0.55 + 0.3 * u
                                };
                                let u2: f64 = ud.sample(&mut rng);
                                r.heldout_loss = if self.acc_from_win {
                                    1.0 - win
                                } else {
                                    0.5 + 0.2 * u2
                                };
                                out.push(r);
                            }
                        }
                    }
                }
            }
            out
        }
    }

    fn th() -> Thresholds {
        Thresholds {
            n_boot: 200,
            ..Default::default()
        }
    }

    fn monotone() -> World {
        World {
            gain: Some(|_, d| 0.05 * d),
            ..World::standard()
        }
    }

    fn assert_verdict(v: &Verdict, want: VerdictKind) {
        assert_eq!(
            v.verdict,
            want,
            "{} expected {:?}: {}\n{}",
            v.id,
            want,
            v.summary,
            serde_json::to_string_pretty(&v.numbers).unwrap()
        );
        assert!(v.summary.starts_with(&v.id), "{}", v.summary);
        assert!(!v.rule.is_empty());
    }

    #[test]
    fn three_valued_combination() {
        assert_eq!(at_least(&[Holds, NotEvaluated, Fails], 1), Holds);
        assert_eq!(at_least(&[Fails, NotEvaluated, Fails], 1), NotEvaluated);
        assert_eq!(at_least(&[Fails, Fails, Holds], 2), Fails);
        assert_eq!(all_of(&[Holds, NotEvaluated]), NotEvaluated);
        assert_eq!(all_of(&[Fails, NotEvaluated]), Fails);
        assert_eq!(all_of(&[]), NotEvaluated);
        assert_eq!((half(3), half(4), majority(4), majority(3)), (2, 2, 3, 2));
    }

    #[test]
    fn c1_hold_fail_missing() {
        let t = th();
        assert_verdict(&c1_hump(&World::standard().rows(), &t), Holds);
        assert_verdict(&c1_hump(&monotone().rows(), &t), Fails);
        let no_ipo: Vec<ResultRow> = World::standard()
            .rows()
            .into_iter()
            .filter(|r| r.objective != "ipo")
            .collect();
        let v = c1_hump(&no_ipo, &t);
        assert_verdict(&v, NotEvaluated);
        assert!(v.summary.contains("no rows for ipo/small"), "{}", v.summary);
        // A NaN win-rate interval in every size of one objective: not evaluated, never holds.
        let mut rows = World::standard().rows();
        for r in rows
            .iter_mut()
            .filter(|r| r.objective == "slic" && r.beta == 0.3)
        {
            r.win_rate_hi = f64::NAN;
        }
        let v = c1_hump(&rows, &t);
        assert_verdict(&v, NotEvaluated);
        assert!(
            v.summary.contains("win_rate_hi not finite"),
            "{}",
            v.summary
        );
        assert_verdict(&c1_hump(&[], &t), NotEvaluated);
    }

    #[test]
    fn c2_hold_fail_missing() {
        let t = th();
        assert_verdict(&c2_early_peak(&World::standard().rows(), &t), Holds);
        assert_verdict(&c2_early_peak(&monotone().rows(), &t), Fails);
        let only_final = World {
            checkpoints: vec![1.0],
            ..World::standard()
        };
        let v = c2_early_peak(&only_final.rows(), &t);
        assert_verdict(&v, NotEvaluated);
        assert!(
            v.summary.contains("1 checkpoints, the rule needs 3"),
            "{}",
            v.summary
        );
    }

    #[test]
    fn c3_hold_fail_missing() {
        let t = th();
        // IPO's KL a third of the others' at every beta: it over-optimizes clearly less.
        let ipo_low = World {
            obj_kl: [1.0, 0.3, 1.0],
            ..World::standard()
        };
        assert_verdict(&c3_ipo(&ipo_low.rows(), &t), Holds);
        let ipo_high = World {
            obj_kl: [1.0, 2.0, 1.0],
            ..World::standard()
        };
        assert_verdict(&c3_ipo(&ipo_high.rows(), &t), Fails);
        // Nobody over-optimizes: IPO cannot over-optimize less.
        let v = c3_ipo(&monotone().rows(), &t);
        assert_verdict(&v, Fails);
        assert!(
            v.summary.contains("over-optimization dpo 0.000 ipo 0.000"),
            "{}",
            v.summary
        );
        let no_slic: Vec<ResultRow> = World::standard()
            .rows()
            .into_iter()
            .filter(|r| r.objective != "slic")
            .collect();
        assert_verdict(&c3_ipo(&no_slic, &t), NotEvaluated);
    }

    #[test]
    fn c3_needs_a_difference_beyond_the_noise() {
        let t = th();
        // IPO's KL slightly lower than DPO's and SLiC's at every beta: it over-optimizes a
        // little less everywhere, by less than the judge's noise (win rates +-0.03).
        let close = World {
            obj_kl: [1.0, 0.9, 1.0],
            ..World::standard()
        };
        let v = c3_ipo(&close.rows(), &t);
        assert_verdict(&v, Fails);
        let mut lower = 0;
        for part in v.numbers["sizes"].as_array().unwrap() {
            assert_eq!(part["kl_part"], true, "{part}");
            assert_eq!(part["overopt_part"], false, "{part}");
            let oo = |o: &str| part[format!("overopt_{o}")].as_f64().unwrap();
            let m = part["margin_dpo"].as_f64().unwrap();
            // The margin: z x the standard error of a difference of two differences of win
            // rates, 2 se with se = 0.03 / 1.96.
            let want = t.hump_z * 2.0 * 0.03 / crate::analysis::stats::Z95;
            assert!((m - want).abs() < 1e-9, "{part}");
            assert!((oo("dpo") - oo("ipo")).abs() <= m, "{part}");
            // Sizes that a strict comparison would have counted for the claim.
            if oo("ipo") < oo("dpo").min(oo("slic")) {
                lower += 1;
            }
        }
        assert!(lower >= 2, "{}", v.summary);
        // The same curves measured with ten times the samples (+-0.003): medium's difference
        // (about 0.026) is now clear; large's (about 0.006) stays below the floor, min_margin.
        let mut rows = close.rows();
        for r in &mut rows {
            r.win_rate_lo = r.win_rate - 0.003;
            r.win_rate_hi = r.win_rate + 0.003;
        }
        let v = c3_ipo(&rows, &t);
        let sizes = v.numbers["sizes"].as_array().unwrap();
        let part = |s: &str| sizes.iter().find(|p| p["part"] == s).unwrap();
        assert_eq!(part("medium")["overopt_part"], true, "{}", v.summary);
        assert_eq!(part("large")["overopt_part"], false, "{}", v.summary);
        assert_eq!(part("large")["margin_dpo"], t.min_margin, "{}", v.summary);
    }

    #[test]
    fn c4_hold_fail_missing() {
        let t = th();
        let v = c4_scale(&World::standard().rows(), &t);
        assert_verdict(&v, Holds);
        for o in STANDARD_OBJECTIVES {
            assert_eq!(v.numbers["objectives"][o], "holds", "{}", v.summary);
        }
        let same = World {
            sizes: vec![
                ("small", 30_000, 1.0, 1.2, 0.15),
                ("medium", 110_000, 1.0, 1.2, 0.15),
                ("large", 610_000, 1.0, 1.2, 0.15),
            ],
            ..World::standard()
        };
        assert_verdict(&c4_scale(&same.rows(), &t), Fails);
        let one = World {
            sizes: vec![("medium", 110_000, 1.5, 1.2, 0.15)],
            ..World::standard()
        };
        let v = c4_scale(&one.rows(), &t);
        assert_verdict(&v, NotEvaluated);
        assert!(v.summary.contains("1 model size(s)"), "{}", v.summary);
        // Larger models trade off better only by less than the judge's noise: (c) fails.
        let close = World {
            sizes: vec![
                ("small", 30_000, 2.0, 0.6, 0.15),
                ("medium", 110_000, 1.5, 1.2, 0.17),
                ("large", 610_000, 1.0, 1.6, 0.18),
            ],
            ..World::standard()
        };
        let v = c4_scale(&close.rows(), &t);
        assert_verdict(&v, Fails);
        for pair in v.numbers["pairs"].as_array().unwrap() {
            assert_eq!(pair["tradeoff_part"], false, "{pair}");
            let gap =
                pair["best_win_large"].as_f64().unwrap() - pair["best_win_small"].as_f64().unwrap();
            assert!(
                gap > 0.0 && gap <= pair["best_win_margin"].as_f64().unwrap(),
                "{pair}"
            );
        }
    }

    #[test]
    fn c5_hold_fail_missing() {
        let t = th();
        // Win rates drawn from R(d) with judge-like noise (sd 0.03, about that of 256 prompts):
        // R(d) fits best, a quadratic in d about as well.
        let noisy = World {
            noise: 0.03,
            ..World::standard()
        };
        assert_verdict(&c5_fit(&noisy.rows(), &t), Holds);
        // Drawn from a quadratic in KL: R(d) is no better than it.
        let quad = World {
            gain: Some(|_, d| 0.12 * d * d - 0.012 * d.powi(4)),
            ..noisy.clone()
        };
        assert_verdict(&c5_fit(&quad.rows(), &t), Fails);
        let no_sft: Vec<ResultRow> = noisy.rows().into_iter().filter(|r| !r.is_sft()).collect();
        let v = c5_fit(&no_sft, &t);
        assert_verdict(&v, NotEvaluated);
        assert!(v.summary.contains("no SFT row"), "{}", v.summary);
        // Three DAA seeds from one SFT model (its row has seed 0 only, as the sweep writes it):
        // every DAA row keeps the SFT baseline of its size.
        let seeds = World {
            seeds: vec![0, 1, 2],
            ..noisy.clone()
        };
        let rows: Vec<ResultRow> = seeds
            .rows()
            .into_iter()
            .filter(|r| !r.is_sft() || r.seed == 0)
            .collect();
        let gp = crate::analysis::fits::gain_points(&rows);
        assert!(gp.dropped.is_empty(), "{:?}", gp.dropped.first());
        assert_eq!(gp.points.len(), rows.iter().filter(|r| !r.is_sft()).count());
        assert_verdict(&c5_fit(&rows, &t), Holds);
    }

    fn samples(r2_up_with_beta: bool, sizes: &[&str]) -> Vec<SampleRow> {
        let mut rng = StdRng::seed_from_u64(9);
        let nd = Normal::new(0.0, 1.0).unwrap();
        let mut out = Vec::new();
        for (si, size) in sizes.iter().enumerate() {
            for obj in STANDARD_OBJECTIVES {
                for beta in [0.03f64, 0.1, 0.3, 1.0, 3.0] {
                    for ck in [0.5, 1.0] {
                        // Noise grows with size; shrinks (or grows) with beta.
                        let bf: f64 = if r2_up_with_beta {
                            beta.powf(-0.5)
                        } else {
                            beta.powf(0.5)
                        };
                        let sd = 0.3 * (1.0 + si as f64) * bf;
                        for i in 0..60 {
                            let length = 1 + i % 10;
                            out.push(SampleRow {
                                objective: obj.into(),
                                beta,
                                size: size.to_string(),
                                checkpoint: ck,
                                seed: 0,
                                log_ratio: 0.4 * length as f64 + sd * nd.sample(&mut rng),
                                length,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn c6_hold_fail_missing() {
        let t = th();
        let rows = World::standard().rows();
        let sizes = ["small", "medium", "large"];
        assert_verdict(&c6_length(&rows, &samples(true, &sizes), &t), Holds);
        let v = c6_length(&rows, &samples(false, &sizes), &t);
        assert_verdict(&v, Fails);
        assert_verdict(
            &c6_length(&rows, &samples(true, &["medium"]), &t),
            NotEvaluated,
        );
        assert_verdict(&c6_length(&rows, &[], &t), NotEvaluated);
        // A size without result rows cannot be ordered.
        let v = c6_length(&rows, &samples(true, &["small", "huge"]), &t);
        assert_verdict(&v, NotEvaluated);
        assert!(v.summary.contains("huge"), "{}", v.summary);
    }

    #[test]
    fn c7_hold_fail_missing() {
        let t = th();
        assert_verdict(&c7_no_signal(&World::standard().rows(), &t), Holds);
        let tied = World {
            acc_from_win: true,
            ..World::standard()
        };
        assert_verdict(&c7_no_signal(&tied.rows(), &t), Fails);
        let mut rows = World::standard().rows();
        for r in rows.iter_mut() {
            r.heldout_loss = f64::NAN;
        }
        let v = c7_no_signal(&rows, &t);
        assert_verdict(&v, NotEvaluated);
        assert!(
            v.summary.contains("heldout_loss or win_rate is not finite"),
            "{}",
            v.summary
        );
        // Without bootstrap intervals the rule cannot pass a metric that tracks the win rate.
        let no_boot = Thresholds { n_boot: 0, ..th() };
        let v = c7_no_signal(&tied.rows(), &no_boot);
        assert_verdict(&v, NotEvaluated);
        assert!(v.summary.contains("no bootstrap interval"), "{}", v.summary);
    }

    #[test]
    fn c8_hold_fail_missing() {
        let t = th();
        assert_verdict(&c8_likelihood_hump(&World::standard().rows(), &t), Holds);
        assert_verdict(&c8_likelihood_hump(&monotone().rows(), &t), Fails);
        let mut rows = World::standard().rows();
        for r in rows.iter_mut().filter(|r| !r.is_sft()) {
            r.chosen_reward = f64::NAN;
        }
        let v = c8_likelihood_hump(&rows, &t);
        assert_verdict(&v, NotEvaluated);
        assert!(
            v.summary.contains("chosen_reward not finite"),
            "{}",
            v.summary
        );
        assert_eq!(v.numbers["without_beta"]["verdict"], "not evaluated");
        // Rewards as a DAA run reports them, beta x log-ratio with log-ratio = -KL: the axis
        // without beta is sqrt(KL) again, so the variant shows C1's hump.
        let mut rows = World::standard().rows();
        for r in rows.iter_mut() {
            r.chosen_reward = -r.beta * r.kl;
        }
        let v = c8_likelihood_hump(&rows, &t);
        assert_eq!(
            v.numbers["without_beta"]["verdict"], "holds",
            "{}",
            v.summary
        );
        assert_eq!(v.numbers["without_beta"]["axis"], "sqrt(-E[r(x,y_w)]/beta)");
        assert!(
            v.summary.contains("Without beta on the axis"),
            "{}",
            v.summary
        );
        assert!(v.numbers["without_beta"]["dpo"]["parts"].is_array());
    }

    fn toy(ood: fn(usize) -> f64, objectives: &[&str]) -> Vec<ToyMdpSummary> {
        let mut out = Vec::new();
        for obj in objectives {
            for beta in [0.01, 0.1, 0.5] {
                for seed in 0..4u64 {
                    out.push(ToyMdpSummary {
                        objective: obj.to_string(),
                        beta,
                        seed,
                        ood_mass: ood(seed as usize),
                        preferred_mass: [0.9, 0.1, 0.8, 0.5][seed as usize],
                        top_ood_trajectory: "a1,a1,a1".into(),
                        sft_ood_mass: Some(0.01),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn c9_hold_fail_missing() {
        let t = th();
        let all = ["dpo", "ipo", "slic"];
        assert_verdict(
            &c9_ood(&toy(|s| [0.05, 0.6, 0.15, 0.02][s], &all), &t),
            Holds,
        );
        let v = c9_ood(&toy(|_| 0.02, &all), &t);
        assert_verdict(&v, Fails);
        let v = c9_ood(&toy(|s| [0.05, 0.6, 0.15, 0.02][s], &["dpo"]), &t);
        assert_verdict(&v, NotEvaluated);
        assert!(
            v.summary.contains("0 runs, the rule needs 4"),
            "{}",
            v.summary
        );
        let mut nan = toy(|s| [0.05, 0.6, 0.15, 0.02][s], &all);
        nan[13].ood_mass = f64::NAN;
        assert_verdict(&c9_ood(&nan, &t), NotEvaluated);
        assert_verdict(&c9_ood(&[], &t), NotEvaluated);
    }

    #[test]
    fn claims_json_has_exactly_c1_to_c9() {
        let rows = World::standard().rows();
        let s = samples(true, &["small", "medium", "large"]);
        let t = toy(|s| [0.05, 0.6, 0.15, 0.02][s], &["dpo", "ipo", "slic"]);
        let vs = evaluate_all_with(&rows, &s, &t, &th());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out/claims.json");
        write_claims_json(&p, &vs).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        let keys: Vec<&String> = obj.keys().collect();
        let want: Vec<String> = (1..=9).map(|i| format!("C{i}")).collect();
        assert_eq!(keys, want.iter().collect::<Vec<_>>());
        for (k, e) in obj {
            let e = e.as_object().unwrap();
            let mut fields: Vec<&String> = e.keys().collect();
            fields.sort();
            assert_eq!(fields, ["numbers", "rule", "summary", "verdict"], "{k}");
            let verdict = e["verdict"].as_str().unwrap();
            assert!(
                ["holds", "fails", "not evaluated"].contains(&verdict),
                "{k}: {verdict}"
            );
        }
        // Verdict strings, and the empty-input case.
        assert_eq!(
            serde_json::to_string(&NotEvaluated).unwrap(),
            "\"not evaluated\""
        );
        assert_eq!(serde_json::to_string(&Holds).unwrap(), "\"holds\"");
        assert_eq!(serde_json::to_string(&Fails).unwrap(), "\"fails\"");
        let empty = evaluate_all(&[], &[], &[]);
        assert!(empty.iter().all(|v| v.verdict == NotEvaluated));
        assert_eq!(claims_json(&empty).unwrap().as_object().unwrap().len(), 9);
        // Ids other than exactly C1..C9 are refused.
        assert!(claims_json(&empty[..8]).is_err());
        let mut dup = empty.clone();
        dup[8].id = "C1".into();
        assert!(claims_json(&dup).is_err());
    }
}
