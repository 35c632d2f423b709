//! One builder per figure of the paper's section 3 (Figs. 1-5 and the fits of section 3.2).
//!
//! Conventions shared by the builders:
//! - x = d = sqrt(KL). The SFT policy sits at d = 0 whatever its KL estimate (as in the
//!   analysis); a DAA policy's slightly negative Monte-Carlo KL counts as d = 0.
//! - Colour = model size (ordered by parameter count, smallest first); panel = objective (the
//!   paper's dpo, ipo, slic).
//! - Where a figure shows one point per policy, seeds are averaged: KL and win rate are means
//!   over seeds, and the error bar is the row's own 95% interval for one seed, or +-1.96 x the
//!   combined standard error sqrt(sum se_i^2) / k for k seeds (se_i read off each interval).
//!   Figures 4 and 5 plot every row (seed, beta, checkpoint) as its own point, as the
//!   correlations of `analysis::metrics` use them.
//! - Rows whose plotted values are not finite are left out and counted in the title.

use super::{Figure, Grid, Panel, fmt_num, order_sizes_by_name, ramp_colour, size_colour, titled};
use crate::analysis::fits::{FitGroup, Form, POOLED, gain_points};
use crate::analysis::length::LengthFit;
use crate::analysis::metrics::signed_sqrt_neg;
use crate::analysis::stats::{Z95, se_from_ci95};
use crate::analysis::table::{ResultRow, STANDARD_OBJECTIVES, fkey};
use plotly::common::{DashType, ErrorData, ErrorType, HoverInfo, Line, Marker, Mode};
use plotly::{Plot, Scatter};
use std::collections::BTreeMap;

const X_SQRT_KL: &str = "sqrt(KL(pi || pi_ref))";
const Y_WIN: &str = "win rate vs reference";

/// Sizes ordered by parameter count (then name).
pub(crate) fn size_order(rows: &[ResultRow]) -> Vec<String> {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        let e = m.entry(r.size.as_str()).or_insert(r.n_params);
        *e = (*e).min(r.n_params);
    }
    let mut v: Vec<(&str, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
    v.into_iter().map(|(s, _)| s.to_string()).collect()
}

fn colour_of(order: &[String], size: &str) -> &'static str {
    size_colour(order.iter().position(|s| s == size).unwrap_or(order.len()))
}

/// One policy averaged over seeds.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    pub objective: String,
    pub size: String,
    pub beta: f64,
    pub checkpoint: f64,
    pub n_seeds: usize,
    /// sqrt(max(mean KL, 0)); 0 for the SFT policy.
    pub d: f64,
    pub win: f64,
    pub err_plus: f64,
    pub err_minus: f64,
    /// Mean over the seeds with a finite value (NaN if none).
    pub mean_length: f64,
    pub length_corrected: Option<f64>,
}

impl Cell {
    fn is_sft(&self) -> bool {
        self.objective == crate::analysis::table::SFT
    }

    fn hover(&self) -> String {
        let mut s = if self.is_sft() {
            format!("SFT policy, size {}", self.size)
        } else {
            format!(
                "{} size {}<br>beta={} checkpoint={}",
                self.objective,
                self.size,
                fmt_num(self.beta),
                fmt_num(self.checkpoint)
            )
        };
        s.push_str(&format!(
            "<br>seeds: {}<br>sqrt(KL)={}<br>win rate={} [-{}, +{}]",
            self.n_seeds,
            fmt_num(self.d),
            fmt_num(self.win),
            fmt_num(self.err_minus),
            fmt_num(self.err_plus)
        ));
        if self.mean_length.is_finite() {
            s.push_str(&format!("<br>mean length={}", fmt_num(self.mean_length)));
        }
        if let Some(l) = self.length_corrected {
            s.push_str(&format!("<br>length-corrected win rate={}", fmt_num(l)));
        }
        s
    }
}

