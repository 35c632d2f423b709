//! The fused CPU kernels of `overopt::model::fused`, and the recomputing ops of
//! `overopt::model::recompute`, against candle's composite ops: values and gradients.

use candle_core::{D, Device, Tensor, Var};
use overopt::model::fused::{
    attention_inference, bias_gelu, layer_norm, linear, log_softmax_last, masked_softmax,
    matmul_wt, softmax_last, split_heads_rotary,
};
use overopt::model::gpt_neox::attention_bias;
use overopt::model::recompute;

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{i}: {x} vs {y}");
    }
}

/// Backpropagate the random linear functional `sum(out * r)` through both outputs and compare
/// the gradients of every `var` within `tol`.
fn close_grads(fused: Tensor, composite: Tensor, r: &Tensor, vars: &[&Var], tol: f32) {
    let gf = (fused * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (composite * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in vars {
        close(
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

fn composite_ln(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let n = x.dim(D::Minus1).unwrap() as f64;
    let mean = (x.sum_keepdim(D::Minus1).unwrap() / n).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = (xc.sqr().unwrap().sum_keepdim(D::Minus1).unwrap() / n).unwrap();
    let xn = xc
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    xn.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
}

/// The fused kernel and the recomputing op of the CUDA path, each against the composite.
#[test]
fn layer_norm_matches_the_composite_with_gradients() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev).unwrap() + 0.5).unwrap())
        .unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 16, &dev).unwrap()).unwrap();
    // A non-uniform upstream gradient: weight the outputs before summing.
    let r = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
    for ln in [layer_norm, recompute::layer_norm] {
        let out = ln(&x, &w, &b, 1e-5).unwrap();
        let comp = composite_ln(&x, &w, &b, 1e-5);
        close(&out, &comp, 1e-5);
        close_grads(out, comp, &r, &[&x, &w, &b], 1e-4);
    }
}

#[test]
fn softmaxes_match_candle_with_gradients() {
    let dev = Device::Cpu;
    let mut init = Tensor::randn(0f32, 3.0, (4, 3, 7), &dev).unwrap();
    // A row with a huge negative entry, as the attention mask makes.
    let mask = Tensor::new(&[0f32, 0.0, f32::MIN, 0.0, 0.0, 0.0, 0.0], &dev).unwrap();
    init = init.broadcast_add(&mask).unwrap();
    let x = Var::from_tensor(&init).unwrap();
    let r = Tensor::randn(0f32, 1.0, (4, 3, 7), &dev).unwrap();
    for log in [false, true] {
        let (f, c) = if log {
            (
                log_softmax_last(&x).unwrap(),
                candle_nn::ops::log_softmax(&x, D::Minus1).unwrap(),
            )
        } else {
            (
                softmax_last(&x).unwrap(),
                candle_nn::ops::softmax(&x, D::Minus1).unwrap(),
            )
        };
        close(&f, &c, 1e-5);
        close_grads(f, c, &r, &[&x], 1e-4);
    }
}

#[test]
fn masked_softmax_matches_the_composite_with_gradients() {
    let dev = Device::Cpu;
    // 2 rows, 3 heads, 4 queries over 6 keys; row 1 left-padded by two positions.
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 4, 6), &dev).unwrap()).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], &dev).unwrap();
    let bias = attention_bias(&mask, 4).unwrap();
    let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 6), &dev).unwrap();
    let scale = 0.25;
    let f = masked_softmax(&x, &bias, scale).unwrap();
    let c = candle_nn::ops::softmax(
        &(x.as_tensor() * scale)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap(),
        D::Minus1,
    )
    .unwrap();
    close(&f, &c, 1e-5);
    close_grads(f, c, &r, &[&x], 1e-4);
}

