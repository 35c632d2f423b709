"""PyTorch / transformers reference for bench/run.sh: the same workloads as benches/perf.rs.

    python bench/torch_ref.py p1 --data bench/out/data.json [--out results.jsonl]
    python bench/torch_ref.py p2 --data bench/out/data.json [--out results.jsonl]

p1: one DPO optimizer step per model size with HF GPTNeoXForCausalLM: forward + backward over
    chosen and rejected (one concatenated right-padded batch, EOS appended to each response),
    reference log-probs precomputed, clip_grad_norm_(10), torch.optim.RMSprop.
p2: model.generate(do_sample=True, top_k=50, temperature=1) on equal-length prompts, EOS
    stopping disabled (eos_token_id=None), so every prompt gets exactly the new-token count.

Threads: BENCH_THREADS (torch.set_num_threads). Results are JSON lines.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM


def threads():
    n = int(os.environ.get("BENCH_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def build_model(cfg_json, seed=0):
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**{k: v for k, v in cfg_json.items() if k != "architectures"})
    model = GPTNeoXForCausalLM(cfg)
    return model.float()


def collate(prompts, responses, eos, pad):
    """Right-padded prompt ++ response ++ EOS, as overopt::model::score::collate."""
    seqs = [(list(p) + list(r) + [eos], len(p)) for p, r in zip(prompts, responses)]
    b = len(seqs)
    t = max(len(s) for s, _ in seqs)
    ids = torch.full((b, t), pad, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    targets = torch.full((b, t - 1), pad, dtype=torch.long)
    lmask = torch.zeros((b, t - 1), dtype=torch.float32)
    for i, (s, pl) in enumerate(seqs):
        n = len(s)
        ids[i, :n] = torch.tensor(s)
        mask[i, :n] = 1
        targets[i, : n - 1] = torch.tensor(s[1:])
        lmask[i, pl - 1 : n - 1] = 1.0
    return ids, mask, targets, lmask


def seq_logps(model, ids, mask, targets, lmask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked * lmask).sum(1)


def pair_batch(batch, eos, pad):
    prompts = [ex["prompt"] for ex in batch] * 2
    responses = [ex["chosen"] for ex in batch] + [ex["rejected"] for ex in batch]
    return collate(prompts, responses, eos, pad)


def p1(w, out, nthreads):
    bs = len(w["batches"][0])
    for s in w["sizes"]:
        policy = build_model(s["config"], 0)
        reference = build_model(s["config"], 0)
        reference.load_state_dict(policy.state_dict())
        reference.eval()
        policy.train()  # dropout probabilities are 0 in the config
        refs = []
        with torch.no_grad():
            for batch in w["batches"]:
                lp = seq_logps(reference, *pair_batch(batch, w["eos"], w["pad"]))
                refs.append((lp[:bs].clone(), lp[bs:].clone()))
        opt = torch.optim.RMSprop(
            policy.parameters(), lr=w["lr"], alpha=w["alpha"], eps=w["eps"]
        )
        beta = w["beta"]
        times, losses = [], []
        for step in range(w["p1_warmup"] + w["p1_steps"]):
            b = step % len(w["batches"])
            t0 = time.perf_counter()
            lp = seq_logps(policy, *pair_batch(w["batches"][b], w["eos"], w["pad"]))
            pw, pl = lp[:bs], lp[bs:]
            rw, rl = refs[b]
            h = (pw - rw) - (pl - rl)
            loss = -F.logsigmoid(beta * h).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), w["max_grad_norm"])
            opt.step()
            lv = loss.item()
            if not (torch.isfinite(norm) and lv == lv):
                raise SystemExit(f"non-finite loss {lv} or grad norm {norm}")
            dt = time.perf_counter() - t0
            if step >= w["p1_warmup"]:
                times.append(dt)
            losses.append(lv)
        med = statistics.median(times)
        line = {
            "side": "torch", "bench": "p1", "size": s["name"], "n_params": s["n_params"],
            "batch": bs, "threads": nthreads, "median_s": med, "examples_per_s": bs / med,
            "first_loss": losses[0], "last_loss": losses[-1],
            "attn_implementation": policy.config._attn_implementation,
        }
        print(json.dumps(line), file=out, flush=True)


def p2(w, out, nthreads):
    s = next(x for x in w["sizes"] if x["name"] == w["p2_size"])
    model = build_model(s["config"], 0).eval()
    prompts = torch.tensor(w["p2_prompts"], dtype=torch.long)
    n, plen = prompts.shape
    new = w["p2_new_tokens"]
    gc = GenerationConfig(
        do_sample=True, top_k=w["p2_top_k"], temperature=1.0, max_new_tokens=new,
        eos_token_id=None, pad_token_id=w["pad"], use_cache=True,
    )
    times = []
    for rep in range(w["p2_warmup"] + w["p2_reps"]):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        with torch.no_grad():
            seqs = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gc
            )
        dt = time.perf_counter() - t0
        if tuple(seqs.shape) != (n, plen + new):
            raise SystemExit(f"generate returned shape {tuple(seqs.shape)}, expected {(n, plen + new)}")
        if rep >= w["p2_warmup"]:
            times.append(dt)
    med = statistics.median(times)
    line = {
        "side": "torch", "bench": "p2", "size": w["p2_size"], "prompts": n, "prompt_len": plen,
        "new_tokens": new, "threads": nthreads, "median_s": med, "tokens": n * new,
        "tokens_per_s": n * new / med, "attn_implementation": model.config._attn_implementation,
    }
    print(json.dumps(line), file=out, flush=True)


def gemm(w, out, nthreads):
    for rows, k, n in w.get("gemm_shapes", []):
        x, wt = torch.randn(rows, k), torch.randn(n, k)
        ts = []
        for i in range(35):
            t0 = time.perf_counter()
            x @ wt.t()
            if i >= 5:
                ts.append(time.perf_counter() - t0)
        line = {"side": "torch", "bench": "gemm", "size": f"{rows}x{k}x{n}", "threads": nthreads,
                "gflops": 2 * rows * k * n / statistics.median(ts) / 1e9}
        print(json.dumps(line), file=out, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["p1", "p2", "gemm", "versions"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = ap.parse_args()
    n = threads()
    if a.cmd == "versions":
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"python {sys.version.split()[0]}")
        return
    with open(a.data) as f:
        w = json.load(f)
    out = open(a.out, "a") if a.out else sys.stdout
    {"p1": p1, "p2": p2, "gemm": gemm}[a.cmd](w, out, n)


if __name__ == "__main__":
    main()