/// Average rows over seeds per (objective, size, beta, checkpoint). A row needs a finite win
/// rate, and a DAA row a finite KL; the rows left out are counted.
pub(crate) fn cells(rows: &[ResultRow]) -> (Vec<Cell>, usize) {
    type Key = (String, String, i64, i64);
    let mut groups: BTreeMap<Key, Vec<&ResultRow>> = BTreeMap::new();
    let mut dropped = 0;
    for r in rows {
        if !r.win_rate.is_finite() || (!r.is_sft() && !r.kl.is_finite()) {
            dropped += 1;
            continue;
        }
        groups
            .entry((
                r.objective.clone(),
                r.size.clone(),
                fkey(r.beta),
                fkey(r.checkpoint),
            ))
            .or_default()
            .push(r);
    }
    let out = groups
        .into_values()
        .map(|g| {
            let k = g.len() as f64;
            let first = g[0];
            let win = g.iter().map(|r| r.win_rate).sum::<f64>() / k;
            let kl = g.iter().map(|r| r.kl).sum::<f64>() / k;
            let (err_plus, err_minus) = if g.len() == 1 {
                (first.win_rate_hi - win, win - first.win_rate_lo)
            } else {
                let ss: f64 = g
                    .iter()
                    .map(|r| se_from_ci95(r.win_rate_lo, r.win_rate_hi).powi(2))
                    .sum();
                let e = Z95 * ss.sqrt() / k;
                (e, e)
            };
            let lens: Vec<f64> = g
                .iter()
                .map(|r| r.mean_length)
                .filter(|v| v.is_finite())
                .collect();
            let lcs: Vec<f64> = g
                .iter()
                .filter_map(|r| r.length_corrected_win_rate)
                .filter(|v| v.is_finite())
                .collect();
            let avg = |v: &[f64]| {
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            Cell {
                objective: first.objective.clone(),
                size: first.size.clone(),
                beta: first.beta,
                checkpoint: first.checkpoint,
                n_seeds: g.len(),
                d: if first.is_sft() {
                    0.0
                } else {
                    kl.max(0.0).sqrt()
                },
                win,
                err_plus,
                err_minus,
                mean_length: avg(&lens),
                length_corrected: (!lcs.is_empty()).then(|| avg(&lcs)),
            }
        })
        .collect();
    (out, dropped)
}

/// A scatter trace in panel `k`.
pub(crate) fn trace(
    name: &str,
    x: Vec<f64>,
    y: Vec<f64>,
    hover: Vec<String>,
    k: usize,
) -> Box<Scatter<f64, f64>> {
    let (xa, ya) = Grid::axes(k);
    Scatter::new(x, y)
        .name(name)
        .x_axis(xa)
        .y_axis(ya)
        .hover_text_array(hover)
        .hover_info(HoverInfo::Text)
}

fn error_bars(cells: &[&Cell]) -> ErrorData {
    ErrorData::new(ErrorType::Data)
        .symmetric(false)
        .array(cells.iter().map(|c| c.err_plus).collect())
        .array_minus(cells.iter().map(|c| c.err_minus).collect())
        .thickness(1.0)
        .width(3)
}

/// Keeps the first trace of each legend group in the legend.
#[derive(Default)]
pub(crate) struct LegendOnce(std::collections::BTreeSet<String>);

impl LegendOnce {
    pub fn first(&mut self, group: &str) -> bool {
        self.0.insert(group.to_string())
    }
}

fn finish(name: &str, base_title: &str, notes: &[String], grid: &Grid, plot: Plot) -> Figure {
    let mut plot = plot;
    let title = titled(base_title, notes);
    plot.set_layout(grid.layout(&title));
    Figure {
        name: name.to_string(),
        title,
        plot,
    }
}

fn no_daa_note(n_daa: usize, dropped: usize) -> Vec<String> {
    let mut notes = vec![];
    if n_daa == 0 {
        notes.push("no data: no DAA rows with a finite KL and win rate".to_string());
    }
    if dropped > 0 {
        notes.push(format!(
            "{dropped} rows with a non-finite KL or win rate left out"
        ));
    }
    notes
}

fn win_vs_d(
    rows: &[ResultRow],
    name: &str,
    base_title: &str,
    end_only: bool,
    with_lines: bool,
) -> Figure {
    let order = size_order(rows);
    let (cells, dropped) = cells(rows);
    let keep = |c: &&Cell| {
        !c.is_sft() && (!end_only || c.checkpoint >= crate::analysis::table::END_OF_EPOCH)
    };
    let panels: Vec<Panel> = STANDARD_OBJECTIVES
        .iter()
        .map(|o| Panel::new(*o, X_SQRT_KL, Y_WIN))
        .collect();
    let (grid, _) = Grid::new(3, panels);
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    let mut n_daa = 0;
    let mut missing_sft = vec![];
    for (k, obj) in STANDARD_OBJECTIVES.iter().enumerate() {
        for size in &order {
            let mut pts: Vec<&Cell> = cells
                .iter()
                .filter(|c| c.objective == *obj && c.size == *size)
                .filter(keep)
                .collect();
            if pts.is_empty() {
                continue;
            }
            n_daa += pts.len();
            match cells.iter().find(|c| c.is_sft() && c.size == *size) {
                Some(s) => pts.push(s),
                None => {
                    if !missing_sft.contains(size) {
                        missing_sft.push(size.clone());
                    }
                }
            }
            pts.sort_by(|a, b| {
                a.d.total_cmp(&b.d)
                    .then(a.checkpoint.total_cmp(&b.checkpoint))
            });
            let colour = colour_of(&order, size);
            let mut marker = Marker::new().color(colour);
            if !end_only {
                marker = marker.size_array(
                    pts.iter()
                        .map(|c| (5.0 + 8.0 * c.checkpoint.clamp(0.0, 1.0)).round() as usize)
                        .collect(),
                );
            }
            let t = trace(
                size,
                pts.iter().map(|c| c.d).collect(),
                pts.iter().map(|c| c.win).collect(),
                pts.iter().map(|c| c.hover()).collect(),
                k,
            )
            .mode(if with_lines {
                Mode::LinesMarkers
            } else {
                Mode::Markers
            })
            .marker(marker)
            .line(Line::new().color(colour).width(1.5))
            .error_y(error_bars(&pts))
            .legend_group(size.as_str())
            .show_legend(legend.first(size));
            plot.add_trace(t);
        }
    }
    let mut notes = no_daa_note(n_daa, dropped);
    if !missing_sft.is_empty() && n_daa > 0 {
        notes.push(format!(
            "no SFT row (no point at sqrt(KL)=0) for size {}",
            missing_sft.join(", ")
        ));
    }
    finish(name, base_title, &notes, &grid, plot)
}

/// Fig. 1, top row: win rate against sqrt(KL) at the end of the epoch; one panel per objective
/// (dpo, ipo, slic), one colour per size, one point per beta (seeds averaged) plus the SFT
/// policy at sqrt(KL) = 0, with 95% error bars. Points of a size are joined in order of KL.
pub fn fig1_end_of_epoch(rows: &[ResultRow]) -> Figure {
    win_vs_d(
        rows,
        "fig1_end_of_epoch",
        "Fig. 1 (top): win rate vs sqrt(KL) at the end of the epoch",
        true,
        true,
    )
}

/// Fig. 1, bottom row: as [`fig1_end_of_epoch`] with every checkpoint (25/50/75/100% of the
/// epoch) of every beta as a point; larger markers are later checkpoints.
pub fn fig1_checkpoints(rows: &[ResultRow]) -> Figure {
    win_vs_d(
        rows,
        "fig1_checkpoints",
        "Fig. 1 (bottom): win rate vs sqrt(KL), every checkpoint",
        false,
        false,
    )
}

/// Fig. 2 / Appendix C for one model size: win rate (top row) and sqrt(KL) (bottom row)
/// against the fraction of the epoch seen, one line per beta (light: small beta, dark: large),
/// one column per objective. Each line starts at the SFT policy (fraction 0) when it exists.
pub fn fig2_intra_epoch(rows: &[ResultRow], size: &str) -> Figure {
    let mine: Vec<ResultRow> = rows.iter().filter(|r| r.size == size).cloned().collect();
    let (cells, dropped) = cells(&mine);
    let mut panels: Vec<Panel> = STANDARD_OBJECTIVES
        .iter()
        .map(|o| Panel::new(format!("{o}: win rate"), "fraction of the epoch", Y_WIN))
        .collect();
    panels.extend(STANDARD_OBJECTIVES.iter().map(|o| {
        Panel::new(
            format!("{o}: sqrt(KL)"),
            "fraction of the epoch",
            "sqrt(KL)",
        )
    }));
    let (grid, _) = Grid::new(3, panels);
    let sft = cells.iter().find(|c| c.is_sft());
    let mut plot = Plot::new();
    let mut n_daa = 0;
    for (k, obj) in STANDARD_OBJECTIVES.iter().enumerate() {
        let mut by_beta: BTreeMap<i64, Vec<&Cell>> = BTreeMap::new();
        for c in cells.iter().filter(|c| c.objective == *obj) {
            by_beta.entry(fkey(c.beta)).or_default().push(c);
        }
        let nb = by_beta.len();
        for (i, pts) in by_beta.values_mut().enumerate() {
            n_daa += pts.len();
            pts.sort_by(|a, b| a.checkpoint.total_cmp(&b.checkpoint));
            let beta = pts[0].beta;
            if let Some(s) = sft {
                pts.insert(0, s);
            }
            let colour = ramp_colour(i, nb);
            let label = format!("{obj} beta={}", fmt_num(beta));
            let x: Vec<f64> = pts
                .iter()
                .map(|c| if c.is_sft() { 0.0 } else { c.checkpoint })
                .collect();
            let hover: Vec<String> = pts.iter().map(|c| c.hover()).collect();
            let win = trace(
                &label,
                x.clone(),
                pts.iter().map(|c| c.win).collect(),
                hover.clone(),
                k,
            )
            .mode(Mode::LinesMarkers)
            .marker(Marker::new().color(colour.clone()))
            .line(Line::new().color(colour.clone()))
            .error_y(error_bars(pts))
            .legend_group(label.as_str());
            let kl = trace(
                &label,
                x,
                pts.iter().map(|c| c.d).collect(),
                hover,
                k + STANDARD_OBJECTIVES.len(),
            )
            .mode(Mode::LinesMarkers)
            .marker(Marker::new().color(colour.clone()))
            .line(Line::new().color(colour))
            .legend_group(label.as_str())
            .show_legend(false);
            plot.add_trace(win);
            plot.add_trace(kl);
        }
    }
    let mut notes = vec![];
    if mine.is_empty() {
        notes.push(format!("no data: no rows for size {size:?}"));
    } else {
        notes.extend(no_daa_note(n_daa, dropped));
        if sft.is_none() && n_daa > 0 {
            notes.push("no SFT row: lines start at the first checkpoint".into());
        }
    }
    finish(
        &format!("fig2_intra_epoch_{size}"),
        &format!("Fig. 2: intra-epoch win rate and sqrt(KL), size {size}"),
        &notes,
        &grid,
        plot,
    )
}

fn form_label(f: Form) -> &'static str {
    match f {
        Form::LogD => "R(d) = d(alpha - b ln d)",
        Form::QuadKl => "quadratic in KL",
        Form::QuadD => "quadratic in d",
        Form::QuadKlIcpt => "quadratic in KL + intercept",
        Form::QuadDIcpt => "quadratic in d + intercept",
    }
}

