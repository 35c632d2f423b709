//! The report writer: every figure, the analysis tables and claims.json in one call.
//!
//! Layout under `out`:
//! - `figures/<name>.html`: every figure of [`super::figures`] (Fig. 2 and Fig. 3 left once per
//!   size) and, with a toy report, of [`super::toy`]; each a standalone offline page;
//! - `fits.csv` (section 3.2, every checkpoint of every seed, `analysis::fits::fit_table`),
//!   `length.csv` (section 3.3) and `metrics.csv` (sections 3.4-3.5), beside the results;
//! - `claims.json`: the verdicts on C1-C9 (`analysis::claims`), C9 from the toy report.

use super::figures::size_order;
use super::{
    Figure, fig1_checkpoints, fig1_end_of_epoch, fig2_intra_epoch, fig3_length_r2_ordered,
    fig3_rdpo, fig4_metrics, fig5_likelihood, fit_overlays, order_sizes_by_name, toy_mdp_figures,
};
use crate::analysis::claims::{Thresholds, Verdict, evaluate_all_with, write_claims_json};
use crate::analysis::fits::{FitGroup, FitOptions, fit_table, write_fit_csv};
use crate::analysis::length::{LengthFit, length_fits, write_length_csv};
use crate::analysis::metrics::{metric_correlations, write_metrics_csv};
use crate::analysis::table::{ResultRow, SampleRow, ToyMdpSummary};
use crate::toy_mdp::ToyMdpReport;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What [`write_report`] wrote, and the verdicts it wrote into claims.json.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// Every file written, in order: figures, then fits.csv, length.csv, metrics.csv,
    /// claims.json.
    pub files: Vec<PathBuf>,
    /// The figures' paths (a prefix of `files`).
    pub figures: Vec<PathBuf>,
    /// The verdicts on C1..C9.
    pub verdicts: Vec<Verdict>,
}

/// The toy-MDP runs as the rows claim C9 reads: per run, the end-of-training mass on the
/// trajectories that are none of the three SFT demonstrations (`ood_mass`), on the preferred
/// trajectory (`preferred_mass`), the heaviest OOD trajectory written as its actions
/// (`a1,a1,a1`), and the SFT policy's OOD mass (`sft_ood_mass`) so that C9 measures what the
/// DAA moved.
pub fn toy_summaries(report: &ToyMdpReport) -> Vec<ToyMdpSummary> {
    report
        .runs
        .iter()
        .map(|r| ToyMdpSummary {
            objective: r.objective.clone(),
            beta: r.beta,
            seed: r.seed,
            ood_mass: r.end_mass.ood,
            preferred_mass: r.end_mass.preferred,
            top_ood_trajectory: r
                .top_ood
                .0
                .iter()
                .map(|a| format!("a{a}"))
                .collect::<Vec<_>>()
                .join(","),
            sft_ood_mass: Some(r.sft_mass.ood),
        })
        .collect()
}

/// Every figure of the report, without writing anything.
pub fn report_figures(
    rows: &[ResultRow],
    samples: &[SampleRow],
    toy: Option<&ToyMdpReport>,
) -> Vec<Figure> {
    let fits = fit_table(rows, None, &FitOptions::default());
    figures_with(rows, samples, toy, &fits, &length_fits(samples))
}

fn figures_with(
    rows: &[ResultRow],
    samples: &[SampleRow],
    toy: Option<&ToyMdpReport>,
    fits: &[FitGroup],
    lengths: &[LengthFit],
) -> Vec<Figure> {
    let sizes = size_order(rows);
    let mut figs = vec![fig1_end_of_epoch(rows), fig1_checkpoints(rows)];
    if sizes.is_empty() {
        let mut f = fig2_intra_epoch(rows, "");
        f.name = "fig2_intra_epoch".into();
        figs.push(f);
    }
    figs.extend(sizes.iter().map(|s| fig2_intra_epoch(rows, s)));
    figs.push(fit_overlays(rows, fits));
    let mut rdpo_sizes: Vec<&String> = sizes
        .iter()
        .filter(|s| rows.iter().any(|r| r.objective == "rdpo" && &r.size == *s))
        .collect();
    if rdpo_sizes.is_empty() {
        match sizes.last() {
            Some(s) => rdpo_sizes.push(s),
            None => {
                let mut f = fig3_rdpo(rows, "");
                f.name = "fig3_rdpo".into();
                figs.push(f);
            }
        }
    }
    figs.extend(rdpo_sizes.into_iter().map(|s| fig3_rdpo(rows, s)));
    let mut order = sizes.clone();
    order.extend(
        order_sizes_by_name(samples.iter().map(|s| s.size.clone()))
            .into_iter()
            .filter(|s| !sizes.contains(s)),
    );
    figs.push(fig3_length_r2_ordered(lengths, &order));
    figs.push(fig4_metrics(rows));
    figs.push(fig5_likelihood(rows));
    if let Some(t) = toy {
        figs.extend(toy_mdp_figures(t));
    }
    figs
}

/// Write the report under `out` (see the module docs): every figure to `out/figures/`, the
/// fit / length / metric tables to `out/fits.csv`, `out/length.csv`, `out/metrics.csv`, and
/// the verdicts on C1..C9 to `out/claims.json` (C9 from `toy` through [`toy_summaries`]; not
/// evaluated without it). Every file is written atomically.
pub fn write_report(
    out: &Path,
    rows: &[ResultRow],
    samples: &[SampleRow],
    toy: Option<&ToyMdpReport>,
) -> Result<ReportFiles> {
    let th = Thresholds::default();
    let fits = fit_table(rows, None, &FitOptions::default());
    let lengths = length_fits(samples);
    let fig_dir = out.join("figures");
    let mut figures = vec![];
    for f in figures_with(rows, samples, toy, &fits, &lengths) {
        let p = f
            .write_html(&fig_dir)
            .with_context(|| format!("writing figure {}", f.name))?;
        figures.push(p);
    }
    let mut files = figures.clone();

    let p = out.join("fits.csv");
    write_fit_csv(&p, &fits)?;
    files.push(p);
    let p = out.join("length.csv");
    write_length_csv(&p, &lengths)?;
    files.push(p);
    let p = out.join("metrics.csv");
    write_metrics_csv(&p, &metric_correlations(rows, th.n_boot, th.seed))?;
    files.push(p);

    let toy_rows = toy.map(toy_summaries).unwrap_or_default();
    let verdicts = evaluate_all_with(rows, samples, &toy_rows, &th);
    let p = out.join("claims.json");
    write_claims_json(&p, &verdicts)?;
    files.push(p);
    Ok(ReportFiles {
        files,
        figures,
        verdicts,
    })
}