/// The composite the fused split replaces: reshape, transpose, narrow, rotate-half.
fn composite_split(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    part: usize,
    rotate: bool,
) -> Tensor {
    let (b, t, w) = qkv.dims3().unwrap();
    let hs = w / (3 * heads);
    let x = qkv
        .reshape((b, t, heads, 3 * hs))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .narrow(D::Minus1, part * hs, hs)
        .unwrap();
    if !rotate {
        return x.contiguous().unwrap();
    }
    let nd = cos.dim(D::Minus1).unwrap();
    let half = nd / 2;
    let xr = x.narrow(D::Minus1, 0, nd).unwrap();
    let x1 = xr.narrow(D::Minus1, 0, half).unwrap();
    let x2 = xr.narrow(D::Minus1, half, half).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    let out = (xr.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap();
    if nd == hs {
        out
    } else {
        let pass = x.narrow(D::Minus1, nd, hs - nd).unwrap();
        Tensor::cat(&[&out, &pass], D::Minus1).unwrap()
    }
}

#[test]
fn split_heads_rotary_matches_the_composite_with_gradients() {
    let dev = Device::Cpu;
    // (b, t, heads, head_size, rotary dims): partial and full rotation.
    for (b, t, heads, hs, nd) in [(2usize, 5usize, 3usize, 8usize, 4usize), (3, 4, 2, 6, 6)] {
        let qkv =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * heads * hs), &dev).unwrap())
                .unwrap();
        // Distinct tables per row and position, as position ids of left-padded rows give.
        let cos = Tensor::randn(0f32, 1.0, (b, 1, t, nd), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (b, 1, t, nd), &dev).unwrap();
        let mut fused_sum = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
        let mut comp_sum = fused_sum.clone();
        for (part, rotate) in [(0, true), (1, true), (2, false)] {
            let f = split_heads_rotary(&qkv, &cos, &sin, heads, part, rotate).unwrap();
            let c = composite_split(&qkv, &cos, &sin, heads, part, rotate);
            assert_eq!(f.dims(), &[b, heads, t, hs]);
            close(&f, &c, 1e-6);
            let r = Tensor::randn(0f32, 1.0, (b, heads, t, hs), &dev).unwrap();
            fused_sum = (fused_sum + (f * &r).unwrap().sum_all().unwrap()).unwrap();
            comp_sum = (comp_sum + (c * &r).unwrap().sum_all().unwrap()).unwrap();
        }
        let gf = fused_sum.backward().unwrap();
        let gc = comp_sum.backward().unwrap();
        close(
            gf.get(qkv.as_tensor()).unwrap(),
            gc.get(qkv.as_tensor()).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn recompute_split_heads_rotary_matches_the_composite_with_gradients() {
    use candle_core::DType;
    let dev = Device::Cpu;
    for (dtype, tol, grad_tol) in [(DType::F32, 1e-6f32, 1e-5f32), (DType::BF16, 1e-2, 2e-2)] {
        // (b, t, heads, head_size, rotary dims): partial, full and no rotation.
        for (b, t, heads, hs, nd) in [(2usize, 5usize, 3usize, 8usize, 4usize), (3, 4, 2, 6, 6)] {
            let init = Tensor::randn(0f32, 1.0, (b, t, 3 * heads * hs), &dev).unwrap();
            let qkv = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            // The model's tables repeat their first half (rotate-half layout); distinct per row
            // and position, as the position ids of left-padded rows give.
            let table = || {
                let h = Tensor::randn(0f32, 1.0, (b, 1, t, nd / 2), &dev).unwrap();
                Tensor::cat(&[&h, &h], D::Minus1)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (cos, sin) = (table(), table());
            let mut rec_sum = Tensor::zeros((), DType::F32, &dev).unwrap();
            let mut comp_sum = rec_sum.clone();
            for (part, rotate) in [(0, true), (1, true), (2, false)] {
                let r = recompute::split_heads_rotary(
                    &qkv,
                    &cos,
                    &sin,
                    heads,
                    part,
                    rotate.then_some(nd),
                )
                .unwrap();
                let c = composite_split(&qkv, &cos, &sin, heads, part, rotate);
                assert_eq!((r.dims(), r.dtype()), (&[b, heads, t, hs][..], dtype));
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                close(&f(&r), &f(&c), tol);
                let w = Tensor::randn(0f32, 1.0, (b, heads, t, hs), &dev).unwrap();
                let dot = |x: Tensor| (f(&x) * &w).unwrap().sum_all().unwrap();
                rec_sum = (rec_sum + dot(r)).unwrap();
                comp_sum = (comp_sum + dot(c)).unwrap();
            }
            let (gr, gc) = (rec_sum.backward().unwrap(), comp_sum.backward().unwrap());
            let (a, c) = (
                gr.get(qkv.as_tensor()).unwrap(),
                gc.get(qkv.as_tensor()).unwrap(),
            );
            assert_eq!((a.dims(), a.dtype()), (qkv.dims(), dtype));
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            close(&f(a), &f(c), grad_tol);
        }
    }
    // Shapes that do not fit are refused, naming them.
    let qkv = Tensor::zeros((2, 5, 3 * 3 * 8), DType::F32, &dev).unwrap();
    let cos = Tensor::zeros((2, 1, 5, 4), DType::F32, &dev).unwrap();
    let e = recompute::split_heads_rotary(&qkv, &cos, &cos, 3, 0, Some(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rotary tables [2, 1, 5, 4]") && e.contains("3 of 8 dims"),
        "{e}"
    );
    let e = recompute::split_heads_rotary(&qkv, &cos, &cos, 5, 0, Some(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("part 0 of qkv [2, 5, 72] with 5 heads"), "{e}");
}

#[test]
fn recompute_gelu_matches_candle_gelu_with_gradients() {
    use candle_core::DType;
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
        let init = Tensor::randn(0f32, 2.5, (3, 7, 33), &dev).unwrap();
        let x = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 7, 33), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let rec = recompute::gelu_erf(&x).unwrap();
        let comp = x.gelu_erf().unwrap();
        assert_eq!((rec.dims(), rec.dtype()), (comp.dims(), dtype));
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // The forward pass is candle's kernel: the same values.
        close(&f(&rec), &f(&comp), 0.0);
        let dot = |t: Tensor| f(&(t * &r).unwrap()).sum_all().unwrap();
        let (gr, gc) = (dot(rec).backward().unwrap(), dot(comp).backward().unwrap());
        let (a, c) = (
            gr.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
        );
        assert_eq!((a.dims(), a.dtype()), (x.dims(), dtype));
        close(&f(a), &f(c), tol);
    }
    let x = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let e = recompute::gelu_erf_grad(&x, &Tensor::zeros(5, DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gelu-erf-grad: input [4] F32 and gradient [5] F32 differ"),
        "{e}"
    );
}

/// A (rows, bias) op against its composite: values within 1e-6 and the gradients of both
/// inputs, under a random linear functional of the output, within `grad_tol`.
fn check_bias_op(
    x_std: f32,
    fused: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    composite: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    grad_tol: f32,
) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, x_std, (3, 4, 6), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 6, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 4, 6), &dev).unwrap();
    let f = fused(&x, &b).unwrap();
    let c = composite(&x, &b).unwrap();
    close(&f, &c, 1e-6);
    close_grads(f, c, &r, &[&x, &b], grad_tol);
}