fn form_dash(f: Form) -> DashType {
    match f {
        Form::LogD => DashType::Solid,
        Form::QuadKl | Form::QuadKlIcpt => DashType::Dash,
        Form::QuadD | Form::QuadDIcpt => DashType::Dot,
    }
}

/// Section 3.2: the win-rate GAIN over the SFT policy against d = sqrt(KL) (every checkpoint
/// and seed a point, as `analysis::fits` fits them), with the fitted R(d) = d(alpha - b ln d)
/// (solid), quadratic in KL (dashed) and quadratic in d (dotted) of each (objective, size)
/// group of `fits`; the legend gives each curve's in-sample RMSE. One panel per objective
/// (dpo, ipo, slic, then any other objective in the data), colour per size. Pooled groups
/// (size `*`) are not drawn.
pub fn fit_overlays(rows: &[ResultRow], fits: &[FitGroup]) -> Figure {
    let gp = gain_points(rows);
    let mut order = size_order(rows);
    for s in order_sizes_by_name(
        fits.iter()
            .filter(|g| g.size != POOLED)
            .map(|g| g.size.clone()),
    ) {
        if !order.contains(&s) {
            order.push(s);
        }
    }
    let mut objectives: Vec<String> = STANDARD_OBJECTIVES.iter().map(|s| s.to_string()).collect();
    let mut extra: Vec<String> = gp
        .points
        .iter()
        .map(|p| p.objective.clone())
        .chain(fits.iter().map(|g| g.objective.clone()))
        .filter(|o| o != POOLED && !objectives.contains(o))
        .collect();
    extra.sort();
    extra.dedup();
    objectives.extend(extra);
    let panels: Vec<Panel> = objectives
        .iter()
        .map(|o| Panel::new(o.as_str(), X_SQRT_KL, "win-rate gain over SFT"))
        .collect();
    let (grid, dropped_panels) = Grid::new(3, panels);
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    let mut n_curves = 0;
    for (k, obj) in objectives.iter().take(grid.panels.len()).enumerate() {
        let panel_dmax = gp
            .points
            .iter()
            .filter(|p| &p.objective == obj && p.d.is_finite())
            .map(|p| p.d)
            .fold(0.0, f64::max);
        for size in &order {
            let pts: Vec<_> = gp
                .points
                .iter()
                .filter(|p| &p.objective == obj && &p.size == size)
                .collect();
            let colour = colour_of(&order, size);
            if !pts.is_empty() {
                let t = trace(
                    &format!("{size} data"),
                    pts.iter().map(|p| p.d).collect(),
                    pts.iter().map(|p| p.gain).collect(),
                    pts.iter()
                        .map(|p| {
                            format!(
                                "{obj} size {size}<br>beta={} checkpoint={} seed={}<br>sqrt(KL)={}<br>gain={}",
                                fmt_num(p.beta),
                                fmt_num(p.checkpoint),
                                p.seed,
                                fmt_num(p.d),
                                fmt_num(p.gain)
                            )
                        })
                        .collect(),
                    k,
                )
                .mode(Mode::Markers)
                .marker(Marker::new().color(colour).size(6).opacity(0.7))
                .legend_group(size.as_str())
                .show_legend(legend.first(&format!("{size} data")));
                plot.add_trace(t);
            }
            let Some(g) = fits.iter().find(|g| &g.objective == obj && &g.size == size) else {
                continue;
            };
            let own_dmax = pts.iter().map(|p| p.d).fold(0.0, f64::max);
            let d_max = if own_dmax > 0.0 {
                own_dmax
            } else if panel_dmax > 0.0 {
                panel_dmax
            } else {
                1.0
            };
            for form in Form::MAIN {
                let Some(f) = g.get(form) else { continue };
                if f.coef.iter().any(|c| !c.is_finite()) {
                    continue;
                }
                let curve = f.curve(d_max, 100);
                let label = format!(
                    "{size} {obj}: {} (RMSE {})",
                    form_label(form),
                    fmt_num(f.rmse)
                );
                let t = trace(
                    &label,
                    curve.iter().map(|p| p.0).collect(),
                    curve.iter().map(|p| p.1).collect(),
                    curve
                        .iter()
                        .map(|p| {
                            format!(
                                "{label}<br>d={}<br>predicted gain={}",
                                fmt_num(p.0),
                                fmt_num(p.1)
                            )
                        })
                        .collect(),
                    k,
                )
                .mode(Mode::Lines)
                .line(Line::new().color(colour).dash(form_dash(form)).width(2.0))
                .legend_group(size.as_str());
                plot.add_trace(t);
                n_curves += 1;
            }
        }
    }
    let mut notes = vec![];
    if gp.points.is_empty() {
        notes.push("no data: no DAA rows with an SFT row of the same size and seed".into());
    }
    if n_curves == 0 {
        notes.push("no fitted curves".into());
    }
    if !gp.dropped.is_empty() {
        notes.push(format!("{} rows left out", gp.dropped.len()));
    }
    if dropped_panels > 0 {
        notes.push(format!("{dropped_panels} objectives not shown"));
    }
    finish(
        "fit_overlays",
        "Section 3.2: win-rate gain vs sqrt(KL) with fitted forms",
        &notes,
        &grid,
        plot,
    )
}

