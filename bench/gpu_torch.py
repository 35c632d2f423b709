"""P3 baseline: the DPO optimizer step of `overopt-gpu-bench` in PyTorch eager.

One step = policy forward + backward over chosen and rejected (one concatenated batch of
2 x batch sequences of `seq` tokens; reference log-probs are precomputed constants), the DPO
loss (-log sigmoid(beta * margin), mean over pairs), global grad-norm clipping at 10 and a
torch.optim.RMSprop update. Master weights and optimizer state are f32; the forward runs under
torch.autocast(bfloat16). The model is Hugging Face transformers' GPTNeoXForCausalLM (its
default attention implementation) or, when transformers is missing or --impl own is given, a
small GPT-NeoX written below with the same shapes.

Prints `RESULT impl=torch shape=... ok=1 ...` lines (parsed by bench/gpu.sh). With --fit it
then tries each larger shape for one step, in order, until one fails (out of memory).
"""

import argparse
import gc
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    # hidden, layers, heads, intermediate, vocab
    "tiny": (64, 2, 4, 256, 512),
    "1b": (2048, 16, 8, 8192, 50304),
    "1.4b": (2048, 24, 16, 8192, 50304),
    "2.8b": (2560, 32, 32, 10240, 50304),
    "6.9b": (4096, 32, 32, 16384, 50432),
}
FIT_ORDER = ["1b", "1.4b", "2.8b", "6.9b"]


class OwnNeoX(nn.Module):
    """A minimal GPT-NeoX: partial rotary (rotate-half), parallel residual, exact GELU."""

    def __init__(self, h, n_layers, n_heads, inter, vocab, rotary_pct=0.25, max_pos=2048):
        super().__init__()
        self.n_heads, self.hs = n_heads, h // n_heads
        self.rot = int(self.hs * rotary_pct)
        self.embed_in = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            layer = nn.Module()
            layer.ln1, layer.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
            layer.qkv, layer.dense = nn.Linear(h, 3 * h), nn.Linear(h, h)
            layer.up, layer.down = nn.Linear(h, inter), nn.Linear(inter, h)
            self.layers.append(layer)
        self.final_ln = nn.LayerNorm(h)
        self.embed_out = nn.Linear(h, vocab, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.rot, 2).float() / self.rot))
        freqs = torch.outer(torch.arange(max_pos).float(), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def rope(self, x, cos, sin):
        xr, xp = x[..., : self.rot], x[..., self.rot :]
        x1, x2 = xr.chunk(2, dim=-1)
        xr = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([xr, xp], dim=-1)

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed_in(ids)
        cos, sin = self.cos[:t], self.sin[:t]
        for l in self.layers:
            a_in = l.ln1(x)
            qkv = l.qkv(a_in).view(b, t, self.n_heads, 3 * self.hs).transpose(1, 2)
            q, k, v = qkv.split(self.hs, dim=-1)
            cs, sn = cos.to(q.dtype), sin.to(q.dtype)
            q, k = self.rope(q, cs, sn), self.rope(k, cs, sn)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            attn = l.dense(o.transpose(1, 2).reshape(b, t, -1))
            mlp = l.down(F.gelu(l.up(l.ln2(x))))
            x = x + attn + mlp
        return self.embed_out(self.final_ln(x))


def build(shape, impl, device):
    h, n_layers, n_heads, inter, vocab = SHAPES[shape]
    if impl == "hf":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=h,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=inter,
            hidden_act="gelu",
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            initializer_range=0.02,
            tie_word_embeddings=False,
            rotary_pct=0.25,
            rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
            use_cache=False,
        )
        with torch.device(device):
            model = GPTNeoXForCausalLM(cfg)
        model.train()
        attn = getattr(model.config, "_attn_implementation", "?")

        def fwd(ids):
            return model(input_ids=ids, use_cache=False).logits

        return model, fwd, f"transformers GPTNeoXForCausalLM (attn {attn})"
    with torch.device(device):
        model = OwnNeoX(h, n_layers, n_heads, inter, vocab)
    model.train()
    return model, model, "own GPT-NeoX module (sdpa attention)"


