//! Figures of the toy tree MDP (paper section 4 and Appendices D-E, Figs. 6-7 and 9-18 style).
//!
//! [`ToyMdpReport`] holds end-of-training summaries; the per-step masses and the per-trajectory
//! end probabilities live in the CSV tables `run_section` wrote (`toy_mdp_groups.csv`,
//! `toy_mdp_trajectories.csv`, listed in `report.files`). The figures that need them read
//! those files; when a file is missing or unreadable the figure is empty and its title says
//! so (the per-trajectory figure then falls back on the three heaviest OOD trajectories the
//! report itself keeps per cell).

use super::figures::{LegendOnce, trace};
use super::{Figure, Grid, Panel, fmt_num, ramp_colour, titled};
use crate::analysis::table::fkey;
use crate::toy_mdp::{
    GROUPS_CSV, Group, TRAJECTORIES_CSV, ToyMdpReport, Trajectory, all_trajectories,
};
use anyhow::{Context, Result, bail};
use plotly::common::{DashType, HoverInfo, Line, Marker, Mode};
use plotly::layout::BarMode;
use plotly::{Bar, Plot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn group_colour(g: Group) -> &'static str {
    match g {
        Group::Preferred => "#2a9d4b",
        Group::Dispreferred => "#c0392b",
        Group::ThirdDemo => "#7d5ba6",
        Group::Ood => "#e08e1b",
    }
}

fn group_label(g: Group) -> &'static str {
    match g {
        Group::Preferred => "preferred a1a1a0",
        Group::Dispreferred => "dispreferred a0a0a0",
        Group::ThirdDemo => "third demo a2a2a2",
        Group::Ood => "OOD (24 unseen)",
    }
}

fn group_of_name(s: &str) -> Option<Group> {
    Group::ALL.into_iter().find(|g| g.name() == s)
}

/// The path in `report.files` whose file name is `name`.
fn report_file(report: &ToyMdpReport, name: &str) -> Option<PathBuf> {
    report
        .files
        .iter()
        .find(|p| p.file_name().is_some_and(|f| f == name))
        .cloned()
}

/// A small CSV (no quoted fields, as the toy module writes them) as header + records; a
/// record with the wrong number of fields is an error naming the file and line.
fn read_simple_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let Some(head) = lines.next() else {
        bail!("{}: empty file", path.display());
    };
    let header: Vec<String> = head.split(',').map(str::to_string).collect();
    let mut recs = vec![];
    for (i, l) in lines.enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let r: Vec<String> = l.split(',').map(str::to_string).collect();
        if r.len() != header.len() {
            bail!(
                "{}: line {}: {} fields, the header has {}",
                path.display(),
                i + 2,
                r.len(),
                header.len()
            );
        }
        recs.push(r);
    }
    Ok((header, recs))
}

fn col(header: &[String], name: &str, path: &Path) -> Result<usize> {
    header
        .iter()
        .position(|h| h == name)
        .with_context(|| format!("{}: no column {name:?}", path.display()))
}

/// One logged point of `toy_mdp_groups.csv`.
#[derive(Debug, Clone)]
struct GroupPoint {
    objective: String,
    beta: f64,
    seed: u64,
    step: usize,
    group: Group,
    mass: f64,
}

fn read_groups(path: &Path) -> Result<Vec<GroupPoint>> {
    let (h, recs) = read_simple_csv(path)?;
    let (o, b, s, st, g, m) = (
        col(&h, "objective", path)?,
        col(&h, "beta", path)?,
        col(&h, "seed", path)?,
        col(&h, "step", path)?,
        col(&h, "group", path)?,
        col(&h, "mass", path)?,
    );
    let mut out = vec![];
    for (i, r) in recs.iter().enumerate() {
        let bad = |what: &str| format!("{}: data line {}: bad {what}", path.display(), i + 1);
        out.push(GroupPoint {
            objective: r[o].clone(),
            beta: if r[b].is_empty() {
                f64::NAN
            } else {
                r[b].parse().with_context(|| bad("beta"))?
            },
            seed: r[s].parse().with_context(|| bad("seed"))?,
            step: r[st].parse().with_context(|| bad("step"))?,
            group: group_of_name(&r[g]).with_context(|| bad("group"))?,
            mass: r[m].parse().with_context(|| bad("mass"))?,
        });
    }
    Ok(out)
}