/// Fig. 3 left for one size: standard DPO (`dpo`) against length-regularized DPO (`rdpo`) at
/// the end of the epoch, one point per beta plus the SFT policy. Left panel: win rate (solid)
/// and, where the rows carry it, the length-corrected win rate (dashed) against sqrt(KL);
/// right panel: mean sample length against sqrt(KL).
pub fn fig3_rdpo(rows: &[ResultRow], size: &str) -> Figure {
    let mine: Vec<ResultRow> = rows.iter().filter(|r| r.size == size).cloned().collect();
    let (cells, dropped) = cells(&mine);
    let panels = vec![
        Panel::new("win rate", X_SQRT_KL, Y_WIN),
        Panel::new("mean sample length", X_SQRT_KL, "mean length (tokens)"),
    ];
    let (grid, _) = Grid::new(2, panels);
    let sft = cells.iter().find(|c| c.is_sft());
    let mut plot = Plot::new();
    let mut notes = vec![];
    let mut any_lc = false;
    let mut n_daa = 0;
    for (obj, colour) in [("dpo", "#2e86ab"), ("rdpo", "#d1495b")] {
        let mut pts: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.objective == obj && c.checkpoint >= crate::analysis::table::END_OF_EPOCH)
            .collect();
        if pts.is_empty() {
            notes.push(format!("no {obj} rows at the end of the epoch"));
            continue;
        }
        n_daa += pts.len();
        if let Some(s) = sft {
            pts.push(s);
        }
        pts.sort_by(|a, b| a.d.total_cmp(&b.d));
        let hover: Vec<String> = pts.iter().map(|c| c.hover()).collect();
        let label = if obj == "dpo" { "DPO" } else { "R-DPO" };
        plot.add_trace(
            trace(
                label,
                pts.iter().map(|c| c.d).collect(),
                pts.iter().map(|c| c.win).collect(),
                hover.clone(),
                0,
            )
            .mode(Mode::LinesMarkers)
            .marker(Marker::new().color(colour))
            .line(Line::new().color(colour))
            .error_y(error_bars(&pts))
            .legend_group(obj),
        );
        let lc: Vec<&&Cell> = pts
            .iter()
            .filter(|c| c.length_corrected.is_some())
            .collect();
        if !lc.is_empty() {
            any_lc = true;
            plot.add_trace(
                trace(
                    &format!("{label} length-corrected"),
                    lc.iter().map(|c| c.d).collect(),
                    lc.iter()
                        .map(|c| c.length_corrected.unwrap_or(f64::NAN))
                        .collect(),
                    lc.iter().map(|c| c.hover()).collect(),
                    0,
                )
                .mode(Mode::LinesMarkers)
                .marker(
                    Marker::new()
                        .color(colour)
                        .symbol(plotly::common::MarkerSymbol::Diamond),
                )
                .line(Line::new().color(colour).dash(DashType::Dash))
                .legend_group(obj),
            );
        }
        let ln: Vec<&&Cell> = pts.iter().filter(|c| c.mean_length.is_finite()).collect();
        if !ln.is_empty() {
            plot.add_trace(
                trace(
                    &format!("{label} length"),
                    ln.iter().map(|c| c.d).collect(),
                    ln.iter().map(|c| c.mean_length).collect(),
                    ln.iter().map(|c| c.hover()).collect(),
                    1,
                )
                .mode(Mode::LinesMarkers)
                .marker(Marker::new().color(colour))
                .line(Line::new().color(colour))
                .legend_group(obj)
                .show_legend(false),
            );
        }
    }
    if mine.is_empty() {
        notes = vec![format!("no data: no rows for size {size:?}")];
    } else if n_daa == 0 {
        notes = vec![
            "no data: no dpo or rdpo rows at the end of the epoch with a finite KL and win rate"
                .into(),
        ];
    } else {
        if !any_lc {
            notes.push("no length-corrected win rates".into());
        }
        if dropped > 0 {
            notes.push(format!(
                "{dropped} rows with a non-finite KL or win rate left out"
            ));
        }
    }
    finish(
        &format!("fig3_rdpo_{size}"),
        &format!("Fig. 3 (left): DPO vs length-regularized DPO, size {size}"),
        &notes,
        &grid,
        plot,
    )
}

