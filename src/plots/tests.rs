use super::*;
use crate::analysis::fits::{FitOptions, fit_table};
use crate::analysis::length::length_fits;
use crate::analysis::table::{ResultRow, SampleRow};
use serde_json::Value;

const SIZES: [(&str, u64); 2] = [("small", 1_000), ("large", 9_000)];
const BETAS: [f64; 3] = [0.01, 0.1, 1.0];
const CKS: [f64; 4] = [0.25, 0.5, 0.75, 1.0];

fn row(obj: &str, size: &str, n_params: u64, beta: f64, ck: f64, seed: u64) -> ResultRow {
    let sft = obj == "sft";
    let kl = if sft {
        0.0
    } else {
        4.0 * ck * beta.powf(-0.5) * if size == "small" { 1.5 } else { 1.0 }
    };
    let d: f64 = kl.sqrt();
    let win = 0.3 + 0.2 * d - 0.03 * d * d + 0.01 * seed as f64;
    ResultRow {
        objective: obj.into(),
        beta: if sft { 0.0 } else { beta },
        size: size.into(),
        n_params,
        checkpoint: if sft { 0.0 } else { ck },
        seed,
        kl,
        kl_se: 0.1,
        win_rate: win,
        win_rate_lo: win - 0.03,
        win_rate_hi: win + 0.04,
        mean_length: 20.0 + 3.0 * d,
        heldout_loss: if sft { f64::NAN } else { 0.7 - 0.1 * ck },
        implicit_accuracy: if sft { f64::NAN } else { 0.5 + 0.2 * ck * beta },
        chosen_reward: if sft { f64::NAN } else { 1.2 - d },
        config_hash: "h".into(),
        length_corrected_win_rate: None,
    }
}

/// dpo/ipo/slic x 2 sizes x 3 betas x 4 checkpoints x `seeds`, rdpo for the large size, and
/// an SFT row per size and seed.
fn table(seeds: &[u64]) -> Vec<ResultRow> {
    let mut v = vec![];
    for &seed in seeds {
        for (size, n) in SIZES {
            v.push(row("sft", size, n, 0.0, 0.0, seed));
            for obj in ["dpo", "ipo", "slic"] {
                for b in BETAS {
                    for c in CKS {
                        v.push(row(obj, size, n, b, c, seed));
                    }
                }
            }
            if size == "large" {
                for b in BETAS {
                    for c in CKS {
                        v.push(row("rdpo", size, n, b, c, seed));
                    }
                }
            }
        }
    }
    v
}

fn samples() -> Vec<SampleRow> {
    let mut v = vec![];
    for (size, _) in SIZES {
        for b in BETAS {
            for c in [0.5, 1.0] {
                for l in 1..=6usize {
                    v.push(SampleRow {
                        objective: "dpo".into(),
                        beta: b,
                        size: size.into(),
                        checkpoint: c,
                        seed: 0,
                        log_ratio: 0.1 * l as f64 + ((l * 7) % 3) as f64 * 0.05,
                        length: l,
                    });
                }
            }
        }
    }
    v
}

/// (name, x axis, number of points) of every trace.
fn traces(f: &Figure) -> Vec<(String, String, usize)> {
    let v: Value = serde_json::from_str(&f.plot.to_json()).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("").to_string(),
                t["xaxis"].as_str().unwrap_or("x").to_string(),
                t["x"].as_array().map_or(0, |a| a.len()),
            )
        })
        .collect()
}

fn counts(f: &Figure) -> Vec<usize> {
    traces(f).iter().map(|t| t.2).collect()
}

