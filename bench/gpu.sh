#!/usr/bin/env bash
# P3 GPU benchmark, the one script to run on the GPU machine, from the repository root:
#
#   bash bench/gpu.sh [path/to/overopt-gpu-bench]     (default: bench/bin/overopt-gpu-bench)
#
# 1. LD_LIBRARY_PATH from the CUDA libraries of PyTorch's pip packages (site-packages/nvidia/*/lib);
#    when they lack libcurand.so.10 the stub in bench/bin/curand-stub is used (the bench never
#    draws device random numbers). The driver's libcuda.so.1 comes from the system.
# 2. overopt-gpu-bench: DPO step of Pythia-1B shape, batch 16 pairs x 512 tokens, bf16 autocast
#    (should it fail other than by running out of memory, again with `--op-path recompute`,
#    from which the summary then takes P3, saying so).
#    Then `--parity`: the CUDA step's loss and every gradient against the CPU's (f32, basic
#    ops) on a tiny model with ragged batches, on every op path, with and without
#    checkpointing, f32 and bf16 autocast. Then the step's parts (matmul, linear layers, MLP,
#    attention, layer norm, head with the log-probs, an add) timed one by one on both sides
#    (`--components`).
# 3. bench/gpu_torch.py: the same step in PyTorch eager (transformers GPTNeoXForCausalLM or its own
#    module), then larger Pythia shapes one step each until one does not fit.
# 4. overopt-gpu-bench on the larger shapes (1.4b, 2.8b, 6.9b) with activation checkpointing,
#    one step each, while time is left.
# 4b. When time is left, both sides' 1B step profiled (`--profile`): overopt's named sections
#    between device synchronisations, torch.profiler's ops with the most GPU time.
# 5. When time is left, A/B runs of the 1B step: with `--cuda-alloc default` (the driver's
#    memory pool returning freed memory at every synchronisation, as before the crate kept it),
#    with `--op-path recompute` (one graph node per recomputing op instead of one per layer),
#    then with `--op-path composite` (basic ops only, every intermediate kept).
# 6. A side-by-side summary; the last two lines are `P3 ratio=...` and `P3 mfu=...`.
#
# Peak memory: nvidia-smi's memory.used sampled every 200 ms during each part (the whole device),
# and what each side reports itself. Logs go to $OUT/p3 (or /tmp/p3). Whole run: under 6 minutes.
set -u
BIN=${1:-bench/bin/overopt-gpu-bench}
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/p3
mkdir -p "$LOG"
T0=$(date +%s)
DEADLINE=345 # seconds after start: no part may run past this
elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((DEADLINE - $(elapsed))); }

