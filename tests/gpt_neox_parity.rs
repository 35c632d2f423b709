//! Parity of the candle GPT-NeoX with HF transformers on tiny random models.
//! Fixtures: tests/fixtures/make_gpt_neox.py (torch 2.15, transformers 5.24).

use candle_core::{DType, Device, IndexOp, Tensor};
use overopt::data::tokenizer::Tok;
use overopt::model::OpPath;
use overopt::model::generate::{SampleConfig, generate};
use overopt::model::gpt_neox::{KvCache, position_ids_from_mask};
use overopt::model::load;
use overopt::model::score::{collate, sequence_logps};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt_neox")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn pairs() -> Vec<(String, String)> {
    std::fs::read_to_string(fixture("pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["response"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The largest |x| of a tensor.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A gpt_neox fixture (HF layout), loaded on the CPU in f32.
fn fixture_model(name: &str) -> load::LoadedModel {
    load::load(
        fixture(name).to_str().unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

const NAMES: [&str; 2] = ["parallel", "sequential"];

/// The op paths of training: on the CPU in f32 the fused kernels, the recomputing ops (those
/// of the CUDA path) and the composite of basic ops; with activation checkpointing (candle's
/// graph, each layer recomputed in the backward pass) or without.
const PATHS: [(OpPath, bool); 4] = [
    (OpPath::Differentiable, false),
    (OpPath::Recompute, false),
    (OpPath::Composite, false),
    (OpPath::Differentiable, true),
];

/// The parallel-residual HF fixture, loaded on the CPU in `dtype`.
fn parallel_fixture(dtype: DType) -> load::LoadedModel {
    load::load(
        fixture("parallel").to_str().unwrap(),
        None,
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn logits_match_hf_on_a_right_padded_batch() {
    for name in NAMES {
        let lm = fixture_model(name);
        let exp = expected(name);
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = exp["attention_mask"].to_dtype(DType::U8).unwrap();
        let logits = lm.model.forward(&ids, Some(&mask), None).unwrap();
        let want = &exp["logits"];
        let m = mask.to_vec2::<u8>().unwrap();
        let mut worst = 0f32;
        for (i, row) in m.iter().enumerate() {
            let n = row.iter().filter(|&&x| x == 1).count();
            let a = logits.i((i, 0..n)).unwrap();
            let b = want.i((i, 0..n)).unwrap();
            worst = worst.max(max_abs_diff(&a, &b));
        }
        assert!(worst < 1e-4, "{name}: max |logit diff| = {worst}");
        // The fused inference path computes the same function.
        let fused = lm.model.inference_copy().unwrap();
        let lf = fused.forward(&ids, Some(&mask), None).unwrap();
        for (i, row) in m.iter().enumerate() {
            let n = row.iter().filter(|&&x| x == 1).count();
            let d = max_abs_diff(&lf.i((i, 0..n)).unwrap(), &logits.i((i, 0..n)).unwrap());
            assert!(
                d < 1e-4,
                "{name}: fused vs differentiable path differ by {d}"
            );
        }
    }
}

fn fixture_batch(name: &str, lm: &load::LoadedModel) -> overopt::model::score::SeqBatch {
    let tok = Tok::from_file(
        &fixture(name).join("tokenizer.json"),
        lm.model.config().eos_token_id,
    )
    .unwrap();
    let ps = pairs();
    let p: Vec<Vec<u32>> = ps.iter().map(|(p, _)| tok.encode(p).unwrap()).collect();
    let r: Vec<Vec<u32>> = ps.iter().map(|(_, r)| tok.encode(r).unwrap()).collect();
    let pr: Vec<&[u32]> = p.iter().map(|x| x.as_slice()).collect();
    let rr: Vec<&[u32]> = r.iter().map(|x| x.as_slice()).collect();
    collate(&pr, &rr, Some(tok.eos_id), tok.pad_id, &Device::Cpu).unwrap()
}

#[test]
fn summed_logps_and_gradients_match_hf() {
    for (fx, (path, ckpt)) in NAMES.iter().flat_map(|n| PATHS.map(|p| (*n, p))) {
        let mut lm = fixture_model(fx);
        lm.model = lm.model.with_op_path(path).with_checkpointing(ckpt);
        let name = format!("{fx} {path:?} checkpointing={ckpt}");
        let exp = expected(fx);
        let batch = fixture_batch(fx, &lm);
        // The collated batch is the one HF scored.
        assert_eq!(
            batch
                .input_ids
                .to_dtype(DType::I64)
                .unwrap()
                .to_vec2::<i64>()
                .unwrap(),
            exp["input_ids"].to_vec2::<i64>().unwrap()
        );
        let lp = sequence_logps(&lm.model, &batch).unwrap();
        let d = max_abs_diff(&lp, &exp["seq_logps"]);
        assert!(d < 1e-4, "{name}: summed log-probs differ by {d}");

        let loss = (lp * &exp["loss_weights"]).unwrap().sum_all().unwrap();
        let grads = lm.model.backward(&loss).unwrap();
        let vars = lm.varmap.data().lock().unwrap();
        let mut checked = 0;
        for (k, want) in &exp {
            let Some(pname) = k.strip_prefix("grad.") else {
                continue;
            };
            let var = vars.get(pname).unwrap_or_else(|| panic!("no var {pname}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let scale = want
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rel = max_abs_diff(got, want) / scale.max(1e-12);
            assert!(
                rel < 1e-3,
                "{name}: gradient of {pname} off by {rel} (relative to max {scale})"
            );
            checked += 1;
        }
        assert_eq!(checked, 7);
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    for (fx, (path, ckpt)) in NAMES.iter().flat_map(|n| PATHS.map(|p| (*n, p))) {
        let mut lm = fixture_model(fx);
        lm.model = lm.model.with_op_path(path).with_checkpointing(ckpt);
        let name = format!("{fx} {path:?} checkpointing={ckpt}");
        let batch = fixture_batch(fx, &lm);
        let loss = sequence_logps(&lm.model, &batch)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = lm.model.backward(&loss).unwrap();
        let vars = lm.varmap.data().lock().unwrap();
        assert_eq!(vars.len(), 4 + 12 * 2);
        for (pname, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {pname} has no gradient"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                n > 0.0 && n.is_finite(),
                "{name}: {pname} gradient norm^2 = {n}"
            );
        }
    }
}

/// Greedy decoding by recomputing the full forward at every step (no cache).
fn greedy_recompute(
    model: &overopt::model::GptNeoX,
    prompt: &[u32],
    steps: usize,
    eos: u32,
) -> (Vec<u32>, Vec<f32>) {
    let mut seq = prompt.to_vec();
    let mut toks = vec![];
    let mut lps = vec![];
    for _ in 0..steps {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&ids, None, None).unwrap();
        let last = logits.i((0, seq.len() - 1)).unwrap();
        let lsm = candle_nn::ops::log_softmax(&last, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        toks.push(t);
        lps.push(lsm[t as usize]);
        seq.push(t);
        if t == eos {
            break;
        }
    }
    (toks, lps)
}

#[test]
fn greedy_generation_with_kv_cache_matches_recompute_and_hf() {
    for name in NAMES {
        let lm = fixture_model(name);
        let exp = expected(name);
        let cfg = lm.model.config().clone();
        let eos = cfg.eos_token_id.unwrap();
        let gids = exp["gen_input_ids"].to_vec2::<i64>().unwrap();
        let gmask = exp["gen_attention_mask"].to_vec2::<i64>().unwrap();
        let hf_out = exp["gen_output"].to_vec2::<i64>().unwrap();
        let prompts: Vec<Vec<u32>> = gids
            .iter()
            .zip(&gmask)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .filter(|(_, m)| **m == 1)
                    .map(|(t, _)| *t as u32)
                    .collect()
            })
            .collect();
        let p = gids[0].len();
        let sc = SampleConfig {
            temperature: 0.0,
            top_k: None,
            max_length: p + 10,
            seed: 0,
            batch_size: 8,
        };
        let samples = generate(&lm.model, &prompts, &sc, eos, 1).unwrap();
        for (i, s) in samples.iter().enumerate() {
            let (toks, lps) =
                greedy_recompute(&lm.model, &prompts[i], p + 10 - prompts[i].len(), eos);
            assert_eq!(
                s.tokens, toks,
                "{name} row {i}: cached vs recomputed tokens"
            );
            for (a, b) in s.logps.iter().zip(&lps) {
                assert!((a - b).abs() < 1e-4, "{name} row {i}: logp {a} vs {b}");
            }
            // HF pads finished rows with the pad id after EOS.
            let hf: Vec<u32> = hf_out[i].iter().map(|&t| t as u32).collect();
            // HF's limit is on the padded batch (10 new tokens for every row).
            let n = s.tokens.len().min(10);
            assert_eq!(&hf[..n], &s.tokens[..n], "{name} row {i}: HF greedy output");
        }
    }
}

#[test]
fn left_padded_cached_prefill_matches_unpadded_forward() {
    let lm = parallel_fixture(DType::F32);
    let m = lm.model.inference_copy().unwrap();
    let a: Vec<u32> = vec![5, 17, 42, 8, 9];
    let b: Vec<u32> = vec![250, 11];
    let ids = Tensor::new(&[[5u32, 17, 42, 8, 9], [1, 1, 1, 250, 11]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [0, 0, 0, 1, 1]], &Device::Cpu).unwrap();
    let pos = position_ids_from_mask(&mask).unwrap();
    assert_eq!(
        pos.to_vec2::<u32>().unwrap(),
        vec![vec![0, 1, 2, 3, 4], vec![0, 0, 0, 0, 1]]
    );
    let mut cache = KvCache::new(2);
    let logits = m.forward_cached(&ids, &mask, &pos, &mut cache).unwrap();
    for (row, seq, off) in [(0usize, &a, 0usize), (1, &b, 3)] {
        let solo = m
            .forward(
                &Tensor::new(seq.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
                None,
            )
            .unwrap();
        let d = max_abs_diff(
            &logits.i((row, off..off + seq.len())).unwrap(),
            &solo.i(0).unwrap(),
        );
        assert!(d < 1e-4, "row {row}: {d}");
    }
}

#[test]
fn sampling_is_seeded_and_independent_of_batching() {
    let lm = parallel_fixture(DType::F32);
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42],
        vec![250, 11],
        vec![2],
        vec![12, 13, 14, 15],
    ];
    let mut sc = SampleConfig {
        temperature: 1.0,
        top_k: Some(50),
        max_length: 20,
        seed: 3,
        batch_size: 4,
    };
    let a = generate(&lm.model, &prompts, &sc, 0, 1).unwrap();
    let b = generate(&lm.model, &prompts, &sc, 0, 1).unwrap();
    assert_eq!(a, b);
    sc.batch_size = 1;
    let c = generate(&lm.model, &prompts, &sc, 0, 1).unwrap();
    for (x, y) in a.iter().zip(&c) {
        assert_eq!(x.tokens, y.tokens);
    }
    sc.seed = 4;
    let d = generate(&lm.model, &prompts, &sc, 0, 1).unwrap();
    assert_ne!(a, d);
    for (s, p) in a.iter().zip(&prompts) {
        assert!(s.tokens.len() <= 20 - p.len() && (s.finished || s.tokens.len() == 20 - p.len()));
        assert_eq!(s.finished, s.tokens.last() == Some(&0));
    }
}

#[test]
fn bad_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("parallel");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    // Missing weights.
    let e = load::load(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // Truncated file.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = format!(
        "{:#}",
        load::load(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A shape that does not match the config.
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = format!(
        "{:#}",
        load::load(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("dense_") && e.contains("shape") && e.contains("model.safetensors"),
        "{e}"
    );
    // A missing shard of a sharded model.
    let dir2 = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("sequential")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir2.path().join(f.file_name())).unwrap();
    }
    std::fs::remove_file(dir2.path().join("model-00003-of-00009.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        load::load(
            dir2.path().to_str().unwrap(),
            None,
            DType::F32,
            &Device::Cpu
        )
        .err()
        .unwrap()
    );
    assert!(e.contains("model-00003-of-00009.safetensors"), "{e}");
}

#[test]
fn saved_checkpoint_round_trips() {
    let lm = load::load(
        fixture("sequential").to_str().unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    load::save_hf(&lm.model, dir.path()).unwrap();
    let back = load::load(dir.path().to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.model.config(), lm.model.config());
    let ids = Tensor::new(&[[3u32, 4, 5, 6]], &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &lm.model.forward(&ids, None, None).unwrap(),
        &back.model.forward(&ids, None, None).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn bf16_forward_is_close_to_f32() {
    let f32m = parallel_fixture(DType::F32);
    let bf = parallel_fixture(DType::BF16);
    let ids = Tensor::new(&[[3u32, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let a = f32m.model.forward(&ids, None, None).unwrap();
    let b = bf
        .model
        .forward(&ids, None, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let scale = a
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d / scale < 0.05, "bf16 relative error {}", d / scale);
}

#[test]
fn score_cli_reproduces_hf_logps() {
    for name in NAMES {
        let out = tempfile::NamedTempFile::new().unwrap();
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_overopt"))
            .args([
                "score",
                "--model",
                fixture(name).to_str().unwrap(),
                "--input",
            ])
            .arg(fixture("pairs.jsonl"))
            .arg("--output")
            .arg(out.path())
            .status()
            .unwrap();
        assert!(st.success());
        let exp = expected(name)["seq_logps"].to_vec1::<f32>().unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), exp.len());
        for (l, e) in lines.iter().zip(&exp) {
            assert!(
                (l["logp"].as_f64().unwrap() - *e as f64).abs() < 1e-4,
                "{name}: {l} vs {e}"
            );
        }
        assert_eq!(lines[1]["n_tokens"], 2); // "w7" + EOS
    }
    // A bad JSON line is reported with its line number.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "{\"prompt\": \"w5\", \"response\": \"w6\"}\n{\"prompt\": \"w5\"}\n",
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args([
            "score",
            "--model",
            fixture("parallel").to_str().unwrap(),
            "--input",
        ])
        .arg(bad.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2") && err.contains("response"), "{err}");
}

#[test]
fn growing_kv_cache_decode_matches_full_forward() {
    // A cache without a capacity hint starts at the prompt length and reallocates while
    // decoding; every step must still give the logits of a full forward over the sequence.
    let lm = parallel_fixture(DType::F32);
    let m = lm.model.inference_copy().unwrap();
    let dev = Device::Cpu;
    let mut ids = [vec![5u32, 17, 42], vec![1, 250, 11]];
    let mut mask = [vec![1u8, 1, 1], vec![0, 1, 1]];
    let mut cache = KvCache::new(2);
    let t_ids = Tensor::new(vec![ids[0].clone(), ids[1].clone()], &dev).unwrap();
    let t_mask = Tensor::new(vec![mask[0].clone(), mask[1].clone()], &dev).unwrap();
    let pos = position_ids_from_mask(&t_mask).unwrap();
    m.forward_cached(&t_ids, &t_mask, &pos, &mut cache).unwrap();
    for step in 0..6u32 {
        let new = [7 + step, 200 + step];
        for r in 0..2 {
            ids[r].push(new[r]);
            mask[r].push(1);
        }
        let full_ids = Tensor::new(vec![ids[0].clone(), ids[1].clone()], &dev).unwrap();
        let full_mask = Tensor::new(vec![mask[0].clone(), mask[1].clone()], &dev).unwrap();
        let full_pos = position_ids_from_mask(&full_mask).unwrap();
        let t = ids[0].len();
        let step_pos = full_pos.narrow(1, t - 1, 1).unwrap();
        let step_ids = Tensor::new(&[[new[0]], [new[1]]], &dev).unwrap();
        let got = m
            .forward_cached(&step_ids, &full_mask, &step_pos, &mut cache)
            .unwrap();
        assert_eq!(cache.len(), t);
        let want = m
            .forward(&full_ids, Some(&full_mask), Some(&full_pos))
            .unwrap()
            .narrow(1, t - 1, 1)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "step {step}: {d}");
    }
}

/// A prompt that fills the whole context, scored with an empty response (EOS only), next to a
/// short row whose response is longer: the padded positions of the first row stay inside
/// the position table, and the short row scores as it does alone.
#[test]
fn shared_prefix_scoring_handles_a_prompt_that_fills_the_context() {
    use overopt::model::score::shared_prefix_logps;
    let lm = fixture_model("parallel");
    let max = lm.model.config().max_position_embeddings;
    let long: Vec<u32> = (0..max as u32).map(|i| 2 + i % 5).collect();
    let short = [3u32, 4, 5];
    let resp = [6u32, 7, 8, 9];
    let (lp, lens) = shared_prefix_logps(
        &lm.model,
        &[long.as_slice(), &short],
        &[(0, &[]), (1, &resp)],
        Some(0),
        1,
    )
    .unwrap();
    assert_eq!(lens, vec![1, 5]);
    let batch = collate(&[&short], &[&resp], Some(0), 1, &Device::Cpu).unwrap();
    let alone = sequence_logps(&lm.model, &batch).unwrap();
    let diff = max_abs_diff(&lp.narrow(0, 1, 1).unwrap(), &alone);
    assert!(diff < 1e-4, "short row off by {diff}");
    assert!(lp.to_vec1::<f32>().unwrap()[0].is_finite());
}

/// Tokens beyond the vocabulary are refused on the host with the row and position named, on
/// both implementations of shared-prefix scoring and on full rows (a GPU's embedding lookup
/// and log-prob op do not check them).
#[test]
fn shared_prefix_scoring_names_tokens_beyond_the_vocabulary() {
    use overopt::model::score::shared_prefix_logps_via;
    let lm = fixture_model("parallel");
    let vocab = lm.model.config().vocab_size as u32;
    let ok = [3u32, 4, 5];
    let bad = [3u32, vocab, 5];
    for hand in [true, false] {
        // The message's first line (a backtrace may follow).
        let score = |prompts: &[&[u32]], resp: &[u32], eos: u32| {
            shared_prefix_logps_via(
                &lm.model,
                prompts,
                &[(0, &ok), (1, resp)],
                Some(eos),
                1,
                hand,
            )
            .unwrap_err()
            .to_string()
            .lines()
            .next()
            .unwrap()
            .to_string()
        };
        let e = score(&[&ok, &ok], &bad, 0);
        assert_eq!(
            e,
            format!("batch row 1: token {vocab} at position 1 is beyond the vocabulary of {vocab}")
        );
        // The appended EOS is a target too.
        let e = score(&[&ok, &ok], &ok, vocab + 3);
        assert!(
            e.starts_with("batch row 0: token") && e.contains("at position 3"),
            "{e}"
        );
        let e = score(&[&ok, &bad], &ok, 0);
        assert!(
            e.starts_with(&format!("batch prompt 1: token {vocab} at position 1")),
            "{e}"
        );
    }
    // So does scoring full rows (the largest token is named).
    let batch = collate(&[&ok, &ok], &[&ok, &bad], Some(0), 1, &Device::Cpu).unwrap();
    assert_eq!(batch.max_token, (vocab, 1, 4));
    let e = sequence_logps(&lm.model, &batch).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "batch row 1: token {vocab} at position 4 is beyond the vocabulary"
        )),
        "{e}"
    );
    // The model's own entry point checks too.
    let e = lm
        .model
        .forward_shared_prefix(&[&ok], &[(0, &bad)], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("continuation 0: token"), "{e}");
}

/// Pairs of continuations of shared prompts, scored with each prompt run once, give the
/// log-probs and parameter gradients of scoring every `prompt ++ continuation` row on its
/// own (both residual layouts; training op path and inference copy).
#[test]
fn shared_prefix_scoring_equals_full_rows_in_values_and_gradients() {
    use overopt::model::score::shared_prefix_logps_via;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    for name in NAMES {
        let lm = fixture_model(name);
        let vocab = lm.model.config().vocab_size as u32;
        let mut rng = StdRng::seed_from_u64(11);
        let mut draw =
            |len: usize| -> Vec<u32> { (0..len).map(|_| rng.random_range(2..vocab)).collect() };
        // Prompt lengths 1..9, continuations 0..6 tokens (EOS is appended to each).
        let prompt_lens = [1usize, 9, 4, 6, 2];
        let prompts: Vec<Vec<u32>> = prompt_lens.iter().map(|&l| draw(l)).collect();
        let cont_lens = [[0usize, 3], [5, 1], [2, 6], [4, 4], [1, 0]];
        let conts: Vec<Vec<u32>> = cont_lens.iter().flatten().map(|&l| draw(l)).collect();
        // Row order: first continuations of every prompt, then the second ones.
        let order: Vec<(usize, usize)> = (0..2)
            .flat_map(|side| (0..prompts.len()).map(move |i| (i, 2 * i + side)))
            .collect();
        let eos = 0u32;
        let pad = 1u32;
        let p_refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let responses: Vec<(usize, &[u32])> = order
            .iter()
            .map(|&(i, c)| (i, conts[c].as_slice()))
            .collect();
        let full_p: Vec<&[u32]> = order.iter().map(|&(i, _)| prompts[i].as_slice()).collect();
        let full_r: Vec<&[u32]> = order.iter().map(|&(_, c)| conts[c].as_slice()).collect();
        // Both implementations: the hand-written CPU path and candle's graph.
        for hand in [true, false] {
            let tag = if hand { "hand-written" } else { "graph" };
            for model in [lm.model.clone(), lm.model.inference_copy().unwrap()] {
                let (shared, lens) =
                    shared_prefix_logps_via(&model, &p_refs, &responses, Some(eos), pad, hand)
                        .unwrap();
                let batch = collate(&full_p, &full_r, Some(eos), pad, &Device::Cpu).unwrap();
                let rows = sequence_logps(&model, &batch).unwrap();
                assert_eq!(lens, batch.n_response_tokens, "{name}");
                let diff = max_abs_diff(&shared, &rows);
                assert!(
                    diff < 1e-4,
                    "{name} {tag}: shared-prefix log-probs off by {diff}"
                );
            }
            // Gradients of a weighted sum (distinct weights, so that rows cannot trade errors).
            let w: Vec<f32> = (0..order.len()).map(|r| 1.0 + 0.1 * r as f32).collect();
            let w = Tensor::new(w.as_slice(), &Device::Cpu).unwrap();
            let (shared, _) =
                shared_prefix_logps_via(&lm.model, &p_refs, &responses, Some(eos), pad, hand)
                    .unwrap();
            let g_shared = (shared * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let batch = collate(&full_p, &full_r, Some(eos), pad, &Device::Cpu).unwrap();
            let rows = sequence_logps(&lm.model, &batch).unwrap();
            let g_rows = (rows * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let vars = lm.varmap.data().lock().unwrap();
            for (pname, var) in vars.iter() {
                let a = g_shared.get(var.as_tensor()).unwrap_or_else(|| {
                    panic!("{name} {tag}: {pname} has no gradient (shared prefix)")
                });
                let b = g_rows.get(var.as_tensor()).unwrap();
                let scale = max_abs(b);
                let rel = max_abs_diff(a, b) / scale.max(1e-12);
                assert!(
                    rel < 1e-4,
                    "{name} {tag}: gradient of {pname} off by {rel} (max {scale})"
                );
            }
        }
    }
}

/// The hand-written path gives the same bits on any number of threads (each sum is made by
/// one thread in a fixed order), values and gradients, and a second backward over the same
/// graph (which recomputes the activations) gives the same gradients as the first.
#[test]
fn hand_written_path_is_independent_of_the_thread_count() {
    use overopt::model::score::shared_prefix_logps_via;
    let lm = fixture_model("parallel");
    let prompts: Vec<Vec<u32>> = (0..40)
        .map(|i| {
            (0..1 + i % 9)
                .map(|j| 2 + ((i * 7 + j * 3) % 20) as u32)
                .collect()
        })
        .collect();
    let conts: Vec<Vec<u32>> = (0..80)
        .map(|r| (0..r % 11).map(|j| 2 + ((r * 5 + j) % 20) as u32).collect())
        .collect();
    let p_refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let responses: Vec<(usize, &[u32])> = conts
        .iter()
        .enumerate()
        .map(|(r, c)| (r % 40, c.as_slice()))
        .collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (lp, _) =
                shared_prefix_logps_via(&lm.model, &p_refs, &responses, Some(0), 1, true).unwrap();
            let loss = lp.sum_all().unwrap();
            let g1 = loss.backward().unwrap();
            let g2 = loss.backward().unwrap();
            let mut out = vec![lp.to_vec1::<f32>().unwrap()];
            for (_, var) in overopt::sorted_vars(&lm.varmap) {
                let a = g1.get(var.as_tensor()).unwrap();
                let b = g2.get(var.as_tensor()).unwrap();
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                out.push(a);
            }
            out
        })
    };
    assert_eq!(run(1), run(3));
}

/// The hand-written decoder splits a step's rows into blocks, one per thread: the samples
/// (tokens and log-probs, bit for bit) are those of one block on one thread, also when rows
/// stop early and leave gaps in the running batch.
#[test]
fn sampling_in_row_blocks_equals_one_block() {
    let lm = parallel_fixture(DType::F32);
    let prompts: Vec<Vec<u32>> = (0..48)
        .map(|i| {
            (0..1 + i % 6)
                .map(|j| 2 + ((i * 13 + j * 7) % 200) as u32)
                .collect()
        })
        .collect();
    let sc = SampleConfig {
        temperature: 1.0,
        top_k: Some(50),
        max_length: 14,
        seed: 9,
        batch_size: 48,
    };
    // EOS = a token that comes up now and then, so that rows stop at different steps.
    let eos = 7;
    let split = generate(&lm.model, &prompts, &sc, eos, 1).unwrap();
    let one = overopt::model::gemm::serial(|| generate(&lm.model, &prompts, &sc, eos, 1)).unwrap();
    assert_eq!(split, one);
    let lens: std::collections::BTreeSet<usize> = split.iter().map(|s| s.tokens.len()).collect();
    assert!(
        lens.len() > 2,
        "rows should stop at different steps: {lens:?}"
    );
}

/// The sampler's prefill over chunks of prompts gives the same logits, and the same cache
/// (the next step's logits), as one pass over every prompt; a prompt longer than the chunk
/// size goes alone.
#[test]
fn prefill_in_chunks_equals_one_pass() {
    use overopt::model::hand::Decoder;
    let lm = parallel_fixture(DType::F32);
    let prompts: Vec<Vec<u32>> = (0..23)
        .map(|i| {
            (0..1 + (i * 5) % 11)
                .map(|j| 2 + ((i * 17 + j * 3) % 200) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let cap = 16;
    let (mut whole, lw) = Decoder::with_prefill_chunks(&lm.model, &refs, cap, 100_000).unwrap();
    let rows: Vec<usize> = (0..refs.len()).collect();
    let next: Vec<u32> = (0..refs.len() as u32).map(|i| 3 + i).collect();
    let sw = whole.step(&rows, &next).unwrap();
    for chunk in [1, 6, 25] {
        let (mut dec, l) = Decoder::with_prefill_chunks(&lm.model, &refs, cap, chunk).unwrap();
        assert_eq!(l, lw, "prefill logits, chunks of {chunk} tokens");
        assert_eq!(
            dec.step(&rows, &next).unwrap(),
            sw,
            "step after chunks of {chunk}"
        );
    }
    // Bad input is still refused before anything runs.
    let bad: Vec<&[u32]> = vec![&[2, 3], &[]];
    assert!(Decoder::with_prefill_chunks(&lm.model, &bad, cap, 1).is_err());
}

/// Responses as (prompt index, tokens).
type Responses = Vec<(usize, Vec<u32>)>;

/// Three prompts and responses to them for shared-prefix scoring.
fn prompts_and_responses() -> (Vec<Vec<u32>>, Responses) {
    let prompts = vec![vec![5, 9, 14, 3], vec![7, 2], vec![11, 12, 13, 4, 6, 8]];
    let conts = vec![
        (0, vec![21, 22, 23]),
        (1, vec![30]),
        (2, vec![40, 41, 42, 43, 44]),
        (0, vec![50, 51]),
        (1, vec![60, 61, 62, 63]),
        (2, vec![70]),
    ];
    (prompts, conts)
}

/// Prompts and responses as the slices that shared-prefix scoring takes.
type Refs<'a> = (Vec<&'a [u32]>, Vec<(usize, &'a [u32])>);

/// `prompts` and `conts` as the slices that shared-prefix scoring takes.
fn as_refs<'a>(prompts: &'a [Vec<u32>], conts: &'a Responses) -> Refs<'a> {
    (
        prompts.iter().map(|p| p.as_slice()).collect(),
        conts.iter().map(|(i, c)| (*i, c.as_slice())).collect(),
    )
}

/// Distinct weights 1 - step r for n rows (so that rows cannot trade errors in a weighted sum).
fn row_weights(n: usize, step: f32) -> Tensor {
    let w: Vec<f32> = (0..n).map(|r| 1.0 - step * r as f32).collect();
    Tensor::new(w.as_slice(), &Device::Cpu).unwrap()
}

/// Every parameter of `lm` has a non-zero gradient in `a` and `b`, equal within `tol` relative
/// to the largest of `b`, in f32 (the master weights' dtype).
fn assert_close_grads(
    tag: &str,
    lm: &load::LoadedModel,
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
    tol: f32,
) {
    let vars = lm.varmap.data().lock().unwrap();
    for (pname, var) in vars.iter() {
        let ga = a
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{tag}: {pname} has no gradient"));
        assert_eq!(
            ga.dtype(),
            DType::F32,
            "{tag}: {pname}: master gradient dtype"
        );
        let gb = b.get(var.as_tensor()).unwrap();
        let scale = max_abs(gb);
        let rel = max_abs_diff(ga, gb) / scale.max(1e-12);
        assert!(
            rel <= tol,
            "{tag}: gradient of {pname} off by {rel} (max {scale})"
        );
        assert!(scale > 0.0, "{tag}: {pname} has a zero gradient");
    }
}

/// The graph of the CUDA training path (bf16 or f16 autocast, f32 master weights), run on the
/// CPU: the recomputing ops give the log-probs and gradients of the composite of basic ops, in
/// the shared-prefix scoring of DPO's pairs, for both residual layouts.
#[test]
fn recompute_path_equals_composite_under_bf16_autocast() {
    use overopt::model::score::shared_prefix_logps_via;
    let (prompts, conts) = prompts_and_responses();
    let (p_refs, r_refs) = as_refs(&prompts, &conts);
    let w = row_weights(conts.len(), 0.15);
    // bf16 matmuls: one rounding of 2^-8 can flip between the two summation orders; f16 keeps
    // 11 bits.
    for (compute, tol) in [(DType::BF16, 2e-2), (DType::F16, 5e-3)] {
        for name in NAMES {
            let lm = fixture_model(name);
            let run = |path: OpPath| {
                let model = lm
                    .model
                    .clone()
                    .with_compute_dtype(compute)
                    .with_op_path(path);
                let (lp, _) =
                    shared_prefix_logps_via(&model, &p_refs, &r_refs, Some(0), 1, false).unwrap();
                let grads = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (lp, grads)
            };
            let tag = format!("{name} {compute:?}");
            let (lp_r, g_r) = run(OpPath::Recompute);
            let (lp_c, g_c) = run(OpPath::Composite);
            let d = max_abs_diff(&lp_r, &lp_c);
            assert!(
                d < 1e-3 * (1.0 + max_abs(&lp_c)),
                "{tag}: log-probs differ by {d}"
            );
            assert_close_grads(&tag, &lm, &g_r, &g_c, tol);
        }
    }
}

/// Activation checkpointing gives the log-probs and gradients of the same graph without it
/// (the backward pass recomputes each layer with the same kernels): full rows
/// (`GptNeoX::forward`) and shared-prefix scoring, f32 and bf16 autocast, both residual
/// layouts. The graph keeps far less: measured by `overopt-gpu-bench` (tests/train_cli.rs).
#[test]
fn checkpointing_gives_the_values_and_gradients_of_the_plain_graph() {
    use overopt::model::score::shared_prefix_logps_via;
    let (prompts, conts) = prompts_and_responses();
    let (p_refs, r_refs) = as_refs(&prompts, &conts);
    let full_p: Vec<&[u32]> = conts.iter().map(|(i, _)| prompts[*i].as_slice()).collect();
    let full_r: Vec<&[u32]> = conts.iter().map(|(_, c)| c.as_slice()).collect();
    let batch = collate(&full_p, &full_r, Some(0), 1, &Device::Cpu).unwrap();
    let w = row_weights(conts.len(), 0.2);
    for name in NAMES {
        let lm = fixture_model(name);
        for (compute, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 1e-6)] {
            for shared in [true, false] {
                let run = |ckpt: bool| {
                    let model = lm
                        .model
                        .clone()
                        .with_compute_dtype(compute)
                        .with_op_path(OpPath::Recompute)
                        .with_checkpointing(ckpt);
                    let lp = if shared {
                        shared_prefix_logps_via(&model, &p_refs, &r_refs, Some(0), 1, false)
                            .unwrap()
                            .0
                    } else {
                        sequence_logps(&model, &batch).unwrap()
                    };
                    let grads = model
                        .backward(&(&lp * &w).unwrap().sum_all().unwrap())
                        .unwrap();
                    (lp, grads)
                };
                let tag = format!("{name} {compute:?} shared={shared}");
                let (lp_c, g_c) = run(true);
                let (lp_p, g_p) = run(false);
                let d = max_abs_diff(&lp_c, &lp_p);
                assert!(
                    d <= tol * (1.0 + max_abs(&lp_p)),
                    "{tag}: log-probs differ by {d}"
                );
                assert_close_grads(&tag, &lm, &g_c, &g_p, tol);
            }
        }
    }
}

/// With checkpointing, `loss.backward()` alone leaves the layers' parameters without
/// gradients (they travel aside to `GptNeoX::backward`); the next forward pass then refuses to
/// run, saying what to call instead, and `GptNeoX::backward` recovers.
#[test]
fn checkpointing_refuses_to_lose_gradients() {
    let lm = fixture_model("parallel");
    let model = lm.model.clone().with_checkpointing(true);
    let batch = fixture_batch("parallel", &lm);
    let loss = sequence_logps(&model, &batch).unwrap().sum_all().unwrap();
    let plain = loss.backward().unwrap();
    let vars = lm.varmap.data().lock().unwrap();
    let qkv = &vars["gpt_neox.layers.0.attention.query_key_value.weight"];
    assert!(plain.get(qkv.as_tensor()).is_none());
    let e = sequence_logps(&model, &batch).unwrap_err().to_string();
    assert!(e.contains("GptNeoX::backward"), "{e}");
    let grads = model.backward(&loss).unwrap();
    assert!(grads.get(qkv.as_tensor()).is_some());
    assert!(sequence_logps(&model, &batch).is_ok());
}

/// Each layer of shared-prefix scoring as one node with a hand-written backward pass (the
/// layer-node op path, and the default path under bf16 autocast) gives the log-probs and every
/// gradient of the per-op graph of recomputing ops: f32 and bf16 autocast, both residual
/// layouts. A second backward pass over the same graph gives the same gradients; without a
/// graph (an inference copy) the same log-probs.
#[test]
fn layer_nodes_give_the_values_and_gradients_of_the_per_op_graph() {
    use overopt::model::score::shared_prefix_logps_via;
    let (prompts, conts) = prompts_and_responses();
    let (p_refs, r_refs) = as_refs(&prompts, &conts);
    let w = row_weights(conts.len(), 0.15);
    for name in NAMES {
        let lm = fixture_model(name);
        // bf16: the node runs each linear layer once over both streams, the graph once per
        // stream, so weight gradients are summed in another order (and rounding).
        for (compute, tol) in [
            (DType::F32, 2e-5f32),
            (DType::BF16, 2e-2),
            (DType::F16, 5e-3),
        ] {
            let model = |path: OpPath| {
                lm.model
                    .clone()
                    .with_compute_dtype(compute)
                    .with_op_path(path)
            };
            let run = |model: &overopt::model::GptNeoX| {
                let (lp, _) =
                    shared_prefix_logps_via(model, &p_refs, &r_refs, Some(0), 1, false).unwrap();
                let loss = (&lp * &w).unwrap().sum_all().unwrap();
                let grads = model.backward(&loss).unwrap();
                (lp, loss, grads)
            };
            let tag = format!("{name} {compute:?}");
            let nodes = model(OpPath::Layer);
            let (lp_n, loss_n, g_n) = run(&nodes);
            let (lp_r, _, g_r) = run(&model(OpPath::Recompute));
            let d = max_abs_diff(&lp_n, &lp_r);
            assert!(
                d <= tol * (1.0 + max_abs(&lp_r)),
                "{tag}: log-probs differ by {d}"
            );
            assert_close_grads(&tag, &lm, &g_n, &g_r, tol);
            // The same graph differentiated again: the same gradients, bit for bit.
            let again = nodes.backward(&loss_n).unwrap();
            assert_close_grads(&format!("{tag} again"), &lm, &again, &g_n, 0.0);
            // Without a graph: no node, the same values.
            let (lp_i, _) = shared_prefix_logps_via(
                &nodes.inference_copy().unwrap().with_op_path(OpPath::Layer),
                &p_refs,
                &r_refs,
                Some(0),
                1,
                false,
            )
            .unwrap();
            assert_eq!(max_abs_diff(&lp_i, &lp_n), 0.0, "{tag}: inference copy");
            if compute == DType::BF16 {
                // The default path under autocast takes the layer nodes: their parameters'
                // gradients travel aside, past `loss.backward()`. (Its head differs: the
                // fused CPU kernels of the final layer norm and log-softmax.)
                let default = model(OpPath::Differentiable);
                let (lp_d, _) =
                    shared_prefix_logps_via(&default, &p_refs, &r_refs, Some(0), 1, false).unwrap();
                let loss = (&lp_d * &w).unwrap().sum_all().unwrap();
                let plain = loss.backward().unwrap();
                let vars = lm.varmap.data().lock().unwrap();
                let qkv = &vars["gpt_neox.layers.0.attention.query_key_value.weight"];
                assert!(plain.get(qkv.as_tensor()).is_none(), "{tag}: default path");
                drop(vars);
                let g_d = default.backward(&loss).unwrap();
                let d = max_abs_diff(&lp_d, &lp_n);
                assert!(
                    d <= 1e-5 * (1.0 + max_abs(&lp_n)),
                    "{tag}: default path, {d}"
                );
                assert_close_grads(&format!("{tag} default"), &lm, &g_d, &g_n, 1e-4);
            }
        }
    }
}

/// Layer nodes hand their parameters' gradients aside, like checkpointed layers:
/// `loss.backward()` alone leaves them out, and the next forward pass refuses to run.
#[test]
fn layer_nodes_refuse_to_lose_gradients() {
    use overopt::model::score::shared_prefix_logps_via;
    let (prompts, conts) = prompts_and_responses();
    let (p_refs, r_refs) = as_refs(&prompts, &conts);
    let lm = fixture_model("parallel");
    let model = lm.model.clone().with_op_path(OpPath::Layer);
    let score = || shared_prefix_logps_via(&model, &p_refs, &r_refs, Some(0), 1, false);
    let loss = score().unwrap().0.sum_all().unwrap();
    let plain = loss.backward().unwrap();
    let vars = lm.varmap.data().lock().unwrap();
    let qkv = &vars["gpt_neox.layers.0.attention.query_key_value.weight"];
    assert!(plain.get(qkv.as_tensor()).is_none());
    let e = score().unwrap_err().to_string();
    assert!(e.contains("GptNeoX::backward"), "{e}");
    let grads = model.backward(&loss).unwrap();
    assert!(grads.get(qkv.as_tensor()).is_some());
    assert!(score().is_ok());
}