/// Fig. 3 right: R^2 of the regression of the implicit log-ratio on sample length against beta
/// (log axis), one panel per checkpoint, colour per size, line style per objective (solid dpo,
/// dashed ipo, dotted slic, ...). R^2 is averaged over the seeds where it is defined. Sizes are
/// ordered by [`super::order_sizes_by_name`]; use [`fig3_length_r2_ordered`] to give the order.
pub fn fig3_length_r2(fits: &[LengthFit]) -> Figure {
    let order = order_sizes_by_name(fits.iter().map(|f| f.size.clone()));
    fig3_length_r2_ordered(fits, &order)
}

/// [`fig3_length_r2`] with the sizes in the given order (the colours follow it; sizes not in
/// `sizes` come after, by name).
pub fn fig3_length_r2_ordered(fits: &[LengthFit], sizes: &[String]) -> Figure {
    let mut order: Vec<String> = sizes.to_vec();
    for s in order_sizes_by_name(fits.iter().map(|f| f.size.clone())) {
        if !order.contains(&s) {
            order.push(s);
        }
    }
    let mut cks: BTreeMap<i64, f64> = BTreeMap::new();
    for f in fits {
        cks.entry(fkey(f.checkpoint)).or_insert(f.checkpoint);
    }
    let mut objectives: Vec<String> = STANDARD_OBJECTIVES
        .iter()
        .map(|s| s.to_string())
        .filter(|o| fits.iter().any(|f| &f.objective == o))
        .collect();
    let mut extra: Vec<String> = fits
        .iter()
        .map(|f| f.objective.clone())
        .filter(|o| !objectives.contains(o))
        .collect();
    extra.sort();
    extra.dedup();
    objectives.extend(extra);
    let panels: Vec<Panel> = cks
        .values()
        .map(|c| Panel {
            x_log: true,
            y_range: Some((0.0, 1.02)),
            ..Panel::new(
                format!("checkpoint {}", fmt_num(*c)),
                "beta",
                "R^2 of log-ratio on length",
            )
        })
        .collect();
    let (grid, dropped_panels) = Grid::new(2, panels);
    let dashes = [
        DashType::Solid,
        DashType::Dash,
        DashType::Dot,
        DashType::DashDot,
        DashType::LongDash,
        DashType::LongDashDot,
    ];
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    let mut undefined = 0;
    for (k, ck) in cks.keys().take(grid.panels.len()).enumerate() {
        for (oi, obj) in objectives.iter().enumerate() {
            for size in &order {
                let mut by_beta: BTreeMap<i64, (f64, Vec<f64>, usize)> = BTreeMap::new();
                for f in fits
                    .iter()
                    .filter(|f| fkey(f.checkpoint) == *ck && &f.objective == obj && &f.size == size)
                {
                    let e = by_beta.entry(fkey(f.beta)).or_insert((f.beta, vec![], 0));
                    e.2 += f.n;
                    if f.r2.is_finite() {
                        e.1.push(f.r2);
                    } else {
                        undefined += 1;
                    }
                }
                let pts: Vec<(f64, f64, usize, usize)> = by_beta
                    .values()
                    .filter(|(b, r, _)| !r.is_empty() && *b > 0.0 && b.is_finite())
                    .map(|(b, r, n)| (*b, r.iter().sum::<f64>() / r.len() as f64, r.len(), *n))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let label = format!("{size} {obj}");
                let colour = colour_of(&order, size);
                plot.add_trace(
                    trace(
                        &label,
                        pts.iter().map(|p| p.0).collect(),
                        pts.iter().map(|p| p.1).collect(),
                        pts.iter()
                            .map(|p| {
                                format!(
                                    "{obj} size {size}<br>beta={} checkpoint={}<br>R^2={} (mean of {} seeds, {} samples)",
                                    fmt_num(p.0),
                                    fmt_num(cks[ck]),
                                    fmt_num(p.1),
                                    p.2,
                                    p.3
                                )
                            })
                            .collect(),
                        k,
                    )
                    .mode(Mode::LinesMarkers)
                    .marker(Marker::new().color(colour))
                    .line(Line::new().color(colour).dash(dashes[oi % dashes.len()].clone()))
                    .legend_group(label.as_str())
                    .show_legend(legend.first(&label)),
                );
            }
        }
    }
    let mut notes = vec![];
    if fits.is_empty() {
        notes.push("no data: no length fits".into());
    } else if plot.data().is_empty() {
        notes.push("no data: R^2 undefined everywhere".into());
    }
    if undefined > 0 {
        notes.push(format!(
            "{undefined} regressions with undefined R^2 left out"
        ));
    }
    if dropped_panels > 0 {
        notes.push(format!("{dropped_panels} checkpoints not shown"));
    }
    finish(
        "fig3_length_r2",
        "Fig. 3 (right): R^2 of the implicit log-ratio on length vs beta",
        &notes,
        &grid,
        plot,
    )
}