/// Mean end probability of every OOD trajectory per (objective, beta key), from
/// `toy_mdp_trajectories.csv`.
fn read_ood_end(path: &Path) -> Result<BTreeMap<(String, i64), (f64, BTreeMap<String, Vec<f64>>)>> {
    let (h, recs) = read_simple_csv(path)?;
    let (o, b, t, g, p) = (
        col(&h, "objective", path)?,
        col(&h, "beta", path)?,
        col(&h, "trajectory", path)?,
        col(&h, "group", path)?,
        col(&h, "prob_end", path)?,
    );
    let mut out: BTreeMap<(String, i64), (f64, BTreeMap<String, Vec<f64>>)> = BTreeMap::new();
    for (i, r) in recs.iter().enumerate() {
        if r[g] != Group::Ood.name() {
            continue;
        }
        let bad = |what: &str| format!("{}: data line {}: bad {what}", path.display(), i + 1);
        let beta: f64 = r[b].parse().with_context(|| bad("beta"))?;
        let prob: f64 = r[p].parse().with_context(|| bad("prob_end"))?;
        out.entry((r[o].clone(), fkey(beta)))
            .or_insert((beta, BTreeMap::new()))
            .1
            .entry(r[t].clone())
            .or_default()
            .push(prob);
    }
    Ok(out)
}

fn median(v: &[f64]) -> f64 {
    crate::analysis::stats::median(v)
}

fn beta_panels(report: &ToyMdpReport, y: &str) -> (Grid, usize) {
    let panels: Vec<Panel> = report
        .config
        .betas
        .iter()
        .map(|b| Panel {
            y_range: Some((-0.02, 1.02)),
            ..Panel::new(format!("beta {}", fmt_num(*b)), "DAA step", y)
        })
        .collect();
    Grid::new(3, panels)
}

fn finish(name: &str, base: &str, notes: &[String], grid: &Grid, mut plot: Plot) -> Figure {
    let title = titled(base, notes);
    plot.set_layout(grid.layout(&title).bar_mode(BarMode::Group));
    Figure {
        name: name.to_string(),
        title,
        plot,
    }
}

/// Mass of the four trajectory groups over DAA steps for one objective: one panel per beta,
/// the median over seeds of each group (hover: min and max over seeds).
fn mass_over_steps(
    report: &ToyMdpReport,
    objective: &str,
    groups: &Result<Vec<GroupPoint>>,
) -> Figure {
    let (grid, dropped) = beta_panels(report, "probability mass");
    let mut plot = Plot::new();
    let mut notes = vec![];
    let mut legend = LegendOnce::default();
    let mut n_seeds = 0;
    match groups {
        Err(e) => notes.push(format!("no data: {e:#}")),
        Ok(pts) => {
            for (k, beta) in report
                .config
                .betas
                .iter()
                .take(grid.panels.len())
                .enumerate()
            {
                // step -> group -> masses over seeds
                let mut by: BTreeMap<usize, BTreeMap<&'static str, Vec<f64>>> = BTreeMap::new();
                let mut seeds = std::collections::BTreeSet::new();
                for p in pts
                    .iter()
                    .filter(|p| p.objective == objective && fkey(p.beta) == fkey(*beta))
                {
                    seeds.insert(p.seed);
                    by.entry(p.step)
                        .or_default()
                        .entry(p.group.name())
                        .or_default()
                        .push(p.mass);
                }
                n_seeds = n_seeds.max(seeds.len());
                if by.is_empty() {
                    notes.push(format!("no steps logged at beta {}", fmt_num(*beta)));
                    continue;
                }
                for g in Group::ALL {
                    let rows: Vec<(usize, &Vec<f64>)> = by
                        .iter()
                        .filter_map(|(s, m)| m.get(g.name()).map(|v| (*s, v)))
                        .collect();
                    let x: Vec<f64> = rows.iter().map(|r| r.0 as f64).collect();
                    let y: Vec<f64> = rows.iter().map(|r| median(r.1)).collect();
                    let hover: Vec<String> = rows
                        .iter()
                        .map(|(s, v)| {
                            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            format!(
                                "{objective} beta={} step {s}<br>{}: median {} over {} seeds [min {}, max {}]",
                                fmt_num(*beta),
                                group_label(g),
                                fmt_num(median(v)),
                                v.len(),
                                fmt_num(lo),
                                fmt_num(hi)
                            )
                        })
                        .collect();
                    plot.add_trace(
                        trace(group_label(g), x, y, hover, k)
                            .mode(Mode::Lines)
                            .line(Line::new().color(group_colour(g)).width(2.0))
                            .legend_group(g.name())
                            .show_legend(legend.first(g.name())),
                    );
                }
            }
            if plot.data().is_empty() && notes.is_empty() {
                notes.push(format!("no data: no logged steps for {objective}"));
            }
        }
    }
    if dropped > 0 {
        notes.push(format!("{dropped} betas not shown"));
    }
    finish(
        &format!("toy_mass_{objective}"),
        &format!(
            "Toy MDP: trajectory mass over training, {objective} (median over {n_seeds} seeds)"
        ),
        &notes,
        &grid,
        plot,
    )
}