#[test]
fn numbers_and_names_format() {
    assert_eq!(fmt_num(0.1), "0.1");
    assert_eq!(fmt_num(0.123456), "0.1235");
    assert_eq!(fmt_num(1234.6), "1235");
    assert_eq!(fmt_num(-2.5), "-2.5");
    assert_eq!(fmt_num(1e-5), "1.000e-5");
    assert_eq!(fmt_num(f64::NAN), "");
    assert_eq!(fmt_num(0.0), "0");
    assert_eq!(
        order_sizes_by_name(["large", "2.8b", "small", "70m", "zeta", "1b"].map(String::from)),
        ["70m", "1b", "2.8b", "small", "large", "zeta"]
    );
    assert_eq!(sanitize("a b/c"), "a_b_c");
    assert_eq!(
        escape_html("<a href=\"x\">&'"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
    );
}

#[test]
fn html_embeds_plotly_and_loads_nothing_from_the_network() {
    let f = fig1_end_of_epoch(&table(&[0]));
    let html = f.standalone_html();
    for needle in ["plotly.js v3", "window.Plotly = Plotly", "<!doctype html>"] {
        assert!(html.contains(needle), "standalone page lacks {needle:?}");
    }
    assert!(!html.contains("<script src=\"http"));
    assert!(!html.contains("<script src='http"));
    assert_eq!(html.matches("class=\"plotly-graph-div\"").count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let p = f.write_html(dir.path()).unwrap();
    assert_eq!(p, dir.path().join("fig1_end_of_epoch.html"));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), html);

    let nb = f.notebook_html();
    assert!(nb.contains("plotly.js v3") && nb.contains("window.Plotly = Plotly"));
    assert!(!nb.contains("<script src=\"http"));
    assert_eq!(nb.matches("class=\"plotly-graph-div\"").count(), 1);
    assert_eq!(nb.matches("<script").count(), 2, "plotly.js and the plot");
    assert!(
        nb.find("window.Plotly = Plotly").unwrap() < nb.find("Plotly.newPlot(\"overopt-").unwrap()
    );
    let id = |s: &str| {
        let i = s.find("<div id=\"").unwrap() + 9;
        s[i..i + s[i..].find('"').unwrap()].to_string()
    };
    assert_ne!(
        id(&nb),
        id(&f.notebook_html()),
        "div ids must be unique per call"
    );
    assert!(nb.contains(&format!("Plotly.newPlot(\"{}\"", id(&nb))));
}

#[test]
fn a_title_cannot_break_out_of_the_script() {
    let mut f = fig5_likelihood(&[]);
    f.plot
        .set_layout(plotly::Layout::new().title("</script><script>alert(1)</script>"));
    f.title = "</title><b>".into();
    let html = f.standalone_html();
    assert!(!html.contains("<script>alert(1)"));
    assert!(html.contains("<title>&lt;/title&gt;&lt;b&gt;</title>"));
}

#[test]
fn fig1_has_one_point_per_beta_plus_sft() {
    let rows = table(&[0, 1]);
    let f = fig1_end_of_epoch(&rows);
    let t = traces(&f);
    assert_eq!(t.len(), 3 * 2, "{t:?}");
    assert!(t.iter().all(|t| t.2 == BETAS.len() + 1), "{t:?}");
    let axes: Vec<&str> = t.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(axes, ["x", "x", "x2", "x2", "x3", "x3"]);
    assert_eq!(t[0].0, "small", "smallest model first");
    assert_eq!(
        f.title, "Fig. 1 (top): win rate vs sqrt(KL) at the end of the epoch",
        "no notes expected"
    );
    // error bars: seeds combined, symmetric
    let v: Value = serde_json::from_str(&f.plot.to_json()).unwrap();
    let e = &v["data"][0]["error_y"];
    assert_eq!(e["type"], "data");
    assert_eq!(e["array"].as_array().unwrap().len(), BETAS.len() + 1);
    // SFT at sqrt(KL) = 0, first after sorting by d
    assert_eq!(v["data"][0]["x"][0].as_f64(), Some(0.0));

    let f = fig1_checkpoints(&rows);
    assert_eq!(counts(&f), vec![BETAS.len() * CKS.len() + 1; 6]);
}

