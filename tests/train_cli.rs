//! `overopt sft` and `overopt daa` end to end on the tiny HF fixture model.

use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt_neox")
        .join(name)
        .display()
        .to_string()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sft_then_dpo_from_toml_configs() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let mut sft = String::new();
    let mut pref = String::new();
    for i in 0..16 {
        let a = 3 + i % 7;
        sft.push_str(&format!(
            "{{\"prompt\": \"w{a} w{} w{}\", \"response\": \"w{} w{}\"}}\n",
            a + 1,
            a + 2,
            100 + a,
            101 + a
        ));
        pref.push_str(&format!(
            "{{\"prompt\": \"w{a} w{}\", \"chosen\": \"w{}\", \"rejected\": \"w{} w{} w{}\"}}\n",
            a + 1,
            100 + a,
            200 + a,
            201 + a,
            202 + a
        ));
    }
    std::fs::write(p.join("sft.jsonl"), sft).unwrap();
    std::fs::write(p.join("pref.jsonl"), pref).unwrap();
    let sft_cfg = format!(
        "out_dir = \"{o}/sft\"\n[model]\nsource = \"{m}\"\n[data]\ntrain = \"{o}/sft.jsonl\"\n[train]\nbatch_size = 4\nmicro_batch_size = 2\nlog_every = 1\n[optim]\nlr = 1e-3\nwarmup_steps = 1\n",
        o = p.display(),
        m = fixture("parallel")
    );
    std::fs::write(p.join("sft.toml"), &sft_cfg).unwrap();
    let o = run(&["sft", "--config", p.join("sft.toml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("sft: step 4/4"), "{stdout}");
    let last = p.join("sft/step-000004");
    assert!(last.join("model.safetensors").is_file() && last.join("tokenizer.json").is_file());
    // DPO from the SFT checkpoint.
    let daa_cfg = format!(
        "out_dir = \"{o}/dpo\"\n[model]\nsource = \"{m}\"\n[data]\ntrain = \"{o}/pref.jsonl\"\n[train]\nbatch_size = 4\nmicro_batch_size = 4\n[optim]\nlr = 1e-3\nwarmup_steps = 0\n[daa]\nobjective = {{ name = \"dpo\" }}\nbeta = 0.1\n",
        o = p.display(),
        m = last.display()
    );
    std::fs::write(p.join("dpo.toml"), &daa_cfg).unwrap();
    let o = run(&["daa", "--config", p.join("dpo.toml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(p.join("dpo/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for k in [
        "loss",
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margin",
        "rewards_accuracy",
        "logps_chosen",
        "logps_rejected",
        "grad_norm",
        "lr",
        "examples_per_s",
    ] {
        assert!(first.get(k).is_some(), "metric {k} missing: {first}");
    }
    // At step 1 the policy is the reference: DPO loss ln 2.
    assert!((first["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-4);
    // The reference log-probs were cached beside the run.
    assert_eq!(std::fs::read_dir(p.join("ref-cache")).unwrap().count(), 1);
    // The same run with bf16 autocast and activation checkpointing (candle's graph, each layer
    // recomputed in the backward pass): it trains, from the same start.
    let ckpt_cfg = daa_cfg.replace("/dpo\"", "/dpo-ckpt\"").replace(
        "[data]",
        "autocast = \"bf16\"\ncheckpoint_layers = true\n[data]",
    );
    std::fs::write(p.join("dpo-ckpt.toml"), &ckpt_cfg).unwrap();
    let o = run(&["daa", "--config", p.join("dpo-ckpt.toml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(p.join("dpo-ckpt/metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let loss0 = steps[0]["loss"].as_f64().unwrap();
    assert!(
        (loss0 - 2f64.ln()).abs() < 2e-2,
        "bf16 policy vs bf16 reference: {loss0}"
    );
    // The reference (a copy of the policy, autocast included) computed its bf16 log-probs:
    // the f32 entry of the first run is not reused.
    assert_eq!(std::fs::read_dir(p.join("ref-cache")).unwrap().count(), 2);
    assert!(
        steps.iter().all(|m| m["grad_norm"].as_f64().unwrap() > 0.0),
        "{log}"
    );
    // Without checkpointing, autocast takes the layer nodes (one graph node per layer, the
    // parameters' gradients handed aside to `GptNeoX::backward`), here over two micro-batches
    // per step: the same first step as the checkpointed graph, up to bf16 rounding.
    let nodes_cfg = daa_cfg
        .replace("/dpo\"", "/dpo-nodes\"")
        .replace("micro_batch_size = 4", "micro_batch_size = 2")
        .replace("[data]", "autocast = \"bf16\"\n[data]");
    std::fs::write(p.join("dpo-nodes.toml"), &nodes_cfg).unwrap();
    let o = run(&[
        "daa",
        "--config",
        p.join("dpo-nodes.toml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(p.join("dpo-nodes/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let (gn, gn_ckpt) = (
        first["grad_norm"].as_f64().unwrap(),
        steps[0]["grad_norm"].as_f64().unwrap(),
    );
    assert!(
        (gn - gn_ckpt).abs() <= 2e-2 * gn_ckpt && gn > 0.0,
        "layer nodes {gn} vs checkpointed {gn_ckpt}: {log}"
    );
    assert!(
        (first["loss"].as_f64().unwrap() - loss0).abs() < 2e-2,
        "{log}"
    );
    // An unknown key is named.
    std::fs::write(
        p.join("bad.toml"),
        daa_cfg.replace("beta = 0.1", "beta = 0.1\nbeta2 = 3"),
    )
    .unwrap();
    let o = run(&["daa", "--config", p.join("bad.toml").to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unknown field `beta2`") && e.contains("bad.toml"),
        "{e}"
    );
}

/// Bad records stop `overopt sft` and `overopt daa` before any training step, named by the
/// data file's physical line (blank lines counted) and the key; too few records stop them
/// before the model is loaded, naming the data file.
#[test]
fn bad_training_data_is_named_by_file_and_line_before_training() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let config = |name: &str, data: &str, model: &str, extra: &str| {
        let text = format!(
            "out_dir = \"{o}/{name}\"\n[model]\nsource = \"{model}\"\n[data]\ntrain = \"{o}/{data}\"\n[train]\nbatch_size = 4\nmicro_batch_size = 2\n[optim]\nlr = 1e-3\nwarmup_steps = 0\n{extra}",
            o = p.display()
        );
        let f = p.join(format!("{name}.toml"));
        std::fs::write(&f, text).unwrap();
        f
    };
    let stderr = |o: &std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // SFT: 40 lines, blanks at 3 and 7, an empty prompt at line 30 (the 28th record), drawn
    // only after several checkpoints in the old order of events.
    let mut sft = String::new();
    for i in 1..=40 {
        sft.push_str(&match i {
            3 | 7 => "\n".to_string(),
            30 => "{\"prompt\": \"\", \"response\": \"w5 w6\"}\n".to_string(),
            _ => format!(
                "{{\"prompt\": \"w{} w4\", \"response\": \"w5 w6\"}}\n",
                3 + i % 5
            ),
        });
    }
    std::fs::write(p.join("sft.jsonl"), &sft).unwrap();
    let c = config("sft", "sft.jsonl", &fixture("parallel"), "");
    let e = stderr(&run(&["sft", "--config", c.to_str().unwrap()]));
    let data = p.join("sft.jsonl");
    assert!(
        e.contains(&format!("{}: line 30: `prompt` is empty", data.display())),
        "{e}"
    );
    assert!(
        !p.join("sft").exists(),
        "nothing is written before the data is checked"
    );
    // An empty data file: named, before the model (here: none at all) is loaded.
    std::fs::write(p.join("empty.jsonl"), "\n\n").unwrap();
    let c = config("empty", "empty.jsonl", "/no/such/model", "");
    let e = stderr(&run(&["sft", "--config", c.to_str().unwrap()]));
    assert!(
        e.contains(&format!(
            "{}: 0 records (non-blank lines) make no full batch of 4",
            p.join("empty.jsonl").display()
        )),
        "{e}"
    );
    // DAA: an empty rejected response on line 6, after a blank line; no reference pass ran.
    let mut pref = String::new();
    for i in 1..=9 {
        pref.push_str(&match i {
            2 => "\n".to_string(),
            6 => "{\"prompt\": \"w3\", \"chosen\": \"w4\", \"rejected\": \"\"}\n".to_string(),
            _ => "{\"prompt\": \"w3\", \"chosen\": \"w4\", \"rejected\": \"w5\"}\n".to_string(),
        });
    }
    std::fs::write(p.join("pref.jsonl"), &pref).unwrap();
    let c = config(
        "dpo",
        "pref.jsonl",
        &fixture("parallel"),
        "[daa]\nobjective = { name = \"dpo\" }\nbeta = 0.1\n",
    );
    let e = stderr(&run(&["daa", "--config", c.to_str().unwrap()]));
    assert!(
        e.contains(&format!(
            "{}: line 6: `rejected` is empty",
            p.join("pref.jsonl").display()
        )),
        "{e}"
    );
    assert!(!p.join("dpo").exists() && !p.join("ref-cache").exists());
}

/// The P3 benchmark binary's CPU mode: one DPO step of a tiny model on each training op path
/// (on the CPU the recomputing ops only with `--op-path recompute`, layer nodes with `layer` and
/// under autocast) and with activation
/// checkpointing, with the memory the forward pass left for the backward counted by its
/// allocator; its `--components` timings; its `--profile` sections; its `--parity` check; an unknown op path or CUDA
/// allocation mode is a usage error (status 1) naming it.
#[test]
fn gpu_bench_runs_a_tiny_step_on_every_op_path() {
    let bench = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_overopt-gpu-bench"))
            .arg("--tiny")
            .args(args)
            .output()
            .unwrap()
    };
    // Its standard output, after checking that it succeeded.
    let bench_ok = |args: &[&str]| -> String {
        let o = bench(args);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {out}{err}");
        out
    };
    // A usage error (status 1) whose message contains `msg`.
    let usage_error = |args: &[&str], msg: &str| {
        let o = bench(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    };
    let mut kept = Vec::new();
    for (path, ckpt) in [
        ("differentiable", false),
        ("recompute", false),
        ("composite", false),
        ("differentiable", true),
        ("layer", false),
    ] {
        let args = ["--op-path", path, "--checkpoint"];
        let out = bench_ok(&args[..if ckpt { 3 } else { 2 }]);
        let result = out.lines().find(|l| l.starts_with("RESULT ")).unwrap();
        assert!(
            result.contains("ok=1") && result.contains(&format!(" op_path={path} ")),
            "{result}"
        );
        let field = |k: &str| -> f64 {
            let v = result
                .split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")));
            v.unwrap_or_else(|| panic!("{k} missing: {result}"))
                .parse()
                .unwrap()
        };
        assert!(
            field("loss").is_finite() && field("step_s") > 0.0,
            "{result}"
        );
        kept.push(field("graph_gib"));
        // On the CPU the allocator also counts the step's buffers.
        assert!(
            field("buffers") > 0.0 && field("buffer_gib") > 0.0,
            "{result}"
        );
    }
    // The composite graph keeps every intermediate; the recomputing ops keep less.
    assert!(kept.iter().all(|&k| k > 0.0), "{kept:?}");
    assert!(
        kept[1] < kept[2],
        "recompute {} vs composite {}",
        kept[1],
        kept[2]
    );
    // Layer nodes keep less than a node per recomputing op.
    assert!(
        kept[4] < kept[1],
        "layer nodes {} vs recompute {}",
        kept[4],
        kept[1]
    );
    assert!(
        kept[3] < kept[0],
        "checkpointing {} vs not {}",
        kept[3],
        kept[0]
    );
    // The step's parts, one by one.
    let out = bench_ok(&["--components"]);
    let parts: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("COMPONENT impl=overopt "))
        .collect();
    assert_eq!(parts.len(), 7, "{out}");
    for l in parts {
        let ms: f64 = l
            .split(' ')
            .find_map(|kv| kv.strip_prefix("ms="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(ms > 0.0, "{l}");
    }
    // Each phase's buffers by size, largest total first.
    let out = bench_ok(&["--op-path", "layer", "--buffer-sizes"]);
    for phase in ["fwd", "bwd", "optim"] {
        let line = out
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("buffer sizes ({phase}): "))
            })
            .unwrap_or_else(|| panic!("no {phase} sizes: {out}"));
        let first = line.split(": ").nth(1).unwrap().split(',').next().unwrap();
        let (n, mb) = first.trim().split_once(" x ").unwrap();
        assert!(n.parse::<usize>().unwrap() > 0, "{line}");
        assert!(
            mb.trim_end_matches(" MB").parse::<f64>().unwrap() >= 0.065,
            "{line}"
        );
    }
    // Named sections of the step, on the ops of the CUDA step (layer nodes, the recomputing
    // log-probs).
    let out = bench_ok(&["--op-path", "layer", "--profile"]);
    let sections: Vec<(String, f64, f64)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("PROFILE impl=overopt "))
        .map(|l| {
            let get = |k: &str| {
                l.split(' ')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .unwrap_or_else(|| panic!("{k} missing: {l}"))
                    .to_string()
            };
            let num = |k: &str| get(k).parse::<f64>().unwrap();
            (get("name"), num("ms_per_step"), num("calls_per_step"))
        })
        .collect();
    let find = |n: &str| {
        sections
            .iter()
            .find(|s| s.0 == n)
            .unwrap_or_else(|| panic!("no section {n}: {out}"))
    };
    // Four linear layers per layer, two layer norms, one attention per layer (tiny: 2 layers).
    assert_eq!(find("fwd.layer.linear").2, 8.0, "{out}");
    assert_eq!(find("bwd.layer.linear").2, 8.0, "{out}");
    assert_eq!(find("fwd.layer.layer_norm").2, 4.0, "{out}");
    assert_eq!(find("bwd.layer.attention").2, 2.0, "{out}");
    for n in [
        "fwd.layer.attention",
        "fwd.head",
        "fwd.logps",
        "fwd.other",
        "bwd.logps",
        "bwd.layer.layer_norm_grad",
        "bwd.other",
        "optim.grad_norm",
        "optim.update",
    ] {
        assert!(find(n).2 >= 1.0, "{n}: {out}");
    }
    // Each phase's total is the sum of its sections, the step's the sum of the phases', and no
    // more than the profiled step took.
    let sum = |prefix: &str| -> f64 {
        sections
            .iter()
            .filter(|s| s.0.starts_with(prefix) && !s.0.ends_with("_total"))
            .map(|s| s.1)
            .sum()
    };
    for phase in ["fwd", "bwd", "optim"] {
        let total = find(&format!("{phase}_total")).1;
        assert!(
            (total - sum(&format!("{phase}."))).abs() < 0.01,
            "{phase}: {out}"
        );
    }
    let total = find("step_total").1;
    assert!((total - sum("")).abs() < 0.01 && total > 0.0, "{out}");
    let step_ms: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("profiled step "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        total <= step_ms + 0.1,
        "sections {total} ms, step {step_ms} ms: {out}"
    );
    assert!(out.contains(" profile=1\n"), "{out}");
    // On the CPU the sections also count their buffers: together, those of the whole step.
    let field = |line: &str, k: &str| -> f64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing: {line}"))
            .parse()
            .unwrap()
    };
    let result = out.lines().find(|l| l.starts_with("RESULT ")).unwrap();
    let step = out
        .lines()
        .find(|l| l.contains(" name=step_total "))
        .unwrap();
    assert!(
        (field(step, "buffers") - field(result, "buffers")).abs() <= 1.0,
        "{step}\n{result}"
    );
    assert!(field(step, "buffer_mib") > 0.0, "{step}");
    usage_error(&["--op-path", "flash"], "unknown op path \"flash\"");
    // The step's values on every op path, with checkpointing and bf16 autocast, against the
    // CPU f32 composite step (on a GPU machine: the CUDA step against the CPU's).
    let out = bench_ok(&["--parity"]);
    let checks: Vec<&str> = out.lines().filter(|l| l.starts_with("PARITY ")).collect();
    assert_eq!(checks.len(), 11, "{out}");
    assert!(
        checks.iter().any(|l| l.contains(" check=rmsprop steps=2 ")),
        "{out}"
    );
    assert!(checks.iter().all(|l| l.ends_with(" ok=1")), "{out}");
    assert!(
        checks
            .iter()
            .any(|l| l.contains("autocast=bf16 op_path=recompute checkpoint=0")),
        "{out}"
    );
    assert!(
        checks
            .iter()
            .any(|l| l.contains("autocast=off op_path=layer checkpoint=0")),
        "{out}"
    );
    usage_error(
        &["--cuda-alloc", "cached"],
        "unknown CUDA allocation mode \"cached\": expected keep or default",
    );
    // The inference path has no backward pass: refused for a training step.
    usage_error(&["--op-path", "fused"], "no backward pass");
}
