//! DAA losses and RMSProp against torch reference values (tests/fixtures/make_train_fixtures.py).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use overopt::train::loss::{Objective, daa_loss, margin, pair_loss};
use overopt::train::optim::{RmsProp, RmsPropConfig};
use serde_json::Value;
use std::path::Path;

fn load(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn objective(c: &Value) -> Objective {
    match c["objective"].as_str().unwrap() {
        "dpo" => Objective::Dpo {
            label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        },
        "rdpo" => Objective::Rdpo {
            alpha: c["alpha"].as_f64().unwrap(),
        },
        n => Objective::from_name(n, 0.0).unwrap(),
    }
}

#[test]
fn losses_match_torch() {
    let cases = load("losses.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 200);
    let mut tensor_checked = 0;
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let obj = objective(c);
        let beta = f("beta");
        let h = margin(f("pol_w"), f("pol_l"), f("ref_w"), f("ref_l"));
        let got = pair_loss(obj, beta, h, f("len_w"), f("len_l"));
        let want = f("loss");
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{c}: got {got}, want {want}"
        );
        // The differentiable f32 version agrees where f32 can represent the inputs exactly.
        if h.abs() < 100.0 {
            let t = |k: &str| Tensor::new(&[f(k) as f32], &Device::Cpu).unwrap();
            let (l, _) = daa_loss(
                obj,
                beta,
                &t("pol_w"),
                &t("pol_l"),
                &t("ref_w"),
                &t("ref_l"),
                &t("len_w"),
                &t("len_l"),
            )
            .unwrap();
            let l = l.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (l - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{c}: tensor loss {l}, want {want}"
            );
            tensor_checked += 1;
        }
    }
    assert!(tensor_checked > 100);
}

#[test]
fn dpo_tensor_loss_is_finite_for_huge_margins() {
    for h in [-1e4f32, 1e4] {
        let z = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let pw = Tensor::new(&[h], &Device::Cpu).unwrap();
        let (l, _) = daa_loss(
            Objective::Dpo {
                label_smoothing: 0.1,
            },
            1.0,
            &pw,
            &z,
            &z,
            &z,
            &z,
            &z,
        )
        .unwrap();
        let l = l.to_scalar::<f32>().unwrap() as f64;
        let want = pair_loss(
            Objective::Dpo {
                label_smoothing: 0.1,
            },
            1.0,
            h as f64,
            0.0,
            0.0,
        );
        assert!(
            l.is_finite() && (l - want).abs() <= 1e-3 * want.abs().max(1.0),
            "{h}: {l} vs {want}"
        );
    }
}

fn mat(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn rmsprop_warmup_and_clipping_match_torch() {
    let d = load("rmsprop.json");
    let dev = Device::Cpu;
    let t2 = |v: &Value| {
        let m = mat(v);
        let (r, c) = (m.len(), m[0].len());
        Tensor::from_vec(m.into_iter().flatten().collect::<Vec<_>>(), (r, c), &dev).unwrap()
    };
    let x = t2(&d["x"]);
    let y = t2(&d["y"]);
    let w = Var::from_tensor(&t2(&d["init"]["w"])).unwrap();
    let b0: Vec<f32> = d["init"]["b"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let b = Var::from_tensor(&Tensor::new(b0.as_slice(), &dev).unwrap()).unwrap();
    let cfg = RmsPropConfig {
        lr: d["lr"].as_f64().unwrap(),
        warmup_steps: d["warmup"].as_u64().unwrap() as usize,
        max_grad_norm: Some(d["clip"].as_f64().unwrap()),
        ..RmsPropConfig::default()
    };
    let mut opt = RmsProp::new(vec![w.clone(), b.clone()], cfg).unwrap();
    for step in 0..20 {
        let pred = x
            .matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let loss = (pred - &y).unwrap().sqr().unwrap().mean_all().unwrap();
        let loss = (loss * if step < 3 { 10.0 } else { 1.0 }).unwrap();
        let grads = loss.backward().unwrap();
        let g = opt.grads_of(&grads);
        let info = opt.step_with(&g).unwrap();
        let want_norm = d["grad_norms"][step].as_f64().unwrap();
        let want_lr = d["lrs"][step].as_f64().unwrap();
        assert!(
            (info.grad_norm - want_norm).abs() < 1e-4 * want_norm.max(1.0),
            "step {step}: norm {} vs {want_norm}",
            info.grad_norm
        );
        assert!(
            (info.lr - want_lr).abs() < 1e-12,
            "step {step}: lr {} vs {want_lr}",
            info.lr
        );
    }
    let fw = mat(&d["final"]["w"]);
    let gw = w
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (r1, r2) in fw.iter().zip(&gw) {
        for (a, b) in r1.iter().zip(r2) {
            assert!((a - b).abs() < 1e-5, "w: {a} vs {b}");
        }
    }
    let fb: Vec<f32> = d["final"]["b"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (a, b) in fb.iter().zip(b.as_tensor().to_vec1::<f32>().unwrap()) {
        assert!((a - b).abs() < 1e-5, "b: {a} vs {b}");
    }
}