#[test]
fn linear_and_matmul_match_candle_with_gradients() {
    // Odd sizes: edge tiles of every micro-kernel in both directions.
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 29), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (45, 29), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 45, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1.0, (37, 45), &dev).unwrap();
    let composite = || x.matmul(&w.t().unwrap()).unwrap();
    let f = linear(&x, &w, &b).unwrap();
    let c = composite().broadcast_add(&b).unwrap();
    close(&f, &c, 1e-5);
    close_grads(f, c, &r, &[&x, &w, &b], 1e-5);
    let f = matmul_wt(&x, &w).unwrap();
    let c = composite();
    close(&f, &c, 1e-5);
    close_grads(f, c, &r, &[&x, &w], 1e-5);
}

#[test]
fn inference_attention_matches_the_composite_over_a_cache_view() {
    let dev = Device::Cpu;
    let (b, h, t, l, hs, cap) = (3, 2, 2, 7, 12, 10);
    let q = Tensor::randn(0f32, 1.0, (b, h, t, hs), &dev).unwrap();
    // Keys and values as prefix views of larger buffers, as the KV cache hands them out.
    let kbuf = Tensor::randn(0f32, 1.0, (b, h, cap, hs), &dev).unwrap();
    let vbuf = Tensor::randn(0f32, 1.0, (b, h, cap, hs), &dev).unwrap();
    let (k, v) = (kbuf.narrow(2, 0, l).unwrap(), vbuf.narrow(2, 0, l).unwrap());
    // Left padding on row 1 (its first two keys masked), causal over the last t positions.
    let mask = Tensor::new(&[[1u8; 7], [0, 0, 1, 1, 1, 1, 1], [1; 7]], &dev).unwrap();
    let bias = attention_bias(&mask, t).unwrap();
    let scale = 1.0 / (hs as f64).sqrt();
    let got = attention_inference(&q, &k, &v, &bias, scale).unwrap();
    let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let want = candle_nn::ops::softmax_last_dim(&scores)
        .unwrap()
        .matmul(&v.contiguous().unwrap())
        .unwrap();
    close(&got, &want, 1e-5);
}

#[test]
fn bias_gelu_matches_the_composite_with_gradients() {
    check_bias_op(2.0, bias_gelu, |x, b| x.broadcast_add(b)?.gelu_erf(), 1e-4);
}

// The recomputing ops of `overopt::model::recompute` (the CUDA training path), on the CPU.

/// softmax((q k^T) in f32 * scale + bias) v, the composite of `gpt_neox`'s attention.
fn composite_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
    let raw = q
        .matmul(&k.t().unwrap().contiguous().unwrap())
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let p = candle_nn::ops::softmax(
        &(raw * scale).unwrap().broadcast_add(bias).unwrap(),
        D::Minus1,
    )
    .unwrap();
    p.to_dtype(v.dtype()).unwrap().matmul(v).unwrap()
}