#[test]
fn fig2_has_a_line_per_beta_in_two_rows() {
    let rows = table(&[0]);
    let f = fig2_intra_epoch(&rows, "small");
    assert_eq!(f.name, "fig2_intra_epoch_small");
    let t = traces(&f);
    assert_eq!(t.len(), 3 * BETAS.len() * 2);
    assert!(t.iter().all(|t| t.2 == CKS.len() + 1), "{t:?}");
    let mut axes: Vec<&str> = t.iter().map(|t| t.1.as_str()).collect();
    axes.sort();
    axes.dedup();
    assert_eq!(axes, ["x", "x2", "x3", "x4", "x5", "x6"]);
    let f = fig2_intra_epoch(&rows, "absent");
    assert_eq!(f.n_traces(), 0);
    assert!(f.title.contains("no data"), "{}", f.title);
}

#[test]
fn fit_overlays_draw_points_and_three_curves_per_group() {
    let rows = table(&[0]);
    let fits = fit_table(
        &rows,
        None,
        &FitOptions {
            n_boot: 0,
            ..Default::default()
        },
    );
    let f = fit_overlays(&rows, &fits);
    let t = traces(&f);
    let data: Vec<_> = t.iter().filter(|t| t.0.ends_with(" data")).collect();
    let curves: Vec<_> = t.iter().filter(|t| t.0.contains("RMSE")).collect();
    // dpo, ipo, slic x 2 sizes + rdpo x large
    assert_eq!(data.len(), 7, "{t:?}");
    assert!(data.iter().all(|t| t.2 == BETAS.len() * CKS.len()));
    assert_eq!(curves.len(), 3 * 7, "{t:?}");
    assert!(curves.iter().all(|t| t.2 == 101));
    assert!(t.iter().any(|t| t.1 == "x4"), "rdpo gets its own panel");
    let f = fit_overlays(&rows, &[]);
    assert_eq!(f.n_traces(), 7);
    assert!(f.title.contains("no fitted curves"));
}

#[test]
fn fig3_compares_dpo_and_rdpo() {
    let mut rows = table(&[0]);
    let f = fig3_rdpo(&rows, "large");
    assert_eq!(counts(&f), vec![BETAS.len() + 1; 4], "{:?}", traces(&f));
    assert!(f.title.contains("no length-corrected"));
    for r in rows.iter_mut().filter(|r| r.objective == "rdpo") {
        r.length_corrected_win_rate = Some(0.5);
    }
    let f = fig3_rdpo(&rows, "large");
    let t = traces(&f);
    assert_eq!(t.len(), 5);
    assert!(
        t.iter()
            .any(|t| t.0 == "R-DPO length-corrected" && t.2 == BETAS.len())
    );
    let f = fig3_rdpo(&rows, "small");
    assert!(f.title.contains("no rdpo rows"), "{}", f.title);
    assert_eq!(f.n_traces(), 2);

    let lf = length_fits(&samples());
    let f = fig3_length_r2(&lf);
    let t = traces(&f);
    assert_eq!(t.len(), 2 * 2, "{t:?}");
    assert!(t.iter().all(|t| t.2 == BETAS.len()));
    assert_eq!(t[0].0, "small dpo", "small before large by name");
    let f = fig3_length_r2_ordered(&lf, &["large".into(), "small".into()]);
    assert_eq!(traces(&f)[0].0, "large dpo");
    let v: Value = serde_json::from_str(&f.plot.to_json()).unwrap();
    assert_eq!(v["layout"]["xaxis"]["type"], "log");
}