def run(shape, args, device, impl, steps, warmup):
    torch.manual_seed(0)
    batch, seq = args.batch, args.seq
    model, fwd, desc = build(shape, impl, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed_in = SHAPES[shape][4] * SHAPES[shape][0]
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-6, alpha=0.99, eps=1e-8)
    vocab = SHAPES[shape][4]
    g = torch.Generator().manual_seed(7)
    pl = seq // 2
    rl = seq - pl - 1
    prompt = torch.randint(2, vocab, (batch, pl), generator=g)
    chosen = torch.randint(2, vocab, (batch, rl), generator=g)
    rejected = torch.randint(2, vocab, (batch, rl), generator=g)
    eos = torch.zeros((batch, 1), dtype=torch.long)
    ids = torch.cat(
        [torch.cat([prompt, chosen, eos], 1), torch.cat([prompt, rejected, eos], 1)], 0
    ).to(device)
    targets = ids[:, 1:]
    label_mask = torch.zeros_like(targets, dtype=torch.float32)
    label_mask[:, pl - 1 :] = 1.0  # positions predicting response tokens and EOS
    ref = torch.tensor([[-2000.0 - i, -2001.0] for i in range(batch)], device=device)
    beta = 0.1
    use_cuda = device.startswith("cuda")
    amp = torch.autocast(device_type="cuda" if use_cuda else "cpu", dtype=torch.bfloat16)

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    tokens = 2 * batch * seq
    n_matmul = n_params - n_embed_in
    flops = 6.0 * n_matmul * tokens
    flops_attn = 12.0 * SHAPES[shape][1] * SHAPES[shape][0] * seq * tokens
    print(
        f"torch: shape {shape} ({n_params} params, {n_matmul} excl. input embedding), {desc}, "
        f"device {device}, autocast bf16, batch {batch} pairs x seq {seq} = {tokens} tokens/step",
        flush=True,
    )
    def step():
        sync()
        t0 = time.perf_counter()
        with amp:
            logits = fwd(ids)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * label_mask
        seq_lp = tok.sum(1)
        pw, pll = seq_lp[:batch], seq_lp[batch:]
        margin = (pw - ref[:, 0]) - (pll - ref[:, 1])
        loss = -F.logsigmoid(beta * margin).mean()
        del logits, logp, tok
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return (t0, t1, t2, t3), loss, gn

    times = []
    loss_v = float("nan")
    for s in range(warmup + steps):
        (t0, t1, t2, t3), loss, gn = step()
        loss_v = loss.item()
        kind = "warmup" if s < warmup else "timed"
        print(
            f"{kind} step {s + 1}: {t3 - t0:.3f}s (fwd {t1 - t0:.3f}s, bwd {t2 - t1:.3f}s, "
            f"optim {t3 - t2:.3f}s) loss {loss_v:.4f} grad_norm {gn.item():.3f}",
            flush=True,
        )
        if not math.isfinite(loss_v):
            raise RuntimeError(f"non-finite loss {loss_v}")
        if s >= warmup:
            times.append(t3 - t0)
    if args.profile:
        profile_step(step, use_cuda)
    step_s = sum(times) / len(times) if times else float("nan")
    ex_s = batch / step_s
    tflops = flops / step_s / 1e12
    mfu = tflops / args.peak_tflops
    mfu_attn = (flops + flops_attn) / step_s / 1e12 / args.peak_tflops
    alloc = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if use_cuda else float("nan")
    print(
        f"mean of {len(times)} timed steps: {step_s:.3f}s/step, {ex_s:.2f} examples/s; "
        f"FLOPs/step = 6*N*T = {flops:.3e} (+ attention {flops_attn:.3e}); {tflops:.1f} TFLOP/s; "
        f"MFU {mfu:.4f} ({mfu_attn:.4f} incl. attention); peak allocated {alloc:.2f} GiB, "
        f"reserved {reserved:.2f} GiB",
        flush=True,
    )
    print(
        f"RESULT impl=torch shape={shape} ok=1 batch={batch} seq={seq} step_s={step_s:.4f} "
        f"examples_per_s={ex_s:.3f} tflops={tflops:.2f} mfu={mfu:.4f} mfu_attn={mfu_attn:.4f} "
        f"peak_mem_gib={reserved:.2f} peak_alloc_gib={alloc:.2f} loss={loss_v:.4f} "
        f"profile={int(args.profile)}",
        flush=True,
    )
    del model, opt, fwd
    return True


