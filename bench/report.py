"""Helpers of bench/run.sh (standard library only).

    python bench/report.py measure RSS_FILE -- CMD...   run CMD, append its peak RSS (KiB)
    python bench/report.py summary RESULTS RSS_FILE       print the comparison and ratio lines
"""

import json
import os
import resource
import subprocess
import sys


def measure(rss_file, label, cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rc = subprocess.call(cmd)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if rc != 0:
        sys.exit(rc)
    if peak < before:
        peak = before
    with open(rss_file, "a") as f:
        f.write(json.dumps({"label": label, "peak_rss_kib": peak}) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(results_path, rss_path):
    res = read_jsonl(results_path)
    rss = {r["label"]: r["peak_rss_kib"] for r in read_jsonl(rss_path)}
    by = {(r["side"], r["bench"], r["size"]): r for r in res}
    sizes = [r["size"] for r in res if r["side"] == "overopt" and r["bench"] == "p1"]
    print()
    print("P1  one DPO optimizer step (batch of pairs; overopt runs each prompt once for both responses, torch the concatenated rows), median")
    print(f"    {'size':<8}{'params':>9}{'overopt ex/s':>14}{'torch ex/s':>12}{'ratio':>8}"
          f"   overopt fwd/bwd/opt ms")
    ratios = {}
    for s in sizes:
        o, t = by[("overopt", "p1", s)], by[("torch", "p1", s)]
        ratios[s] = o["examples_per_s"] / t["examples_per_s"]
        ph = "/".join(f"{1e3 * o.get(k, float('nan')):.0f}"
                      for k in ("forward_s", "backward_s", "optimizer_s"))
        print(f"    {s:<8}{o['n_params']:>9}{o['examples_per_s']:>14.1f}"
              f"{t['examples_per_s']:>12.1f}{ratios[s]:>8.2f}   {ph}")
    o2 = next(r for r in res if r["side"] == "overopt" and r["bench"] == "p2")
    t2 = next(r for r in res if r["side"] == "torch" and r["bench"] == "p2")
    r2 = o2["tokens_per_s"] / t2["tokens_per_s"]
    print()
    print(f"P2  sampling: {o2['prompts']} prompts x {o2['prompt_len']} tokens, "
          f"{o2['new_tokens']} new tokens each (EOS disabled on both sides), top-k 50, T=1, "
          f"model {o2['size']}, median")
    print(f"    overopt {o2['tokens_per_s']:.0f} tokens/s ({o2['tokens']} tokens in "
          f"{o2['median_s']:.3f} s); torch {t2['tokens_per_s']:.0f} tokens/s "
          f"({t2['tokens']} tokens in {t2['median_s']:.3f} s)")
    gemm = [r for r in res if r["side"] == "overopt" and r["bench"] == "gemm"]
    if gemm:
        print()
        print(f"G   x @ w^T on the largest model's linear layers, GFLOP/s, median "
              f"(overopt kernel: {gemm[0]['kernel']}; candle's matmul is the gemm crate)")
        print(f"    {'rows x k x n':<16}{'overopt':>9}{'candle':>9}{'torch':>9}{'ratio':>8}")
        for o in gemm:
            t = by.get(("torch", "gemm", o["size"]))
            tg = t["gflops"] if t else float("nan")
            print(f"    {o['size']:<16}{o['gflops']:>9.1f}{o['candle_gflops']:>9.1f}"
                  f"{tg:>9.1f}{o['gflops'] / tg:>8.2f}")
    print()
    print("P6  peak RSS, each side and workload in its own process")
    r6 = {}
    for w in ("p1", "p2"):
        o, t = rss[f"overopt-{w}"], rss[f"torch-{w}"]
        r6[w] = t / o
        print(f"    {w}: overopt {o / 1024:.0f} MiB, torch {t / 1024:.0f} MiB, "
              f"ratio {r6[w]:.2f}")
    print()
    for s in sizes:
        print(f"P1[{s}] ratio={ratios[s]:.2f}")
    print(f"P1 ratio={min(ratios.values()):.2f}")
    print(f"P2 ratio={r2:.2f}")
    for w in ("p1", "p2"):
        print(f"P6[{w}] ratio={r6[w]:.2f}")
    print(f"P6 ratio={min(r6.values()):.2f}")


def main():
    if len(sys.argv) >= 5 and sys.argv[1] == "measure" and sys.argv[4] == "--":
        measure(sys.argv[2], sys.argv[3], sys.argv[5:])
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
