//! Trainer behaviour on tiny models: DAA learns, large beta stays near the reference,
//! resume is exact, non-finite losses stop the run, cached == online reference, accumulation.

use candle_core::{DType, Device};
use overopt::data::{PrefExample, SftExample};
use overopt::model::load::{deep_copy, fresh};
use overopt::model::{GptNeoXConfig, LoadedModel};
use overopt::train::daa::{DaaConfig, ReferenceSource, daa_micro, pair_logps};
use overopt::train::loss::Objective;
use overopt::train::optim::RmsPropConfig;
use overopt::train::trainer::{LoopConfig, MicroOutput, run_epoch};
use overopt::train::{SpecialTokens, train_daa, train_sft};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TOK: SpecialTokens = SpecialTokens { eos: 0, pad: 1 };

fn tiny_cfg() -> GptNeoXConfig {
    let text = r#"{"model_type":"gpt_neox","vocab_size":32,"hidden_size":16,"num_hidden_layers":2,
      "num_attention_heads":2,"intermediate_size":32,"max_position_embeddings":64,
      "rotary_pct":0.5,"rotary_emb_base":10000,"use_parallel_residual":true,
      "bos_token_id":0,"eos_token_id":0,"initializer_range":0.2}"#;
    GptNeoXConfig::from_json_str(text, "tiny").unwrap()
}

fn model(seed: u64) -> LoadedModel {
    fresh(&tiny_cfg(), DType::F32, &Device::Cpu, seed).unwrap()
}

/// Prompts of random tokens 2..10; chosen responses use tokens 10..20, rejected 20..30.
fn pref_data(n: usize, seed: u64) -> Vec<PrefExample> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let pl = rng.random_range(1..5);
            let prompt = (0..pl).map(|_| rng.random_range(2..10)).collect();
            let cl = rng.random_range(1..5);
            let rl = rng.random_range(1..5);
            PrefExample {
                prompt,
                chosen: (0..cl).map(|_| rng.random_range(10..20)).collect(),
                rejected: (0..rl).map(|_| rng.random_range(20..30)).collect(),
            }
        })
        .collect()
}

