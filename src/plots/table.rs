//! Small tables for notebooks: rendered as escaped HTML (evcxr `text/html`) or written as CSV.
//!
//! Cells are strings; numbers are formatted by [`super::fmt_num`] (4 significant digits, empty
//! when not finite). The analysis module's own CSV writers keep full precision: use those for
//! data, these for reading.

use super::{escape_html, fmt_num};
use crate::analysis::claims::Verdict;
use crate::analysis::fits::FitGroup;
use crate::analysis::length::LengthFit;
use crate::analysis::table::ResultRow;
use anyhow::{Result, bail};
use std::path::Path;

/// A named table of strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

fn cols(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl Table {
    /// The result rows, one line each, with sqrt(KL) added after KL.
    pub fn from_results(rows: &[ResultRow]) -> Table {
        let columns = cols(&[
            "objective",
            "size",
            "n_params",
            "beta",
            "checkpoint",
            "seed",
            "kl",
            "kl_se",
            "sqrt_kl",
            "win_rate",
            "win_rate_lo",
            "win_rate_hi",
            "mean_length",
            "heldout_loss",
            "implicit_accuracy",
            "chosen_reward",
            "length_corrected_win_rate",
            "config_hash",
        ]);
        let rows = rows
            .iter()
            .map(|r| {
                vec![
                    r.objective.clone(),
                    r.size.clone(),
                    r.n_params.to_string(),
                    fmt_num(r.beta),
                    fmt_num(r.checkpoint),
                    r.seed.to_string(),
                    fmt_num(r.kl),
                    fmt_num(r.kl_se),
                    fmt_num(if r.kl.is_finite() {
                        r.kl.max(0.0).sqrt()
                    } else {
                        f64::NAN
                    }),
                    fmt_num(r.win_rate),
                    fmt_num(r.win_rate_lo),
                    fmt_num(r.win_rate_hi),
                    fmt_num(r.mean_length),
                    fmt_num(r.heldout_loss),
                    fmt_num(r.implicit_accuracy),
                    fmt_num(r.chosen_reward),
                    r.length_corrected_win_rate.map(fmt_num).unwrap_or_default(),
                    r.config_hash.clone(),
                ]
            })
            .collect();
        Table {
            name: "results".into(),
            columns,
            rows,
        }
    }

    /// One line per (group, fitted form): coefficients as `name=value [lo, hi]`, RMSE,
    /// leave-one-out RMSE, the peak d; a group none of whose forms could be fitted gets one
    /// line with an empty form. `problems` lists the group's problems (on every line).
    pub fn from_fits(groups: &[FitGroup]) -> Table {
        let columns = cols(&[
            "objective",
            "size",
            "form",
            "n",
            "coefficients",
            "rmse",
            "loo_rmse",
            "peak_d",
            "n_boot_ok",
            "problems",
        ]);
        let mut rows = vec![];
        for g in groups {
            let problems = g.problems.join("; ");
            if g.fits.is_empty() {
                rows.push(vec![
                    g.objective.clone(),
                    g.size.clone(),
                    String::new(),
                    g.n.to_string(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    problems.clone(),
                ]);
            }
            for f in &g.fits {
                let coef: Vec<String> = f
                    .form
                    .coef_names()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let get = |v: &Vec<f64>| v.get(i).copied().unwrap_or(f64::NAN);
                        let (lo, hi) = (get(&f.coef_lo), get(&f.coef_hi));
                        if lo.is_finite() && hi.is_finite() {
                            format!(
                                "{n}={} [{}, {}]",
                                fmt_num(get(&f.coef)),
                                fmt_num(lo),
                                fmt_num(hi)
                            )
                        } else {
                            format!("{n}={}", fmt_num(get(&f.coef)))
                        }
                    })
                    .collect();
                rows.push(vec![
                    g.objective.clone(),
                    g.size.clone(),
                    f.form.name().to_string(),
                    f.n.to_string(),
                    coef.join("; "),
                    fmt_num(f.rmse),
                    fmt_num(f.loo_rmse),
                    f.peak_d().map(fmt_num).unwrap_or_default(),
                    f.n_boot_ok.to_string(),
                    problems.clone(),
                ]);
            }
        }
        Table {
            name: "fits".into(),
            columns,
            rows,
        }
    }

    /// The length regressions, one line each.
    pub fn from_length(fits: &[LengthFit]) -> Table {
        let columns = cols(&[
            "objective",
            "size",
            "beta",
            "checkpoint",
            "seed",
            "n",
            "gamma",
            "intercept",
            "r2",
        ]);
        let rows = fits
            .iter()
            .map(|f| {
                vec![
                    f.objective.clone(),
                    f.size.clone(),
                    fmt_num(f.beta),
                    fmt_num(f.checkpoint),
                    f.seed.to_string(),
                    f.n.to_string(),
                    fmt_num(f.gamma),
                    fmt_num(f.intercept),
                    fmt_num(f.r2),
                ]
            })
            .collect();
        Table {
            name: "length".into(),
            columns,
            rows,
        }
    }

    /// The claim verdicts: id, verdict, summary, rule.
    pub fn from_claims(verdicts: &[Verdict]) -> Table {
        let rows = verdicts
            .iter()
            .map(|v| {
                vec![
                    v.id.clone(),
                    v.verdict.as_str().to_string(),
                    v.summary.clone(),
                    v.rule.clone(),
                ]
            })
            .collect();
        Table {
            name: "claims".into(),
            columns: cols(&["claim", "verdict", "summary", "rule"]),
            rows,
        }
    }

    /// An HTML `<table>` with the name as caption; every cell escaped.
    pub fn to_html(&self) -> String {
        let mut s = String::from(
            "<table class=\"overopt-table\" style=\"border-collapse: collapse; font-size: 12px;\">\n",
        );
        s.push_str(&format!(
            "<caption style=\"text-align: left; font-weight: bold;\">{}</caption>\n<thead><tr>",
            escape_html(&self.name)
        ));
        let cell =
            "border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top;";
        for c in &self.columns {
            s.push_str(&format!("<th style=\"{cell}\">{}</th>", escape_html(c)));
        }
        s.push_str("</tr></thead>\n<tbody>\n");
        for r in &self.rows {
            s.push_str("<tr>");
            for v in r {
                s.push_str(&format!("<td style=\"{cell}\">{}</td>", escape_html(v)));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody>\n</table>");
        s
    }

    /// Print the table in evcxr's rich-output protocol as `text/html`.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT",
            self.to_html()
        );
    }

    /// The table as CSV: a header line, then one line per row, each ended by `\n`; a field is
    /// quoted (RFC 4180: inner quotes doubled) when it holds a comma, quote or line break.
    /// Errors when a row's length differs from the header's, naming the row.
    pub fn to_csv(&self) -> Result<String> {
        let line = |cells: &[String]| -> String {
            cells
                .iter()
                .map(|c| crate::analysis::csv_str(c))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut s = line(&self.columns);
        s.push('\n');
        for (i, r) in self.rows.iter().enumerate() {
            if r.len() != self.columns.len() {
                bail!(
                    "table {}: row {i} has {} cells, the header has {} columns",
                    self.name,
                    r.len(),
                    self.columns.len()
                );
            }
            s.push_str(&line(r));
            s.push('\n');
        }
        Ok(s)
    }

    /// Write [`Table::to_csv`] to `path` atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.to_csv()?.as_bytes())
    }
}