#[test]
fn recompute_attention_matches_the_composite_with_gradients() {
    use candle_core::DType;
    let dev = Device::Cpu;
    // 2 rows, 3 heads, 4 queries (the last 4 positions) over 6 keys; row 1 left-padded.
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], &dev).unwrap();
    let bias = attention_bias(&mask, 4).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
        let var = |t: usize| {
            Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 3, t, 8), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (var(4), var(6), var(6));
        let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let scale = 1.0 / 8f64.sqrt();
        let rec = recompute::attention(&q, &k, &v, &bias, scale).unwrap();
        let comp = composite_attention(&q, &k, &v, &bias, scale);
        assert_eq!(rec.dtype(), dtype);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        close(&f(&rec), &f(&comp), tol);
        let gr = (rec * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (comp * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            let (a, b) = (
                gr.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(a.dtype(), dtype);
            close(&f(a), &f(b), tol);
        }
        // Without tracked inputs no graph node is made and the values are the same.
        let plain = recompute::attention(
            &q.as_tensor().detach(),
            &k.as_tensor().detach(),
            &v.as_tensor().detach(),
            &bias,
            scale,
        )
        .unwrap();
        assert!(!plain.track_op());
        close(
            &f(&plain),
            &f(&composite_attention(&q, &k, &v, &bias, scale)),
            tol,
        );
    }
}

#[test]
fn recompute_linear_matches_candle_linear_with_gradients() {
    use candle_core::{DType, Module};
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
        let var = |shape: &[usize], std: f32| {
            let t = Tensor::randn(0f32, std, shape, &dev).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let (w, b) = (var(&[13, 29], 0.3), var(&[13], 1.0));
        // A contiguous (2, 5, 29) input, and a transposed view of a (29, 5) input: candle's
        // `Linear` takes a batched matmul there, the op reshapes (copies) to rows.
        let (x3, xt) = (var(&[2, 5, 29], 1.0), var(&[29, 5], 1.0));
        for x in [x3.as_tensor().clone(), xt.t().unwrap()] {
            let shape = x.dims().to_vec();
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = 13;
            let r = Tensor::randn(0f32, 1.0, out_shape.as_slice(), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let rec = recompute::linear(&x, &w, &b).unwrap();
            let comp = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
                .forward(&x)
                .unwrap();
            assert_eq!((rec.dims(), rec.dtype()), (out_shape.as_slice(), dtype));
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            close(&f(&rec), &f(&comp), tol);
            let gr = (rec * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (comp * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let leaf = if shape.len() == 3 { &x3 } else { &xt };
            for v in [leaf, &w] {
                let (a, c) = (
                    gr.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert_eq!((a.dims(), a.dtype()), (v.dims(), dtype));
                close(&f(a), &f(c), tol);
            }
            // The bias gradient, the column sums of r: against the exact (f32) sums, to one
            // rounding of the dtype. (candle's `Linear` sums bf16 in bf16, which is off by
            // more than that.)
            let db = gr.get(b.as_tensor()).unwrap();
            assert_eq!((db.dims(), db.dtype()), (b.dims(), dtype));
            let exact = f(&r).reshape(((), 13)).unwrap().sum(0).unwrap();
            let ulp = if dtype == DType::F32 {
                1e-6
            } else {
                1.0 / 256.0
            };
            close(&f(db), &exact, ulp);
        }
    }
    let x = Tensor::zeros((2, 28), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((13, 29), DType::F32, &dev).unwrap();
    let e = recompute::linear(&x, &w, &Tensor::zeros(13, DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("linear: input [2, 28], weight [13, 29]"), "{e}");
}

#[test]
fn recompute_label_logps_match_log_softmax_with_gradients() {
    let dev = Device::Cpu;
    let mut init = Tensor::randn(0f32, 3.0, (2, 5, 11), &dev).unwrap();
    let mask = Tensor::new(
        &[0f32, 0.0, -1e30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        &dev,
    )
    .unwrap();
    init = init.broadcast_add(&mask).unwrap();
    let x = Var::from_tensor(&init).unwrap();
    let targets = Tensor::new(&[[0u32, 3, 10, 7, 7], [1, 2, 9, 4, 0]], &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
    let rec = recompute::label_logps(&x, &targets).unwrap();
    let comp = candle_nn::ops::log_softmax(&x, D::Minus1)
        .unwrap()
        .gather(&targets.unsqueeze(D::Minus1).unwrap(), D::Minus1)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap();
    close(&rec, &comp, 1e-5);
    close_grads(rec, comp, &r, &[&x], 1e-4);
    // Bad targets are refused, naming the culprit.
    let beyond = Tensor::new(&[[0u32, 3, 11, 7, 7], [1, 2, 9, 4, 0]], &dev).unwrap();
    let e = recompute::label_logps(&x, &beyond).unwrap_err().to_string();
    assert!(
        e.contains("target 11") && e.contains("vocabulary of 11"),
        "{e}"
    );
    let short = Tensor::new(&[0u32, 1], &dev).unwrap();
    let e = recompute::label_logps(&x, &short).unwrap_err().to_string();
    assert!(e.contains("do not match"), "{e}");
}