#[test]
fn fig4_and_fig5_plot_every_row() {
    let rows = table(&[0]);
    let per = BETAS.len() * CKS.len();
    let f = fig4_metrics(&rows);
    assert_eq!(counts(&f), vec![per; 2 * 3 * 2]);
    let f = fig5_likelihood(&rows);
    assert_eq!(counts(&f), vec![per + 1; 3 * 2]);
    assert!(
        f.title.contains("drawn at -sqrt(r)"),
        "rows with d < 1.2 have r > 0"
    );
    // Without beta: the same points, each x the implicit reward's root over sqrt(beta).
    let g = fig5_likelihood_without_beta(&rows);
    assert_eq!(counts(&g), counts(&f));
    assert!(g.title.contains("without beta"), "{}", g.title);
    let r = rows
        .iter()
        .find(|r| !r.is_sft() && r.chosen_reward < 0.0 && r.beta != 1.0)
        .unwrap();
    let (want_f, want_g) = (
        (-r.chosen_reward).sqrt(),
        (-r.chosen_reward / r.beta).sqrt(),
    );
    let xs = |fig: &Figure| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_str(&fig.plot.to_json()).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["x"].as_array().unwrap().iter().filter_map(|x| x.as_f64()))
            .collect()
    };
    assert!(xs(&f).iter().any(|x| (x - want_f).abs() < 1e-12));
    assert!(xs(&g).iter().any(|x| (x - want_g).abs() < 1e-12));
}

#[test]
fn builders_survive_empty_and_nan_tables() {
    let mut nan = table(&[0]);
    for r in &mut nan {
        r.kl = f64::NAN;
        r.win_rate = f64::NAN;
        r.implicit_accuracy = f64::NAN;
        r.heldout_loss = f64::NAN;
        r.chosen_reward = f64::NAN;
        r.mean_length = f64::NAN;
    }
    let nan_samples: Vec<SampleRow> = samples()
        .into_iter()
        .map(|s| SampleRow {
            log_ratio: f64::NAN,
            ..s
        })
        .collect();
    for rows in [vec![], nan] {
        let fits = fit_table(
            &rows,
            None,
            &FitOptions {
                n_boot: 0,
                ..Default::default()
            },
        );
        let figs = [
            fig1_end_of_epoch(&rows),
            fig1_checkpoints(&rows),
            fig2_intra_epoch(&rows, "small"),
            fit_overlays(&rows, &fits),
            fig3_rdpo(&rows, "large"),
            fig3_length_r2(&[]),
            fig3_length_r2(&length_fits(&nan_samples)),
            fig4_metrics(&rows),
            fig5_likelihood(&rows),
        ];
        for f in &figs {
            assert_eq!(f.n_traces(), 0, "{}: {:?}", f.name, traces(f));
            assert!(f.title.contains("no data"), "{}: {}", f.name, f.title);
            let v: Value = serde_json::from_str(&f.plot.to_json()).unwrap();
            assert!(
                v["layout"]["xaxis"].is_object(),
                "{} keeps its axes",
                f.name
            );
            assert!(f.notebook_html().contains("plotly-graph-div"));
        }
    }
}

#[test]
fn tables_render_escape_and_quote() {
    let rows = table(&[0]);
    let t = Table::from_results(&rows);
    assert_eq!(t.rows.len(), rows.len());
    assert!(t.rows.iter().all(|r| r.len() == t.columns.len()));
    let fits = fit_table(
        &rows,
        None,
        &FitOptions {
            n_boot: 20,
            ..Default::default()
        },
    );
    let tf = Table::from_fits(&fits);
    assert!(
        tf.rows
            .iter()
            .any(|r| r[2] == "log_d" && r[4].starts_with("alpha="))
    );
    assert!(tf.to_csv().is_ok());
    let tl = Table::from_length(&length_fits(&samples()));
    assert_eq!(tl.rows.len(), 2 * 3 * 2);
    let v = crate::analysis::claims::evaluate_all(&rows, &samples(), &[]);
    let tc = Table::from_claims(&v);
    assert_eq!(tc.rows.len(), 9);
    assert_eq!(tc.rows[8][0], "C9");

    let t = Table {
        name: "x<y".into(),
        columns: vec!["a".into(), "b,c".into()],
        rows: vec![vec!["<script>".into(), "say \"hi\"\nthere".into()]],
    };
    let html = t.to_html();
    assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
    assert!(html.contains("<caption") && html.contains("x&lt;y"));
    assert_eq!(
        t.to_csv().unwrap(),
        "a,\"b,c\"\n<script>,\"say \"\"hi\"\"\nthere\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.csv");
    t.write_csv(&p).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), t.to_csv().unwrap());
    let bad = Table {
        rows: vec![vec!["1".into()]],
        ..t
    };
    let e = bad.to_csv().unwrap_err().to_string();
    assert!(e.contains("row 0 has 1 cells"), "{e}");
}