/// DPO, every seed: OOD mass (solid) and preferred mass (dotted) over steps, per beta.
fn dpo_seeds(report: &ToyMdpReport, groups: &Result<Vec<GroupPoint>>) -> Figure {
    let (grid, dropped) = beta_panels(report, "probability mass");
    let mut plot = Plot::new();
    let mut notes = vec![];
    let mut legend = LegendOnce::default();
    match groups {
        Err(e) => notes.push(format!("no data: {e:#}")),
        Ok(pts) => {
            for (k, beta) in report
                .config
                .betas
                .iter()
                .take(grid.panels.len())
                .enumerate()
            {
                let mut by: BTreeMap<(u64, &'static str), Vec<(usize, f64)>> = BTreeMap::new();
                for p in pts.iter().filter(|p| {
                    p.objective == "dpo"
                        && fkey(p.beta) == fkey(*beta)
                        && matches!(p.group, Group::Ood | Group::Preferred)
                }) {
                    by.entry((p.seed, p.group.name()))
                        .or_default()
                        .push((p.step, p.mass));
                }
                for ((seed, gname), mut v) in by {
                    v.sort_by_key(|p| p.0);
                    let g = group_of_name(gname).unwrap_or(Group::Ood);
                    let dash = if g == Group::Ood {
                        DashType::Solid
                    } else {
                        DashType::Dot
                    };
                    plot.add_trace(
                        trace(
                            group_label(g),
                            v.iter().map(|p| p.0 as f64).collect(),
                            v.iter().map(|p| p.1).collect(),
                            v.iter()
                                .map(|p| {
                                    format!(
                                        "dpo beta={} seed {seed} step {}<br>{}: {}",
                                        fmt_num(*beta),
                                        p.0,
                                        group_label(g),
                                        fmt_num(p.1)
                                    )
                                })
                                .collect(),
                            k,
                        )
                        .mode(Mode::Lines)
                        .line(Line::new().color(group_colour(g)).width(1.2).dash(dash))
                        .opacity(0.75)
                        .legend_group(gname)
                        .show_legend(legend.first(gname)),
                    );
                }
            }
            if plot.data().is_empty() {
                notes.push("no data: no DPO runs logged".into());
            }
        }
    }
    if dropped > 0 {
        notes.push(format!("{dropped} betas not shown"));
    }
    finish(
        "toy_dpo_seeds",
        "Toy MDP: DPO run to run, OOD (solid) and preferred (dotted) mass of every seed",
        &notes,
        &grid,
        plot,
    )
}

/// End of training, every run: OOD and preferred mass against beta, one panel per objective.
fn end_masses(report: &ToyMdpReport) -> Figure {
    let objs = &report.config.objectives;
    let panels: Vec<Panel> = objs
        .iter()
        .map(|o| Panel {
            x_log: true,
            y_range: Some((-0.02, 1.02)),
            ..Panel::new(o.as_str(), "beta", "mass at the end of training")
        })
        .collect();
    let (grid, dropped) = Grid::new(3, panels);
    let mut plot = Plot::new();
    let mut legend = LegendOnce::default();
    for (k, obj) in objs.iter().take(grid.panels.len()).enumerate() {
        let runs: Vec<_> = report
            .runs
            .iter()
            .filter(|r| &r.objective == obj && r.beta > 0.0)
            .collect();
        if runs.is_empty() {
            continue;
        }
        for (g, name) in [
            (Group::Ood, "end OOD mass"),
            (Group::Preferred, "end preferred mass"),
        ] {
            plot.add_trace(
                trace(
                    name,
                    runs.iter().map(|r| r.beta).collect(),
                    runs.iter().map(|r| r.end_mass.get(g)).collect(),
                    runs.iter()
                        .map(|r| {
                            format!(
                                "{} beta={} seed {}<br>end: OOD {} preferred {} third demo {} dispreferred {}<br>SFT OOD {}<br>top OOD {} ({})",
                                r.objective,
                                fmt_num(r.beta),
                                r.seed,
                                fmt_num(r.end_mass.ood),
                                fmt_num(r.end_mass.preferred),
                                fmt_num(r.end_mass.third_demo),
                                fmt_num(r.end_mass.dispreferred),
                                fmt_num(r.sft_mass.ood),
                                r.top_ood,
                                fmt_num(r.top_ood_prob)
                            )
                        })
                        .collect(),
                    k,
                )
                .mode(Mode::Markers)
                .marker(Marker::new().color(group_colour(g)).size(8).opacity(0.7))
                .legend_group(g.name())
                .show_legend(legend.first(g.name())),
            );
        }
    }
    let mut notes = vec![];
    if plot.data().is_empty() {
        notes.push("no data: no runs".into());
    }
    if dropped > 0 {
        notes.push(format!("{dropped} objectives not shown"));
    }
    finish(
        "toy_end_mass",
        "Toy MDP: OOD and preferred mass at the end of training, every run",
        &notes,
        &grid,
        plot,
    )
}

/// Mean end probability of each OOD trajectory (bars), per objective (panel) and beta (colour).
fn ood_trajectories(report: &ToyMdpReport) -> Figure {
    let objs = &report.config.objectives;
    let panels: Vec<Panel> = objs
        .iter()
        .map(|o| Panel::new(o.as_str(), "OOD trajectory", "mean end probability"))
        .collect();
    let (grid, dropped) = Grid::new(1, panels);
    let betas = &report.config.betas;
    let mut plot = Plot::new();
    let mut notes = vec![];
    let mut legend = LegendOnce::default();
    let ood_labels: Vec<String> = all_trajectories()
        .into_iter()
        .filter(|t| t.group() == Group::Ood)
        .map(Trajectory::label)
        .collect();
    let table = match report_file(report, TRAJECTORIES_CSV) {
        Some(p) => read_ood_end(&p),
        None => Err(anyhow::anyhow!("{TRAJECTORIES_CSV} is not in report.files")),
    };
    let mut add = |k: usize, bi: usize, beta: f64, obj: &str, x: Vec<String>, y: Vec<f64>| {
        let (xa, ya) = Grid::axes(k);
        let name = format!("beta {}", fmt_num(beta));
        let hover: Vec<String> = x
            .iter()
            .zip(&y)
            .map(|(t, p)| format!("{obj} beta={} {t}: {}", fmt_num(beta), fmt_num(*p)))
            .collect();
        plot.add_trace(
            Bar::new(x, y)
                .name(name.as_str())
                .x_axis(xa)
                .y_axis(ya)
                .hover_text_array(hover)
                .hover_info(HoverInfo::Text)
                .marker(Marker::new().color(ramp_colour(bi, betas.len())))
                .legend_group(name.as_str())
                .show_legend(legend.first(&name)),
        );
    };
    match &table {
        Ok(t) => {
            for (k, obj) in objs.iter().take(grid.panels.len()).enumerate() {
                for (bi, beta) in betas.iter().enumerate() {
                    let Some((_, m)) = t.get(&(obj.clone(), fkey(*beta))) else {
                        continue;
                    };
                    let y: Vec<f64> = ood_labels
                        .iter()
                        .map(|l| {
                            m.get(l)
                                .map_or(f64::NAN, |v| v.iter().sum::<f64>() / v.len() as f64)
                        })
                        .collect();
                    add(k, bi, *beta, obj, ood_labels.clone(), y);
                }
            }
        }
        Err(e) => {
            notes.push(format!(
                "{e:#}; showing the 3 heaviest OOD trajectories per cell from the report"
            ));
            for (k, obj) in objs.iter().take(grid.panels.len()).enumerate() {
                for (bi, beta) in betas.iter().enumerate() {
                    let Some(c) = report
                        .cells
                        .iter()
                        .find(|c| &c.objective == obj && fkey(c.beta) == fkey(*beta))
                    else {
                        continue;
                    };
                    let x = c
                        .ood_by_trajectory
                        .iter()
                        .map(|t| t.trajectory.label())
                        .collect();
                    let y = c.ood_by_trajectory.iter().map(|t| t.mass).collect();
                    add(k, bi, *beta, obj, x, y);
                }
            }
        }
    }
    if plot.data().is_empty() {
        notes.push("no data: no runs".into());
    }
    if dropped > 0 {
        notes.push(format!("{dropped} objectives not shown"));
    }
    finish(
        "toy_ood_trajectories",
        "Toy MDP: where the OOD mass goes at the end of training (mean over seeds)",
        &notes,
        &grid,
        plot,
    )
}

/// Appendix D: soft value beta * logsumexp(Q / beta) against the hard max of Q (and the best
/// action seen in the data) as beta shrinks, for the report's example state.
fn appendix_d(report: &ToyMdpReport) -> Figure {
    let rows: Vec<_> = report
        .appendix_d
        .example_table
        .iter()
        .filter(|r| r.beta_eval > 0.0 && r.beta_eval.is_finite())
        .collect();
    let panels = vec![Panel {
        x_log: true,
        ..Panel::new(
            report.appendix_d.example.as_str(),
            "beta (evaluation)",
            "value",
        )
    }];
    let (grid, _) = Grid::new(1, panels);
    let mut plot = Plot::new();
    if !rows.is_empty() {
        type Col = (
            &'static str,
            &'static str,
            DashType,
            fn(&crate::toy_mdp::appendix_d::StateValueRow) -> f64,
        );
        let cols: [Col; 3] = [
            (
                "soft value beta*logsumexp(Q/beta)",
                "#2e86ab",
                DashType::Solid,
                |r| r.soft_value,
            ),
            ("hard max_a Q", "#d1495b", DashType::Dash, |r| r.hard_max),
            ("best Q among data actions", "#5c6b73", DashType::Dot, |r| {
                r.max_data_q
            }),
        ];
        for (name, colour, dash, f) in cols {
            plot.add_trace(
                trace(
                    name,
                    rows.iter().map(|r| r.beta_eval).collect(),
                    rows.iter().map(|r| f(r)).collect(),
                    rows.iter()
                        .map(|r| {
                            format!(
                                "{} ({}) beta={}<br>Q = [{}, {}, {}]<br>soft {} max {} soft-max {}<br>argmax a{} ({})",
                                r.state,
                                r.prefix,
                                fmt_num(r.beta_eval),
                                fmt_num(r.q[0]),
                                fmt_num(r.q[1]),
                                fmt_num(r.q[2]),
                                fmt_num(r.soft_value),
                                fmt_num(r.hard_max),
                                fmt_num(r.soft_minus_max),
                                r.argmax_action,
                                if r.argmax_in_data { "in the data" } else { "never in the data" }
                            )
                        })
                        .collect(),
                    0,
                )
                .mode(Mode::LinesMarkers)
                .marker(Marker::new().color(colour))
                .line(Line::new().color(colour).dash(dash)),
            );
        }
    }
    let notes = if rows.is_empty() {
        vec!["no data: no Appendix D table".to_string()]
    } else {
        vec![]
    };
    finish(
        "toy_appendix_d",
        "Appendix D: soft value vs hard max as beta shrinks",
        &notes,
        &grid,
        plot,
    )
}

/// The toy-MDP figures: for each objective the mass of the preferred / dispreferred / third
/// demonstration / OOD trajectories over training (`toy_mass_<objective>`, a panel per beta),
/// every DPO seed (`toy_dpo_seeds`), the end-of-training OOD and preferred mass of every run
/// (`toy_end_mass`), the mean end probability of each OOD trajectory
/// (`toy_ood_trajectories`) and Appendix D's soft-vs-hard max table (`toy_appendix_d`).
pub fn toy_mdp_figures(report: &ToyMdpReport) -> Vec<Figure> {
    let groups = match report_file(report, GROUPS_CSV) {
        Some(p) => read_groups(&p),
        None => Err(anyhow::anyhow!("{GROUPS_CSV} is not in report.files")),
    };
    let mut out: Vec<Figure> = report
        .config
        .objectives
        .iter()
        .map(|o| mass_over_steps(report, o, &groups))
        .collect();
    out.push(dpo_seeds(report, &groups));
    out.push(end_masses(report));
    out.push(ood_trajectories(report));
    out.push(appendix_d(report));
    out
}
