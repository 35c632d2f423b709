//! The paper-scale sweep (`overopt reproduce|sweep|collect --scale paper`) end to end on data
//! the test makes itself: a tiny GPT-NeoX written in the HF layout with a word-level
//! tokenizer, the TL;DR sets as parquet files in a hub cache (read offline), and a loopback
//! server speaking the chat-completions protocol as the judge. A grid of one model, two
//! objectives and one beta runs through the same code as artifact/configs/paper/grid.toml.

mod common;
mod common_tldr;

use common::{LoopbackServer, Reply, output_text};
use common_tldr::*;
use overopt::analysis::table::ResultRow;
use overopt::eval::judge::prompt::flip_for;
use overopt::model::GptNeoXConfig;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const SFT_REPO: &str = "org/tldr-filtered";
const PREF_REPO: &str = "org/comparisons";
const COMMIT: &str = "3333333333333333333333333333333333333333";

/// The TL;DR sets: SFT train 8 rows, validation 4; comparisons train 8, validation 4.
fn build_cache(cache: &Path) {
    let sft = |from: usize, n: usize| {
        sft_df(
            &(from..from + n)
                .map(|i| sft_row(i, 6, 3))
                .collect::<Vec<_>>(),
        )
    };
    put_cached(
        cache,
        SFT_REPO,
        COMMIT,
        "default/train/0000.parquet",
        &parquet_bytes(sft(0, 8)),
    );
    put_cached(
        cache,
        SFT_REPO,
        COMMIT,
        "default/validation/0000.parquet",
        &parquet_bytes(sft(40, 4)),
    );
    let cmp = |from: usize, n: usize| {
        comparisons_df(
            &(from..from + n)
                .map(|i| cmp_row(i, (i % 2) as i32))
                .collect::<Vec<_>>(),
        )
    };
    put_cached(
        cache,
        PREF_REPO,
        COMMIT,
        "comparisons/train/0000.parquet",
        &parquet_bytes(cmp(0, 8)),
    );
    put_cached(
        cache,
        PREF_REPO,
        COMMIT,
        "comparisons/validation/0000.parquet",
        &parquet_bytes(cmp(20, 4)),
    );
}

/// A randomly initialised GPT-NeoX in the HF layout with the word-level tokenizer.
fn write_model(dir: &Path) {
    let tok = word_tok();
    let cfg = GptNeoXConfig::from_json_str(
        &serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
            "vocab_size": tok.vocab_size(), "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 96,
            "rotary_pct": 0.25, "rotary_emb_base": 10000.0, "use_parallel_residual": true,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02,
            "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": false
        })
        .to_string(),
        "test model",
    )
    .unwrap();
    let lm =
        overopt::model::load::fresh(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 7)
            .unwrap();
    overopt::model::load::save_hf(&lm.model, dir).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
}

/// The grid and its run configurations in `dir`, writing under `runs/tiny` (re-rooted to the
/// sweep's --out). `daa_lr` and `eval_seed` are what the tests change.
fn write_configs(dir: &Path, model: &Path, daa_lr: f64, eval_seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let w = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    w(
        "data.toml",
        format!(
            "max_length = 64\nmax_prompt_length = 40\n[sft]\nrepo = \"{SFT_REPO}\"\n[prefs]\nrepo = \"{PREF_REPO}\"\n"
        ),
    );
    let common = "[data]\nmax_length = 64\nmax_prompt_length = 40\n";
    w(
        "sft.toml",
        format!(
            "out_dir = \"runs/tiny/tiny/sft\"\n[model]\nsource = \"{}\"\n{common}train = \"runs/tiny/data/sft-train.jsonl\"\n\
             [train]\nbatch_size = 4\nmicro_batch_size = 2\nseed = 0\ncheckpoints = [1.0]\n[optim]\nlr = 1e-3\nwarmup_steps = 0\n",
            model.display()
        ),
    );
    w(
        "daa.toml",
        format!(
            "out_dir = \"runs/tiny/tiny/dpo/beta-0.1\"\n[model]\nsource = \"runs/tiny/tiny/sft/final\"\n\
             [reference]\nsource = \"runs/tiny/tiny/sft/final\"\n{common}train = \"runs/tiny/data/prefs-train.jsonl\"\n\
             [daa]\nobjective = {{ name = \"dpo\" }}\nbeta = 0.1\nreference_cache = \"runs/tiny/tiny/ref-cache\"\n\
             [train]\nbatch_size = 4\nmicro_batch_size = 4\nseed = 0\ncheckpoints = [0.5, 1.0]\n[optim]\nlr = {daa_lr}\nwarmup_steps = 0\n"
        ),
    );
    w(
        "grid.toml",
        format!(
            "schema = \"overopt-paper-grid/1\"\ndata = \"data.toml\"\nout_root = \"runs/tiny\"\nobjectives = [\"dpo\", \"ipo\"]\n\
             [betas]\ndpo = [0.1]\nipo = [0.1]\n\
             [[models]]\nname = \"tiny\"\nsource = \"{}\"\nparams = 1\nsft = \"sft.toml\"\ndaa = \"daa.toml\"\n\
             [eval]\nprompt_file = \"runs/tiny/data/sft-eval.jsonl\"\nprompts = 3\ntemperature = 1.0\ntop_k = 0\n\
             max_length = 60\nsamples_per_prompt = 2\nseed = {eval_seed}\njudge = \"judge-model\"\nheldout_pairs = 4\nbatch_size = 8\n",
            model.display()
        ),
    );
    dir.join("grid.toml")
}