echo "== P3 GPU benchmark ($(date -u +%FT%TZ)), binary $BIN, logs in $LOG"
NVLIBS=$("$PY" - <<'EOF'
import glob, os
dirs = []
try:
    import nvidia
    for root in list(nvidia.__path__):
        for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
            if os.path.isdir(d):
                dirs.append(d)
except Exception as e:  # no pip CUDA packages: rely on the system's libraries
    print("no python nvidia packages:", e, file=__import__("sys").stderr)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
HAVE_CURAND=0
IFS=: read -ra _dirs <<<"$NVLIBS"
for d in "${_dirs[@]}"; do [ -e "$d/libcurand.so.10" ] && HAVE_CURAND=1; done
if [ "$HAVE_CURAND" = 0 ] && ! ldconfig -p 2>/dev/null | grep -q 'libcurand.so.10 '; then
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PWD/bench/bin/curand-stub"
  echo "libcurand.so.10 not among the CUDA libraries: using the stub bench/bin/curand-stub"
fi
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
if [ ! -x "$BIN" ]; then
  echo "ERROR: $BIN is missing or not executable (build it on a machine with the Rust toolchain: bash bench/build-gpu.sh)"
fi
echo "-- ldd $BIN (CUDA libraries, and any not found):"
ldd "$BIN" 2>&1 | grep -E 'not found|cuda|cublas|curand|nvrtc|cudart' | sed 's/^/   /'
# The crate's own kernels (one line per NVRTC module: GELU gradient, layer-norm gradient,
# attention softmax, bias add, QKV heads, RMSProp update) compile here with this machine's
# NVRTC; when they do not, the step uses candle's composite ops instead (and says so).
echo "-- $BIN --nvrtc-check:"
"$BIN" --nvrtc-check 2>&1 | grep -E '^(NVRTC|warning)' | sed 's/^/   /' || true

SMI_PID=""
smi_start() { # $1: file
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$1" 2>/dev/null &
    SMI_PID=$!
  fi
}
smi_stop() { # $1: file; prints peak GiB
  if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=""; fi
  awk 'BEGIN{m=0} $1+0>m{m=$1+0} END{if (m>0) printf "%.2f", m/1024; else printf "na"}' "$1" 2>/dev/null || echo na
}

run_part() { # $1: name, $2: timeout seconds, rest: command; output to $LOG/$1.log and the terminal
  local name=$1 t=$2
  shift 2
  if [ "$t" -lt 20 ]; then
    echo "RESULT impl=$name ok=0 oom=0 error=skipped_time_budget" | tee "$LOG/$name.log"
    return
  fi
  echo "== $name (timeout ${t}s, at $(elapsed)s): $*"
  smi_start "$LOG/$name.smi"
  timeout -k 5 "$t" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  local peak
  peak=$(smi_stop "$LOG/$name.smi")
  echo "SMI part=$name rc=$rc smi_peak_gib=$peak" | tee -a "$LOG/$name.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "   (timed out after ${t}s)"; fi
}

cap() { # min($1, time left)
  local l
  l=$(left)
  if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}

# Part 1: overopt, Pythia-1B shape.
run_part overopt-1b "$(cap 130)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 2 --steps 4
# Should the default op path fail other than by running out of memory (e.g. an op of the layer
# nodes that this GPU or driver refuses), the same step with one graph node per recomputing op
# (the eighth round's graph); the summary then takes P3 from it and says so.
if [ -x "$BIN" ] && ! grep -q 'RESULT impl=overopt shape=1b ok=1' "$LOG/overopt-1b.log" \
  && ! grep -q 'RESULT impl=overopt shape=1b ok=0 oom=1' "$LOG/overopt-1b.log"; then
  echo "   the default op path failed: the same step with --op-path recompute"
  run_part overopt-1b-recompute "$(cap 100)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 2 \
    --steps 4 --op-path recompute
fi
# Part 1b: the values of the CUDA step against the CPU's (a tiny model; seconds).
run_part parity "$(cap 30)" "$BIN" --shape tiny --batch 4 --seq 64 --parity
# Part 1c: the step's parts timed one by one on both sides (where the time goes).
run_part components-overopt "$(cap 35)" "$BIN" --shape 1b --batch 16 --seq 512 --steps 4 --components
run_part components-torch "$(cap 35)" "$PY" bench/gpu_torch.py --shape 1b --batch 16 --seq 512 \
  --steps 4 --components
# Part 2: PyTorch, same step, then the larger shapes.
run_part torch "$(cap 140)" "$PY" bench/gpu_torch.py --shape 1b --batch 16 --seq 512 \
  --warmup 2 --steps 4 --fit --fit-budget-s 75
# Part 3: overopt on larger shapes with activation checkpointing per layer (--checkpoint; the
# graph keeps one residual stream per layer), one step each, until one fails or time runs out.
if cat "$LOG"/overopt-1b*.log | grep -q 'RESULT impl=overopt shape=1b ok=1'; then
  for s in 1.4b 2.8b 6.9b; do
    if [ "$(left)" -lt 45 ]; then
      echo "RESULT impl=overopt shape=$s ok=0 oom=0 error=skipped_time_budget" | tee "$LOG/overopt-$s.log"
      break
    fi
    run_part "overopt-$s" "$(cap 75)" "$BIN" --shape "$s" --batch 16 --seq 512 --warmup 0 --steps 1 \
      --checkpoint
    grep -q "RESULT impl=overopt shape=$s ok=1" "$LOG/overopt-$s.log" || break
  done
fi

# Part 3b: where the time goes inside the step: overopt's named sections (layer norms, linear
# layers, attention, ... of the layer nodes; head; log-probs; optimizer), each timed between
# device synchronisations, and torch.profiler's ops with the most GPU time in one torch step.
if [ "$(left)" -ge 45 ]; then
  run_part profile-overopt "$(cap 50)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 1 --steps 1 \
    --profile
fi
if [ "$(left)" -ge 45 ]; then
  run_part profile-torch "$(cap 50)" "$PY" bench/gpu_torch.py --shape 1b --batch 16 --seq 512 \
    --warmup 1 --steps 1 --profile
fi

# Part 4a: the 1B step with the driver's default memory pool (freed memory handed back at every
# synchronisation, the setting of the 2026-11-29 run), an A/B of `overopt::cuda_device`'s pool.
if [ "$(left)" -ge 45 ]; then
  run_part overopt-1b-alloc-default "$(cap 60)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 1 \
    --steps 2 --cuda-alloc default
fi
# Part 4b: the 1B step with one graph node per recomputing op (attention, layer norm, linear
# layers, ...) rather than one per layer with its hand-written backward pass, the graph of the
# eighth round: an A/B of the layer nodes, when time is left (and not run already as the
# fallback of part 1).
if [ "$(left)" -ge 45 ] && [ ! -e "$LOG/overopt-1b-recompute.log" ]; then
  run_part overopt-1b-recompute "$(cap 60)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 1 \
    --steps 2 --op-path recompute
fi
# Part 4c: the 1B step with the graph of basic ops only (every intermediate kept), the path the
# CUDA step took before the recomputing attention, layer norm and log-probs.
if [ "$(left)" -ge 45 ]; then
  run_part overopt-1b-composite "$(cap 60)" "$BIN" --shape 1b --batch 16 --seq 512 --warmup 1 \
    --steps 2 --op-path composite
fi

echo "== summary (after $(elapsed)s)"
cat "$LOG"/*.log | grep -E '^(RESULT|SMI|COMPONENT|PARITY|PROFILE) ' >"$LOG/results.txt"
"$PY" - "$LOG/results.txt" <<'EOF'
import sys
rows, smi, comps, parity, prof = [], {}, {}, [], {}
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
    if line.startswith("PARITY"):
        parity.append(kv)
    elif line.startswith("PROFILE"):
        prof.setdefault(kv.get("impl"), []).append(kv)
    elif line.startswith("RESULT"):
        rows.append(kv)
    elif line.startswith("COMPONENT"):
        comps.setdefault(kv.get("name"), {})[kv.get("impl")] = kv
    else:
        smi[kv.get("part")] = kv.get("smi_peak_gib", "na")
if comps:
    print("components (ms; TFLOP/s or GB/s), overopt vs torch, and torch's time over overopt's:")
    for name, by in comps.items():
        o_, t_ = by.get("overopt", {}), by.get("torch", {})
        def cell(c):
            if not c:
                return "na"
            rate = c["tflops"] + " TF/s" if float(c.get("tflops", 0)) > 0 else c.get("gbps", "0") + " GB/s"
            return f"{c['ms']} ms ({rate})"
        try:
            r = f"{float(t_['ms']) / float(o_['ms']):.2f}"
        except (KeyError, ValueError, ZeroDivisionError):
            r = "na"
        print(f"  {name:22}{cell(o_):>26}{cell(t_):>26}   ratio {r}")
for impl, top, what in [("overopt", 40, "sections of the step, own time between device syncs"),
                        ("torch", 15, "ops with the most GPU self time in one step")]:
    if impl in prof:
        print(f"profile {impl} ({what}):")
        for p in prof[impl][:top]:
            print(f"  {p.get('name', '?'):44}{p.get('ms_per_step', 'na'):>12} ms{p.get('share', 'na'):>9}"
                  f"  x{p.get('calls_per_step', '?')}")
if parity:
    bad = [p for p in parity if p.get("ok") != "1"]
    print(f"parity on {parity[0].get('device')} against the CPU (f32, basic ops): "
          f"{len(parity) - len(bad)} of {len(parity)} configurations within tolerance")
    for p in parity:
        if p.get("check") == "rmsprop":
            print(f"  RMSProp update ({p.get('steps')} steps, fused on the device): "
                  f"param_rel {p.get('param_rel')}, state_rel {p.get('state_rel')} (tol {p.get('tol')})"
                  + ("" if p.get("ok") == "1" else "  FAILED"))
            continue
        print(f"  autocast {p.get('autocast')}, {p.get('op_path')}, checkpoint {p.get('checkpoint')}: "
              f"loss_rel {p.get('loss_rel')}, grad_rel {p.get('grad_rel')} (tol {p.get('tol')})"
              + ("" if p.get("ok") == "1" else f"  FAILED at {p.get('worst_param')}"))
else:
    print("parity: no result (see parity.log)")
def get(impl, shape, variant=None):
    for r in rows:
        if r.get("impl") == impl and r.get("shape") == shape and r.get("variant") == variant:
            return r
    return {}
for r in rows:  # overopt's default settings are the ones compared; others are A/B rows
    if r.get("profile", "0") == "1":  # slowed by the profile's synchronisations
        r["variant"] = "profile"
    elif r.get("op_path", "differentiable") != "differentiable":
        r["variant"] = r["op_path"]
    elif r.get("cuda_alloc", "keep") != "keep":
        r["variant"] = "alloc-" + r["cuda_alloc"]
print(f"{'':24}{'overopt (candle)':>20}{'torch eager':>20}")
o, t = get("overopt", "1b"), get("torch", "1b")
if o.get("ok") != "1" and get("overopt", "1b", "recompute").get("ok") == "1":
    print(f"the default op path failed ({o.get('error', 'no result')}); P3 below is the step "
          "with --op-path recompute (one graph node per recomputing op)")
    o = get("overopt", "1b", "recompute")
for key, label in [("step_s", "s/step"), ("examples_per_s", "examples/s"), ("tflops", "TFLOP/s (6NT)"),
                   ("mfu", "MFU (6NT/989)"), ("mfu_attn", "MFU incl. attention"),
                   ("peak_mem_gib", "peak mem GiB (self)"), ("loss", "loss (last step)")]:
    print(f"{label:24}{o.get(key, 'na'):>20}{t.get(key, 'na'):>20}")
print(f"{'peak mem GiB (smi)':24}{smi.get('overopt-1b', 'na'):>20}{smi.get('torch', 'na'):>20}")
for variant, what in [("alloc-default", "freed memory kept in the pool vs handed back at every sync (driver default)"),
                      ("recompute", "op path differentiable (layer nodes) vs recompute (a node per op)"),
                      ("composite", "op path differentiable (layer nodes) vs composite (basic ops)")]:
    c = get("overopt", "1b", variant)
    print(f"A/B overopt 1b, {what}: "
          + ", ".join(f"{k} {o.get(k, 'na')} vs {c.get(k, 'na')}"
                      for k in ["step_s", "graph_gib", "peak_mem_gib", "ok"]))
def largest(impl):
    best = "none"
    for s in ["1b", "1.4b", "2.8b", "6.9b"]:
        if get(impl, s).get("ok") == "1":
            best = s
    return best
for impl in ["overopt", "torch"]:
    tried = [f"{s}:{'ok' if get(impl, s).get('ok') == '1' else get(impl, s).get('error', 'oom' if get(impl, s).get('oom') == '1' else 'failed')}"
             for s in ["1b", "1.4b", "2.8b", "6.9b"] if get(impl, s)]
    note = " (1.4b and up with activation checkpointing)" if impl == "overopt" else ""
    print(f"fit {impl}: largest={largest(impl)} ({', '.join(tried)}){note}")
print(f"P3 fit overopt={largest('overopt')} torch={largest('torch')}")
try:
    ratio = f"{float(o['examples_per_s']) / float(t['examples_per_s']):.4f}"
except (KeyError, ValueError, ZeroDivisionError):
    ratio = "na"
print(f"P3 ratio={ratio}")
print(f"P3 mfu={o.get('mfu', 'na')}")
EOF