def profile_step(step, use_cuda, top=30):
    """One more step under torch.profiler: the ops (kernels on a GPU) with the most self time,
    as `PROFILE impl=torch name=... ms_per_step=... calls_per_step=... share=...` lines (share
    of the step's summed self time), the counterpart of `overopt-gpu-bench --profile`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=acts) as prof:
        step()

    def own(e):  # microseconds
        if use_cuda:
            t = getattr(e, "self_device_time_total", None)
            return t if t is not None else getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    events = [e for e in prof.key_averages() if own(e) > 0]
    if use_cuda:  # the kernels themselves, not also the ops that launched them
        from torch.autograd import DeviceType

        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        events = kernels or events
    total = sum(own(e) for e in events) or 1.0
    print(f"profile of one step ({'device' if use_cuda else 'CPU'} self time by op), top {top} "
          f"of {len(events)}, summed {total / 1e3:.1f} ms:", flush=True)
    for e in sorted(events, key=own, reverse=True)[:top]:
        name = "".join(c if c.isalnum() or c in "._:-" else "_" for c in e.key)[:80]
        print(f"PROFILE impl=torch name={name} ms_per_step={own(e) / 1e3:.3f} "
              f"calls_per_step={e.count} share={own(e) / total:.4f}", flush=True)
    print(f"PROFILE impl=torch name=step_total ms_per_step={total / 1e3:.3f} calls_per_step=0 "
          f"share=1.0000", flush=True)


def components(args, device):
    """The parts of the step timed one by one, at the shapes of `overopt-gpu-bench --components`
    (the same token rows, attention and head shapes): lines `COMPONENT impl=torch name=... ms=...`."""
    h, _, nh, inter, vocab = SHAPES[args.shape]
    hs = h // nh
    q_len, k_len = args.seq // 2, args.seq
    rows = 2 * args.batch
    t = args.batch * q_len + rows * q_len
    t_resp = rows * q_len
    use_cuda = device.startswith("cuda")
    amp = torch.autocast(device_type="cuda" if use_cuda else "cpu", dtype=torch.bfloat16)
    reps = max(args.steps, 1)
    torch.manual_seed(0)

    def var(*shape):
        return (torch.randn(*shape, device=device) * 0.02).requires_grad_()

    def timed(f):
        f()
        if use_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        if use_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    def report(name, sec, flops=0.0, nbytes=0.0):
        print(f"COMPONENT impl=torch name={name} ms={sec * 1e3:.3f} tflops={flops / sec / 1e12:.2f} "
              f"gbps={nbytes / sec / 1e9:.1f}", flush=True)

    print(f"torch --components: shape {args.shape}, T = {t} token rows, attention {rows} x {nh} heads x "
          f"{q_len} queries x {k_len} keys, autocast bf16, device {device}, {reps} reps each", flush=True)
    x = var(t, h)
    w4 = var(inter, h)
    xb, wb = x.detach().bfloat16(), w4.detach().bfloat16().t()
    report("matmul_T_h_4h", timed(lambda: xb @ wb), 2.0 * t * h * inter)
    wqkv, bqkv = var(3 * h, h), var(3 * h)

    def lin_qkv():
        with amp:
            y = F.linear(x, wqkv, bqkv)
        y.float().sum().backward()

    report("linear_qkv_fwd_bwd", timed(lin_qkv), 6.0 * t * h * 3 * h)
    b4, wd, bd = var(inter), var(h, inter), var(h)

    def mlp():
        with amp:
            y = F.linear(F.gelu(F.linear(x, w4, b4)), wd, bd)
        y.float().sum().backward()

    report("mlp_fwd_bwd", timed(mlp), 6.0 * 2 * t * h * inter)
    q = var(rows, nh, q_len, hs).detach().bfloat16().requires_grad_()
    k = var(rows, nh, k_len, hs).detach().bfloat16().requires_grad_()
    v = var(rows, nh, k_len, hs).detach().bfloat16().requires_grad_()
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)

    def attn():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y.float().sum().backward()

    report("attention_fwd_bwd", timed(attn), 3.0 * 4.0 * rows * nh * q_len * k_len * hs)
    lw, lb = var(h), var(h)

    def ln():
        F.layer_norm(x, (h,), lw, lb, 1e-5).sum().backward()

    report("layer_norm_fwd_bwd", timed(ln), 0.0, 5.0 * t * h * 4)
    xr, w_out = var(t_resp, h), var(vocab, h)
    targets = (torch.arange(t_resp, device=device) * 7919) % vocab

    def head():
        with amp:
            logits = F.linear(xr, w_out)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1))
        lp.sum().backward()

    report("head_logps_fwd_bwd", timed(head), 6.0 * t_resp * h * vocab)
    y = x.detach() + 1.0
    report("add_f32_T_h", timed(lambda: x.detach() + y), 0.0, 3.0 * t * h * 4)


def free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impl", default="auto", choices=["auto", "hf", "own"])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--fit", action="store_true", help="then try larger shapes, one step each")
    ap.add_argument("--fit-budget-s", type=float, default=120.0, help="stop starting fit tries after this")
    ap.add_argument("--tiny", action="store_true", help="--device cpu --shape tiny --batch 2 --seq 32")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, one more under torch.profiler: PROFILE lines")
    ap.add_argument("--components", action="store_true",
                    help="time the step's parts one by one (as overopt-gpu-bench --components)")
    args = ap.parse_args()
    if args.tiny:
        args.device, args.shape, args.batch, args.seq, args.warmup, args.steps = "cpu", "tiny", 2, 32, 1, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("RESULT impl=torch shape=%s ok=0 oom=0 error=no_CUDA_device" % args.shape, flush=True)
        sys.exit(1)
    impl = args.impl
    if impl == "auto":
        try:
            import transformers  # noqa: F401

            impl = "hf"
        except ImportError:
            impl = "own"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), impl {impl}", flush=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    if args.components:
        components(args, args.device)
        return
    start = time.perf_counter()
    shapes = [args.shape]
    if args.fit:
        shapes += [s for s in FIT_ORDER[FIT_ORDER.index(args.shape) + 1 :]] if args.shape in FIT_ORDER else []
    for i, shape in enumerate(shapes):
        if i > 0 and time.perf_counter() - start > args.fit_budget_s:
            print(f"RESULT impl=torch shape={shape} ok=0 oom=0 error=skipped_time_budget", flush=True)
            break
        steps, warmup = (args.steps, args.warmup) if i == 0 else (1, 0)
        try:
            run(shape, args, args.device, impl, steps, warmup)
        except torch.cuda.OutOfMemoryError as e:
            print(f"torch: {shape}: out of memory: {str(e).splitlines()[0]}", flush=True)
            print(f"RESULT impl=torch shape={shape} ok=0 oom=1 error=out_of_memory", flush=True)
            free(args.device)
            break
        except Exception as e:  # noqa: BLE001 - report and stop, like an OOM
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"torch: {shape}: failed: {msg}", flush=True)
            oom = int("out of memory" in msg.lower())
            print(f"RESULT impl=torch shape={shape} ok=0 oom={oom} error={msg[:160].replace(' ', '_')}", flush=True)
            free(args.device)
            if i == 0:
                sys.exit(2)
            break
        free(args.device)


if __name__ == "__main__":
    main()