/// A judge that always prefers summary A, or answers 401 while `deny` is set.
fn judge_server(deny: Arc<AtomicBool>) -> LoopbackServer {
    LoopbackServer::start(move |_, _req| {
        if deny.load(Ordering::SeqCst) {
            return Reply::status(
                401,
                r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#,
            );
        }
        let body = serde_json::json!({
            "model": "judge-model-2024",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Comparison: A is more concise.\nPreferred: A"}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 9},
        });
        Reply::status(200, &body.to_string())
    })
}

struct Env {
    cache: PathBuf,
    base_url: String,
}

fn overopt(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args(args)
        .env("HF_HUB_CACHE", &env.cache)
        .env("HF_HUB_OFFLINE", "1")
        .env("OPENAI_BASE_URL", &env.base_url)
        .env("OPENAI_API_KEY", "sk-test")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn ok(env: &Env, args: &[&str]) -> String {
    let o = overopt(env, args);
    let text = output_text(&o);
    assert!(o.status.success(), "overopt {args:?} failed:\n{text}");
    text
}

fn results(out: &Path, id: &str) -> Vec<ResultRow> {
    let text = std::fs::read_to_string(out.join("results").join(format!("{id}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["rows"].clone()).unwrap()
}

/// The win rate the always-A judge gives a checkpoint: the candidate wins where it was shown
/// as A (not flipped), per prompt averaged over its samples.
fn expected_win(label: &str, prompts: usize, per_prompt: usize) -> f64 {
    let mut total = 0.0;
    for p in 0..prompts {
        let wins = (0..per_prompt)
            .filter(|s| !flip_for(0, &format!("{label}/p{p}/s{s}")))
            .count();
        total += wins as f64 / per_prompt as f64;
    }
    total / prompts as f64
}

#[test]
fn paper_grid_runs_end_to_end_resumes_and_refuses_stale_outputs() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    build_cache(&cache);
    let model = t.path().join("model");
    write_model(&model);
    let deny = Arc::new(AtomicBool::new(false));
    let server = judge_server(deny.clone());
    let env = Env {
        cache,
        base_url: server.base_url(),
    };
    let grid = write_configs(&t.path().join("configs"), &model, 1e-3, 0);
    let out = t.path().join("out");
    let (g, o) = (grid.to_str().unwrap(), out.to_str().unwrap());

    let list = ok(
        &env,
        &["sweep", "--scale", "paper", "--config", g, "--list"],
    );
    let ids: Vec<&str> = list.lines().collect();
    assert_eq!(ids, ["dpo-b0.1-tiny-s0", "ipo-b0.1-tiny-s0"]);

    let text = ok(
        &env,
        &[
            "reproduce",
            "--scale",
            "paper",
            "--config",
            g,
            "--out",
            o,
            "--section",
            "overoptimization",
        ],
    );
    assert!(text.contains("reproduce: 5 result rows"), "{text}");
    // The TL;DR export, the SFT run and its final checkpoint, every DAA checkpoint.
    for f in [
        "data/export.json",
        "data/sft-eval.jsonl",
        "data/prefs-eval.jsonl",
        "tiny/sft/final/model.safetensors",
        "tiny/dpo/beta-0.1/step-000001/model.safetensors",
        "tiny/ipo/beta-0.1/step-000002/model.safetensors",
        "results.parquet",
        "judge/dpo-b0.1-tiny-s0/ck-1.jsonl",
        "judge/dpo-b0.1-tiny-s0/ck-1.summary.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing:\n{text}");
    }
    // The SFT row: the policy is its own reference (KL 0 up to the sampler's and the scorer's
    // float rounding), no DAA metrics.
    let sft = results(&out, "sft-tiny");
    assert_eq!(sft.len(), 1);
    assert_eq!((sft[0].objective.as_str(), sft[0].checkpoint), ("sft", 0.0));
    assert!(sft[0].kl.abs() < 1e-4, "{:?}", sft[0]);
    assert!(sft[0].heldout_loss.is_nan());
    assert_eq!(sft[0].win_rate, expected_win("sft-tiny", 3, 2));
    for id in &ids {
        let rows = results(&out, id);
        assert_eq!(
            rows.iter().map(|r| r.checkpoint).collect::<Vec<_>>(),
            [0.5, 1.0],
            "{id}"
        );
        for r in &rows {
            let label = format!("{id}/ck-{}", r.checkpoint);
            assert_eq!(r.win_rate, expected_win(&label, 3, 2), "{label}");
            assert!(
                r.kl.is_finite() && r.heldout_loss.is_finite() && r.implicit_accuracy.is_finite(),
                "{label}: {r:?}"
            );
            assert_eq!(r.size, "tiny");
        }
    }
    let requests = server.request_count();
    assert!(
        requests > 0 && requests <= 30,
        "{requests} judge requests for 30 comparisons"
    );

    // A second reproduce finds everything done: no judge request, the same table.
    let table = std::fs::read(out.join("results.parquet")).unwrap();
    ok(
        &env,
        &[
            "reproduce",
            "--scale",
            "paper",
            "--config",
            g,
            "--out",
            o,
            "--section",
            "overoptimization",
        ],
    );
    assert_eq!(server.request_count(), requests);
    assert_eq!(std::fs::read(out.join("results.parquet")).unwrap(), table);

    // A lost result file is recomputed from the finished checkpoints, identically, with every
    // verdict from the judge cache.
    let before = results(&out, ids[1]);
    std::fs::remove_file(out.join("results").join(format!("{}.json", ids[1]))).unwrap();
    ok(
        &env,
        &[
            "sweep", "--scale", "paper", "--config", g, "--out", o, "--run", "1",
        ],
    );
    assert_eq!(server.request_count(), requests);
    let again = results(&out, ids[1]);
    assert_eq!(format!("{again:?}"), format!("{before:?}"));
    ok(
        &env,
        &["collect", "--scale", "paper", "--config", g, "--out", o],
    );
    assert_eq!(std::fs::read(out.join("results.parquet")).unwrap(), table);

    // Another learning rate: the finished result is refused, named, and kept.
    write_configs(&t.path().join("configs"), &model, 5e-4, 0);
    let o2 = overopt(
        &env,
        &[
            "sweep", "--scale", "paper", "--config", g, "--out", o, "--run", "0",
        ],
    );
    let e = output_text(&o2);
    assert!(!o2.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "{}.json was made with another configuration",
            ids[0]
        )),
        "{e}"
    );
    // Without the result file, the run's checkpoints are refused, naming the setting.
    std::fs::remove_file(out.join("results").join(format!("{}.json", ids[0]))).unwrap();
    let o3 = overopt(
        &env,
        &[
            "sweep", "--scale", "paper", "--config", g, "--out", o, "--run", "0",
        ],
    );
    let e = output_text(&o3);
    assert!(!o3.status.success() && e.contains("optim.lr"), "{e}");

    // A judge that refuses the key: the evaluation stops with the judge's error and writes no
    // result; the verdicts are kept for inspection.
    write_configs(&t.path().join("configs"), &model, 1e-3, 1);
    std::fs::remove_file(out.join("results").join(format!("{}.json", ids[1]))).unwrap();
    deny.store(true, Ordering::SeqCst);
    let o4 = overopt(
        &env,
        &[
            "sweep", "--scale", "paper", "--config", g, "--out", o, "--run", "1",
        ],
    );
    let e = output_text(&o4);
    assert!(!o4.status.success(), "{e}");
    assert!(
        e.contains("comparisons of ipo-b0.1-tiny-s0/ck-0.5 failed") && e.contains("401"),
        "{e}"
    );
    assert!(
        !out.join("results")
            .join(format!("{}.json", ids[1]))
            .exists()
    );
    assert!(out.join(format!("judge/{}/ck-0.5.jsonl", ids[1])).is_file());
}