fn params(lm: &LoadedModel) -> Vec<f32> {
    let mut p = lm.model.named_parameters();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p.into_iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn heldout_stats(
    policy: &LoadedModel,
    reference: &LoadedModel,
    data: &[PrefExample],
    beta: f64,
) -> (f64, f64) {
    let idx: Vec<usize> = (0..data.len()).collect();
    let cfg = DaaConfig {
        objective: Objective::Dpo {
            label_smoothing: 0.0,
        },
        beta,
        online_reference: true,
        reference_cache: None,
    };
    let r = reference.model.inference_copy().unwrap();
    let out = daa_micro(
        &policy.model.inference_copy().unwrap(),
        data,
        &idx,
        TOK,
        &cfg,
        ReferenceSource::Online(&r),
    )
    .unwrap();
    let acc = out
        .metrics
        .iter()
        .find(|(k, _)| *k == "rewards_accuracy")
        .unwrap()
        .1;
    (out.loss.to_scalar::<f32>().unwrap() as f64, acc)
}

fn quiet(batch: usize, micro: usize) -> LoopConfig {
    LoopConfig {
        batch_size: batch,
        micro_batch_size: micro,
        seed: 5,
        checkpoints: vec![0.5, 1.0],
        log_every: 0,
        resume: true,
        progress_bar: false,
    }
}

fn optim(lr: f64) -> RmsPropConfig {
    RmsPropConfig {
        lr,
        warmup_steps: 2,
        ..RmsPropConfig::default()
    }
}

fn drift(policy: &LoadedModel, reference: &LoadedModel, held: &[PrefExample]) -> f64 {
    // Mean |log pi - log pi_ref| of held-out chosen and rejected responses.
    let idx: Vec<usize> = (0..held.len()).collect();
    let (pw, pl, _, _) = pair_logps(&policy.model, held, &idx, TOK).unwrap();
    let (rw, rl, _, _) = pair_logps(&reference.model, held, &idx, TOK).unwrap();
    let m = |a: candle_core::Tensor, b: candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    (m(pw, rw) + m(pl, rl)) / 2.0
}

#[test]
fn dpo_lowers_loss_and_raises_accuracy_and_large_beta_stays_near_reference() {
    let train = pref_data(192, 1);
    let held = pref_data(32, 2);
    let sft = model(11);
    let mut drifts = vec![];
    for beta in [0.1, 5.0, 1e4] {
        let policy = deep_copy(&sft).unwrap();
        let reference = deep_copy(&sft).unwrap();
        let (l0, a0) = heldout_stats(&policy, &reference, &held, beta);
        let dir = tempfile::tempdir().unwrap();
        let cfg = DaaConfig {
            objective: Objective::Dpo {
                label_smoothing: 0.0,
            },
            beta,
            online_reference: false,
            reference_cache: None,
        };
        let out = train_daa(
            &policy,
            &reference.model,
            &train,
            TOK,
            &cfg,
            &quiet(8, 8),
            &optim(1e-3),
            &dir.path().join("run"),
            &serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(out.total_steps, 24);
        assert_eq!(out.checkpoints.len(), 2);
        if beta == 0.1 {
            let (l1, a1) = heldout_stats(&policy, &reference, &held, beta);
            assert!(
                l1 < l0 - 0.05,
                "held-out DPO loss did not fall: {l0} -> {l1}"
            );
            assert!(a1 > a0 && a1 >= 0.9, "accuracy did not rise: {a0} -> {a1}");
        }
        drifts.push(drift(&policy, &reference, &held));
    }
    // The KL penalty: the larger beta, the closer the policy stays to the reference. RMSProp
    // normalises the gradient scale, so even a saturated loss moves the weights by about lr in
    // the first steps: a floor, not zero (measured: 5.4 / 1.2 / 1.3 nats at beta 0.1 / 5 / 1e4).
    assert!(
        drifts[1] < 0.4 * drifts[0] && drifts[2] < 0.4 * drifts[0],
        "drift by beta: {drifts:?}"
    );
}

#[test]
fn cached_and_online_reference_give_the_same_losses() {
    let data = pref_data(16, 3);
    let sft = model(4);
    let mut logs = vec![];
    for online in [false, true] {
        let policy = deep_copy(&sft).unwrap();
        let reference = deep_copy(&sft).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = DaaConfig {
            objective: Objective::Ipo,
            beta: 0.3,
            online_reference: online,
            reference_cache: None,
        };
        train_daa(
            &policy,
            &reference.model,
            &data,
            TOK,
            &cfg,
            &quiet(4, 2),
            &optim(1e-3),
            &dir.path().join("run"),
            &serde_json::json!({}),
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
        let losses: Vec<f64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        logs.push(losses);
    }
    assert_eq!(logs[0].len(), 4);
    for (a, b) in logs[0].iter().zip(&logs[1]) {
        assert!((a - b).abs() < 1e-5, "cached {a} vs online {b}");
    }
}

#[test]
fn reference_cache_is_reused_and_keyed() {
    let data = pref_data(10, 3);
    let sft = model(4);
    let dir = tempfile::tempdir().unwrap();
    let a =
        overopt::train::daa::reference_logps(&sft.model, &data, TOK, 4, Some(dir.path())).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
    let b =
        overopt::train::daa::reference_logps(&sft.model, &data, TOK, 3, Some(dir.path())).unwrap();
    assert_eq!(a, b);
    // Other data or another reference gets its own entry.
    overopt::train::daa::reference_logps(&sft.model, &data[..9], TOK, 4, Some(dir.path())).unwrap();
    overopt::train::daa::reference_logps(&model(5).model, &data, TOK, 4, Some(dir.path())).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn a_killed_run_resumes_and_ends_identical() {
    let data = pref_data(32, 7);
    let sft = model(9);
    let cfg = DaaConfig {
        objective: Objective::Slic,
        beta: 0.5,
        online_reference: false,
        reference_cache: None,
    };
    let lc = LoopConfig {
        checkpoints: vec![0.25, 0.5, 0.75, 1.0],
        ..quiet(4, 2)
    };
    // Uninterrupted.
    let full = deep_copy(&sft).unwrap();
    let reference = deep_copy(&sft).unwrap();
    let d1 = tempfile::tempdir().unwrap();
    train_daa(
        &full,
        &reference.model,
        &data,
        TOK,
        &cfg,
        &lc,
        &optim(2e-3),
        &d1.path().join("run"),
        &serde_json::json!({}),
    )
    .unwrap();
    // Killed after step 5 (a checkpoint was written at step 4), then resumed in a new process
    // state: a fresh policy object starting from the SFT weights.
    let d2 = tempfile::tempdir().unwrap();
    let out = d2.path().join("run");
    let first = deep_copy(&sft).unwrap();
    let ref_data =
        overopt::train::daa::reference_logps(&reference.model, &data, TOK, 4, None).unwrap();
    let mut calls = 0;
    let err = run_epoch(
        &first,
        data.len(),
        &lc,
        &optim(2e-3),
        &out,
        &serde_json::json!({}),
        "kill",
        &mut |idx| {
            calls += 1;
            if calls > 10 {
                anyhow::bail!("simulated kill");
            }
            daa_micro(
                &first.model,
                &data,
                idx,
                TOK,
                &cfg,
                ReferenceSource::Cached(&ref_data),
            )
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("simulated kill"));
    let resumed = deep_copy(&sft).unwrap();
    let o = train_daa(
        &resumed,
        &reference.model,
        &data,
        TOK,
        &cfg,
        &lc,
        &optim(2e-3),
        &out,
        &serde_json::json!({}),
    )
    .unwrap();
    assert_eq!(o.resumed_from, 4);
    assert_eq!(
        params(&resumed),
        params(&full),
        "resumed run differs from the uninterrupted one"
    );
    let l1 = std::fs::read_to_string(d1.path().join("run/metrics.jsonl")).unwrap();
    let l2 = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses = |t: &str| {
        t.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        losses(&l1),
        losses(&l2),
        "the log has each step exactly once"
    );
    // Checkpoints are loadable in the HF layout with metadata.
    let meta = overopt::train::checkpoint::read_meta(&out.join("step-000008")).unwrap();
    assert_eq!(
        (meta.step, meta.total_steps, meta.examples_seen),
        (8, 8, 32)
    );
    assert!(out.join("step-000008/config.json").is_file());
    overopt::model::load::load(
        out.join("step-000002").to_str().unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let data = pref_data(16, 7);
    let lm = model(2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let lc = LoopConfig {
        checkpoints: vec![0.25, 0.5, 0.75, 1.0],
        ..quiet(2, 2)
    };
    let mut step = 0;
    let err = run_epoch(
        &lm,
        data.len(),
        &lc,
        &optim(1e-3),
        &out,
        &serde_json::json!({}),
        "nan",
        &mut |idx| {
            step += 1;
            let lp = pair_logps(&lm.model, &data, idx, TOK).unwrap().0;
            let loss = lp.mean_all()?.neg()?;
            let loss = if step == 5 { (loss * f64::NAN)? } else { loss };
            Ok(MicroOutput {
                loss,
                metrics: vec![],
            })
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 5") && err.contains("non-finite"),
        "{err}"
    );
    let ck = overopt::train::checkpoint::list(&out).unwrap();
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
    let back =
        overopt::model::load::load(ck[1].1.to_str().unwrap(), None, DType::F32, &Device::Cpu)
            .unwrap();
    assert!(params(&back).iter().all(|x| x.is_finite()));
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    use overopt::train::optim::{GradAccum, named_vars};
    use overopt::train::sft::sft_micro;
    let data: Vec<SftExample> = pref_data(8, 1)
        .into_iter()
        .map(|p| SftExample {
            prompt: p.prompt,
            response: p.chosen,
        })
        .collect();
    let lm = model(3);
    let vars: Vec<_> = named_vars(&lm.varmap).into_iter().map(|(_, v)| v).collect();
    let all: Vec<usize> = (0..8).collect();
    let mut one = GradAccum::new(&vars);
    one.add(
        &sft_micro(&lm, &data, &all, TOK)
            .unwrap()
            .loss
            .backward()
            .unwrap(),
    )
    .unwrap();
    let mut acc = GradAccum::new(&vars);
    for chunk in all.chunks(2) {
        let l = (sft_micro(&lm, &data, chunk, TOK).unwrap().loss / 4.0).unwrap();
        acc.add(&l.backward().unwrap()).unwrap();
    }
    let (a, b) = (one.take(), acc.take());
    let mut n = 0;
    for (x, y) in a.iter().zip(&b) {
        let (Some(x), Some(y)) = (x, y) else {
            panic!("missing gradient")
        };
        let scale = x
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d / scale < 1e-4,
            "accumulated gradient differs: {d} (scale {scale})"
        );
        n += 1;
    }
    assert_eq!(n, vars.len());
}

#[test]
fn sft_lowers_the_nll() {
    let data: Vec<SftExample> = pref_data(256, 1)
        .into_iter()
        .map(|p| SftExample {
            prompt: p.prompt,
            response: p.chosen,
        })
        .collect();
    let lm = model(3);
    let dir = tempfile::tempdir().unwrap();
    let lc = LoopConfig {
        checkpoints: vec![1.0],
        ..quiet(8, 8)
    };
    train_sft(
        &lm,
        &data,
        TOK,
        &lc,
        &optim(3e-3),
        dir.path(),
        &serde_json::json!({}),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let l: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["nll_per_token"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(l.len(), 32);
    let first: f64 = l[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = l[28..].iter().sum::<f64>() / 4.0;
    // Uniform over 32 tokens is ln 32 = 3.47 nats; responses use 10 of them plus EOS.
    assert!(last < first - 0.5, "per-token NLL {first} -> {last}: {l:?}");
}

#[test]
fn bf16_autocast_keeps_f32_master_weights_with_gradients_and_close_logits() {
    let lm = model(5);
    let data = pref_data(6, 2);
    let idx: Vec<usize> = (0..6).collect();
    let cast = lm.model.clone().with_compute_dtype(DType::BF16);
    assert_eq!(cast.dtype(), DType::F32);
    assert_eq!(cast.compute_dtype(), DType::BF16);
    assert_eq!(
        lm.model
            .clone()
            .with_compute_dtype(DType::F32)
            .compute_dtype(),
        DType::F32
    );

    // Logits: bf16 out of the autocast model, close to the f32 model's but not identical.
    let ids = candle_core::Tensor::new(&[[2u32, 5, 11, 17, 23, 3, 9, 30]], &Device::Cpu).unwrap();
    let full = lm.model.forward(&ids, None, None).unwrap();
    let half = cast.forward(&ids, None, None).unwrap();
    assert_eq!(full.dtype(), DType::F32);
    assert_eq!(half.dtype(), DType::BF16);
    let full: Vec<f32> = full.flatten_all().unwrap().to_vec1().unwrap();
    let half: Vec<f32> = half
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = full.iter().fold(1f32, |m, x| m.max(x.abs()));
    let diff = full
        .iter()
        .zip(&half)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 0.05 * scale, "max |diff| {diff} (scale {scale})");
    assert!(
        diff > 0.0,
        "autocast changed nothing: matmuls did not run in bf16"
    );

    // Gradients: every f32 parameter gets a non-zero f32 gradient through the DPO loss.
    let cfg = DaaConfig {
        objective: Objective::Dpo {
            label_smoothing: 0.0,
        },
        beta: 0.1,
        online_reference: false,
        reference_cache: None,
    };
    let refs = vec![(-20f32, -20f32); 6];
    let out = daa_micro(
        &cast,
        &data,
        &idx,
        TOK,
        &cfg,
        ReferenceSource::Cached(&refs),
    )
    .unwrap();
    // `GptNeoX::backward`, as the trainer calls it: under autocast each layer is one node of
    // the graph, which hands its parameters' gradients aside.
    let grads = cast.backward(&out.loss).unwrap();
    let vars = overopt::sorted_vars(&lm.varmap);
    assert!(vars.len() > 10);
    for (name, var) in vars {
        assert_eq!(var.dtype(), DType::F32, "{name}");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0 && s.is_finite(), "{name}: gradient sum {s}");
    }
}

/// Data built in memory (the teach sweep's) is checked as a whole before any step: a bad
/// example late in the epoch stops `train_sft` / `train_daa` at once, named by its number,
/// before a checkpoint or the reference pass.
#[test]
fn bad_examples_stop_training_before_the_first_step() {
    let lm = model(2);
    let lc = LoopConfig {
        checkpoints: vec![0.25, 0.5, 0.75, 1.0],
        ..quiet(4, 2)
    };
    let mut sft: Vec<SftExample> = pref_data(32, 4)
        .into_iter()
        .map(|p| SftExample {
            prompt: p.prompt,
            response: p.chosen,
        })
        .collect();
    sft[29].prompt.clear();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft");
    let e = train_sft(
        &lm,
        &sft,
        TOK,
        &lc,
        &optim(1e-3),
        &out,
        &serde_json::json!({}),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.starts_with("sft: training example 30 of 32: empty `prompt`"),
        "{e}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "{e}");
    // A token beyond the vocabulary of 32, in a rejected response.
    let mut pref = pref_data(32, 5);
    pref[20].rejected.push(40);
    let cfg = DaaConfig {
        objective: Objective::Dpo {
            label_smoothing: 0.0,
        },
        beta: 0.1,
        online_reference: false,
        reference_cache: Some(dir.path().join("ref-cache")),
    };
    let reference = deep_copy(&lm).unwrap();
    let e = train_daa(
        &lm,
        &reference.model,
        &pref,
        TOK,
        &cfg,
        &lc,
        &optim(1e-3),
        &dir.path().join("dpo"),
        &serde_json::json!({}),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.starts_with("daa: training example 21 of 32: `rejected`: token 40 at position"),
        "{e}"
    );
    assert!(!dir.path().join("ref-cache").exists() && !dir.path().join("dpo").exists());
    // An EOS id outside the model's vocabulary is named too.
    let e = train_sft(
        &lm,
        &sft[..4],
        SpecialTokens { eos: 32, pad: 1 },
        &lc,
        &optim(1e-3),
        &out,
        &serde_json::json!({}),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("EOS id 32"), "{e:#}");
    // The scorer's own guard, reached only by bypassing the check, names the examples of the
    // micro-batch beside the batch row.
    let e = overopt::train::sft::sft_micro(&lm, &sft, &[3, 29], TOK)
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.starts_with("sft: scoring training examples 4, 30 (1-based, in batch-row order): batch row 1: empty prompt"),
        "{e}"
    );
}