fn tiny_toy(dir: &std::path::Path) -> crate::toy_mdp::ToyMdpReport {
    use crate::toy_mdp::{DaaConfig, SftConfig, ToyMdpConfig, run_section};
    let cfg = ToyMdpConfig {
        seeds: vec![0, 1],
        objectives: vec!["dpo".into(), "ipo".into(), "slic".into()],
        betas: vec![0.1, 0.5],
        sft: SftConfig {
            steps: 5,
            ..SftConfig::default()
        },
        daa: DaaConfig {
            steps: 4,
            ..DaaConfig::default()
        },
        log_every: 2,
        ..ToyMdpConfig::default()
    };
    run_section(&cfg, dir).unwrap()
}

#[test]
fn toy_figures_summaries_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let toy = tiny_toy(&dir.path().join("toy"));
    let figs = toy_mdp_figures(&toy);
    let names: Vec<&str> = figs.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "toy_mass_dpo",
            "toy_mass_ipo",
            "toy_mass_slic",
            "toy_dpo_seeds",
            "toy_end_mass",
            "toy_ood_trajectories",
            "toy_appendix_d"
        ]
    );
    // steps 0, 2, 4 logged; 4 groups per beta panel
    assert_eq!(counts(&figs[0]), vec![3; 2 * 4], "{:?}", traces(&figs[0]));
    // 2 seeds x (OOD, preferred) per beta
    assert_eq!(counts(&figs[3]), vec![3; 2 * 2 * 2]);
    // OOD and preferred per objective, one point per run (2 betas x 2 seeds)
    assert_eq!(counts(&figs[4]), vec![4; 3 * 2]);
    // 24 OOD trajectories per objective x beta
    assert_eq!(counts(&figs[5]), vec![24; 3 * 2]);
    assert_eq!(counts(&figs[6]), vec![toy.config.appendix_d_betas.len(); 3]);
    for f in &figs {
        assert!(!f.title.contains("no data"), "{}: {}", f.name, f.title);
    }

    // Without the CSV tables the step figures are empty and say so; the OOD bars fall back
    // on the report's three heaviest trajectories per cell.
    let mut bare = toy.clone();
    bare.files.clear();
    let figs = toy_mdp_figures(&bare);
    assert_eq!(figs[0].n_traces(), 0);
    assert!(figs[0].title.contains("no data"), "{}", figs[0].title);
    assert_eq!(counts(&figs[5]), vec![3; 3 * 2]);
    assert_eq!(figs[4].n_traces(), 6);

    let s = toy_summaries(&toy);
    assert_eq!(s.len(), toy.runs.len());
    let t = &s[0];
    assert_eq!(t.top_ood_trajectory.split(',').count(), 3);
    assert!(t.top_ood_trajectory.starts_with('a'));
    assert_eq!(t.sft_ood_mass, Some(toy.runs[0].sft_mass.ood));

    // The whole report.
    let out = dir.path().join("report");
    let rows = table(&[0]);
    let rep = write_report(&out, &rows, &samples(), Some(&toy)).unwrap();
    for f in ["fits.csv", "length.csv", "metrics.csv", "claims.json"] {
        assert!(rep.files.contains(&out.join(f)), "{f} not listed");
        assert!(out.join(f).is_file(), "{f} not written");
    }
    let mut want: Vec<String> = [
        "fig1_end_of_epoch",
        "fig1_checkpoints",
        "fig2_intra_epoch_small",
        "fig2_intra_epoch_large",
        "fit_overlays",
        "fig3_rdpo_large",
        "fig3_length_r2",
        "fig4_metrics",
        "fig5_likelihood",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.extend(names.iter().map(|s| s.to_string()));
    let got: Vec<String> = rep
        .figures
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(got, want);
    for p in &rep.figures {
        assert!(p.starts_with(out.join("figures")) && p.is_file());
    }
    let claims: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("claims.json")).unwrap()).unwrap();
    let keys: Vec<&String> = claims.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        (1..=9)
            .map(|i| format!("C{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(rep.verdicts.len(), 9);
    assert!(
        !rep.verdicts[8].summary.contains("no toy-MDP rows"),
        "C9 must see the toy runs: {}",
        rep.verdicts[8].summary
    );
    let fits_csv = std::fs::read_to_string(out.join("fits.csv")).unwrap();
    assert!(fits_csv.starts_with("objective,size,form,"));
    assert!(fits_csv.contains("\ndpo,small,log_d,"));
}

#[test]
fn report_on_an_empty_table_still_writes_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let rep = write_report(dir.path(), &[], &[], None).unwrap();
    let names: Vec<String> = rep
        .figures
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(
        names.contains(&"fig2_intra_epoch.html".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"fig3_rdpo.html".to_string()), "{names:?}");
    assert_eq!(rep.files.len(), rep.figures.len() + 4);
    assert!(rep.files.iter().all(|p| p.is_file()));
    assert!(
        rep.verdicts
            .iter()
            .all(|v| v.verdict == crate::analysis::claims::VerdictKind::NotEvaluated)
    );
}