#[test]
fn bad_grids_are_refused_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("model");
    let grid = write_configs(&t.path().join("configs"), &model, 1e-3, 0);
    let text = std::fs::read_to_string(&grid).unwrap();
    let env = Env {
        cache: t.path().join("hub"),
        base_url: "http://127.0.0.1:9/v1".into(),
    };
    for (from, to, want) in [
        ("ipo = [0.1]\n", "", "`betas.ipo` is missing"),
        (
            "dpo = [0.1]",
            "dpo = [0.0]",
            "`betas.dpo`: 0 is not a positive number",
        ),
        (
            "prompts = 3",
            "prompts = 0",
            "`eval.prompts` must be at least 1",
        ),
        (
            "schema = \"overopt-paper-grid/1\"",
            "schema = \"x\"",
            "`schema` is \"x\"",
        ),
        (
            "sft = \"sft.toml\"",
            "sft = \"missing.toml\"",
            "missing.toml",
        ),
    ] {
        std::fs::write(&grid, text.replace(from, to)).unwrap();
        let o = overopt(
            &env,
            &[
                "sweep",
                "--scale",
                "paper",
                "--config",
                grid.to_str().unwrap(),
                "--list",
            ],
        );
        let e = output_text(&o);
        assert!(!o.status.success() && e.contains(want), "{want}: {e}");
        assert!(e.contains("grid.toml") || want == "missing.toml", "{e}");
    }
    // No key for OpenAI's API: refused before the data export or any training.
    std::fs::write(&grid, &text).unwrap();
    let out = t.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args([
            "sweep",
            "--scale",
            "paper",
            "--config",
            grid.to_str().unwrap(),
            "--out",
        ])
        .arg(&out)
        .arg("--prepare")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .unwrap();
    let e = output_text(&o);
    assert!(
        !o.status.success() && e.contains("needs an API key: set OPENAI_API_KEY"),
        "{e}"
    );
    assert!(!out.join("data").exists(), "{e}");
}