/// Points (x, win rate) of every DAA row of one objective and size with a finite x and win rate.
fn row_points<'a>(
    rows: &'a [ResultRow],
    obj: &str,
    size: &str,
    x: impl Fn(&ResultRow) -> f64,
) -> Vec<(f64, &'a ResultRow)> {
    rows.iter()
        .filter(|r| !r.is_sft() && r.objective == obj && r.size == size)
        .map(|r| (x(r), r))
        .filter(|(v, r)| v.is_finite() && r.win_rate.is_finite())
        .collect()
}

fn row_hover(r: &ResultRow, xname: &str, x: f64) -> String {
    format!(
        "{} size {}<br>beta={} checkpoint={} seed={}<br>{xname}={}<br>win rate={}",
        r.objective,
        r.size,
        fmt_num(r.beta),
        fmt_num(r.checkpoint),
        r.seed,
        fmt_num(x),
        fmt_num(r.win_rate)
    )
}

/// Fig. 4: win rate against implicit-reward accuracy (top row) and against the held-out DAA
/// loss (bottom row), one column per objective, colour per size; every DAA row (beta,
/// checkpoint, seed) is a point.
pub fn fig4_metrics(rows: &[ResultRow]) -> Figure {
    let order = size_order(rows);
    type Metric = (&'static str, &'static str, fn(&ResultRow) -> f64);
    let metrics: [Metric; 2] = [
        ("implicit-reward accuracy", "accuracy", |r| {
            r.implicit_accuracy
        }),
        ("held-out loss", "held-out DAA loss", |r| r.heldout_loss),
    ];
    let mut panels = vec![];
    for (title, x, _) in &metrics {
        for o in STANDARD_OBJECTIVES {
            panels.push(Panel::new(format!("{o}: {title}"), x, Y_WIN));
        }
    }
    let (grid, _) = Grid::new(3, panels);
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    let mut n = 0;
    for (mi, (_, xname, f)) in metrics.iter().enumerate() {
        for (oi, obj) in STANDARD_OBJECTIVES.iter().enumerate() {
            let k = mi * STANDARD_OBJECTIVES.len() + oi;
            for size in &order {
                let pts = row_points(rows, obj, size, f);
                if pts.is_empty() {
                    continue;
                }
                n += pts.len();
                let colour = colour_of(&order, size);
                plot.add_trace(
                    trace(
                        size,
                        pts.iter().map(|p| p.0).collect(),
                        pts.iter().map(|p| p.1.win_rate).collect(),
                        pts.iter().map(|p| row_hover(p.1, xname, p.0)).collect(),
                        k,
                    )
                    .mode(Mode::Markers)
                    .marker(Marker::new().color(colour).size(7).opacity(0.8))
                    .legend_group(size.as_str())
                    .show_legend(legend.first(size)),
                );
            }
        }
    }
    let n_daa = rows
        .iter()
        .filter(|r| STANDARD_OBJECTIVES.contains(&r.objective.as_str()))
        .count();
    let mut notes = vec![];
    if n == 0 {
        notes.push("no data: no DAA rows with finite metrics and win rate".into());
    } else if n < 2 * n_daa {
        notes.push(format!(
            "{} (row, metric) points with a non-finite value left out",
            2 * n_daa - n
        ));
    }
    finish(
        "fig4_metrics",
        "Fig. 4: win rate vs implicit-reward accuracy and vs held-out loss",
        &notes,
        &grid,
        plot,
    )
}