/// Render a figure in headless Chromium and look for plotly's SVG. Skipped (with a message)
/// when no Chromium binary is found (Debian package `chromium`); set CHROMIUM to its path to
/// choose one.
#[test]
fn figure_renders_in_headless_chromium() {
    let candidates = ["chromium", "chromium-browser", "google-chrome"];
    let bin = std::env::var("CHROMIUM").ok().or_else(|| {
        candidates
            .iter()
            .find(|c| {
                std::process::Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|c| c.to_string())
    });
    let Some(bin) = bin else {
        eprintln!(
            "SKIPPED figure_renders_in_headless_chromium: no chromium binary on PATH \
             (apt-get install chromium, or set CHROMIUM)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = fig1_end_of_epoch(&table(&[0]));
    let page = f.write_html(dir.path()).unwrap();
    let nb = dir.path().join("notebook.html");
    std::fs::write(
        &nb,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"></head><body>{}</body></html>",
            f.notebook_html()
        ),
    )
    .unwrap();
    // 6 traces (3 objectives x 2 sizes) of 3 betas + the SFT point
    let want_points = 6 * (BETAS.len() + 1);
    for p in [&page, &nb] {
        let profile = tempfile::tempdir().unwrap();
        let dump = dir.path().join("dom.html");
        let mut child = std::process::Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(format!("file://{}", p.display()))
            .stdout(std::fs::File::create(&dump).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                panic!("{bin} did not finish rendering {} in 120 s", p.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        // Drop script bodies: plotly.js itself mentions its class names.
        let raw = std::fs::read_to_string(&dump).unwrap();
        let mut dom = String::new();
        let mut rest = raw.as_str();
        while let Some(i) = rest.find("<script") {
            dom.push_str(&rest[..i]);
            rest = match rest[i..].find("</script>") {
                Some(j) => &rest[i + j + "</script>".len()..],
                None => "",
            };
        }
        dom.push_str(rest);
        assert!(
            dom.contains("<svg class=\"main-svg\""),
            "{}: no plotly svg in the rendered DOM (chromium exit {status:?}, {} bytes dumped)",
            p.display(),
            raw.len()
        );
        assert_eq!(
            dom.matches("class=\"point\"").count(),
            want_points,
            "{}: markers drawn",
            p.display()
        );
    }
}