/// Fig. 5: win rate against sqrt(-E[implicit reward of the chosen response]) on held-out pairs
/// (`analysis::metrics::signed_sqrt_neg`: a positive mean reward r is drawn at -sqrt(r)), one
/// panel per objective, colour per size, every DAA row a point, plus the SFT policy of each
/// size at 0 (its implicit reward is 0 by definition).
pub fn fig5_likelihood(rows: &[ResultRow]) -> Figure {
    fig5_likelihood_on(rows, false)
}

/// Fig. 5 with the log-ratio of the chosen response on the x axis instead of the implicit
/// reward: sqrt(-E[r(x, y_w)] / beta), the quantity the paper's section 3.5 equates with the
/// forward KL (the variant reported beside the C8 verdict).
pub fn fig5_likelihood_without_beta(rows: &[ResultRow]) -> Figure {
    fig5_likelihood_on(rows, true)
}

fn fig5_likelihood_on(rows: &[ResultRow], without_beta: bool) -> Figure {
    let order = size_order(rows);
    let (cells, _) = cells(rows);
    let xname = if without_beta {
        "sqrt(-E[r(x, y_w)]/beta)"
    } else {
        "sqrt(-E[r(x, y_w)])"
    };
    let reward = |r: &ResultRow| {
        if without_beta && r.beta > 0.0 {
            r.chosen_reward / r.beta
        } else {
            r.chosen_reward
        }
    };
    let panels: Vec<Panel> = STANDARD_OBJECTIVES
        .iter()
        .map(|o| Panel::new(*o, xname, Y_WIN))
        .collect();
    let (grid, _) = Grid::new(3, panels);
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    let mut n = 0;
    let mut positive = 0;
    for (k, obj) in STANDARD_OBJECTIVES.iter().enumerate() {
        for size in &order {
            let pts = row_points(rows, obj, size, |r| signed_sqrt_neg(reward(r)));
            if pts.is_empty() {
                continue;
            }
            n += pts.len();
            positive += pts.iter().filter(|p| p.1.chosen_reward > 0.0).count();
            let mut x: Vec<f64> = pts.iter().map(|p| p.0).collect();
            let mut y: Vec<f64> = pts.iter().map(|p| p.1.win_rate).collect();
            let mut hover: Vec<String> = pts.iter().map(|p| row_hover(p.1, xname, p.0)).collect();
            if let Some(s) = cells.iter().find(|c| c.is_sft() && c.size == *size) {
                x.push(0.0);
                y.push(s.win);
                hover.push(s.hover());
            }
            let colour = colour_of(&order, size);
            plot.add_trace(
                trace(size, x, y, hover, k)
                    .mode(Mode::Markers)
                    .marker(Marker::new().color(colour).size(7).opacity(0.8))
                    .legend_group(size.as_str())
                    .show_legend(legend.first(size)),
            );
        }
    }
    let mut notes = vec![];
    if n == 0 {
        notes.push("no data: no DAA rows with a finite chosen reward and win rate".into());
    }
    if positive > 0 {
        notes.push(format!(
            "{positive} rows with E[r(x, y_w)] > 0 drawn at -sqrt(r)"
        ));
    }
    let (name, title) = if without_beta {
        (
            "fig5_likelihood_without_beta",
            "Fig. 5, without beta: win rate vs sqrt(-E[log-ratio of the chosen response])",
        )
    } else {
        (
            "fig5_likelihood",
            "Fig. 5: win rate vs sqrt(-E[implicit reward of the chosen response])",
        )
    };
    finish(name, title, &notes, &grid, plot)
}
