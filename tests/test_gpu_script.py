"""Checks of bench/gpu.sh, the P3 script that runs once on a lent GPU machine.

    python3 tests/test_gpu_script.py            (environment/test.sh)
    python -m pytest tests/test_gpu_script.py   (where pytest exists)

No GPU here, so the script runs in a temporary copy of the repository layout against two
stand-ins that print what the real programs print: a bench binary (RESULT and COMPONENT lines
whose numbers depend on its arguments) and a bench/gpu_torch.py. Checked: the summary's P3
lines (ratio, MFU, the largest shape that fits on each side), that the larger shapes stop at
the first one that does not fit, the parity check's verdicts, that each A/B run is matched with its own row (driver-default
memory pool; per-op and composite op paths), the components table, and that the parts' arguments are the
ones the docs describe (Pythia-1B, 16 pairs x 512 tokens, checkpointing for the larger shapes).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

FAKE_BENCH = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.txt"
shape=1b op=differentiable alloc=keep ck=0 comp=0 par=0 prof=0
while [ $# -gt 0 ]; do
  case $1 in
    --profile) prof=1 ;;
    --shape) shape=$2; shift ;;
    --op-path) op=$2; shift ;;
    --cuda-alloc) alloc=$2; shift ;;
    --checkpoint) ck=1 ;;
    --components) comp=1 ;;
    --parity) par=1 ;;
    --nvrtc-check) echo "NVRTC module=overopt_gelu ptx_bytes=6384 ok=1"; exit 0 ;;
  esac
  shift
done
if [ $par = 1 ]; then
  echo "PARITY device=cuda:0 autocast=off op_path=recompute checkpoint=0 loss=0.4 loss_ref=0.4 loss_rel=1e-7 grad_rel=2e-6 worst_param=w tol=1e-4 ok=1"
  echo "PARITY device=cuda:0 autocast=bf16 op_path=differentiable checkpoint=1 loss=0.4 loss_ref=0.4 loss_rel=1e-3 grad_rel=9e-2 worst_param=layers.0.mlp.bias tol=5e-2 ok=0"
  echo "PARITY device=cuda:0 check=rmsprop steps=2 param_rel=3.1e-8 state_rel=0.0e0 tol=1e-5 ok=1"
  echo "RESULT impl=overopt-parity shape=$shape ok=0 device=cuda:0 worst_over_tol=1.8"
  exit 2
fi
if [ $comp = 1 ]; then
  echo "COMPONENT impl=overopt name=matmul ms=2.000 tflops=500.0 gbps=0"
  echo "COMPONENT impl=overopt name=add ms=1.000 tflops=0 gbps=2000.0"
  exit 0
fi
if [ "$shape" = 1b ] && [ $op = differentiable ] && [ -n "${FAKE_FAIL_DEFAULT:-}" ]; then
  echo "RESULT impl=overopt shape=$shape ok=0 oom=0 error=CUDA_ERROR_ILLEGAL_ADDRESS op_path=$op checkpoint=$ck cuda_alloc=$alloc"
  exit 2
fi
if [ "$shape" = 6.9b ]; then
  echo "RESULT impl=overopt shape=$shape ok=0 oom=1 error=CUDA_ERROR_OUT_OF_MEMORY op_path=$op checkpoint=$ck cuda_alloc=$alloc"
  exit 2
fi
step=0.500; ex=32.000
if [ $prof = 1 ]; then
  echo "PROFILE impl=overopt name=bwd.layer.attention ms_per_step=300.000 calls_per_step=16 share=0.3750"
  echo "PROFILE impl=overopt name=step_total ms_per_step=800.000 calls_per_step=0 share=1.0000"
  step=0.800; ex=20.000
fi
[ $alloc = default ] && step=0.900 && ex=17.778
[ $op = composite ] && step=1.200 && ex=13.333
[ $op = recompute ] && step=0.700 && ex=22.857
echo "RESULT impl=overopt shape=$shape ok=1 batch=16 seq=512 step_s=$step examples_per_s=$ex tflops=178.60 mfu=0.1806 mfu_attn=0.2000 peak_mem_gib=60.00 graph_gib=30.000000 loss=0.6931 op_path=$op checkpoint=$ck cuda_alloc=$alloc profile=$prof"
"""

FAKE_TORCH = r"""import sys
if "--components" in sys.argv:
    print("COMPONENT impl=torch name=matmul ms=1.000 tflops=700.0 gbps=0")
    print("COMPONENT impl=torch name=add ms=0.500 tflops=0 gbps=3000.0")
elif "--profile" in sys.argv:
    print("PROFILE impl=torch name=aten::mm ms_per_step=120.000 calls_per_step=200 share=0.5000")
    print("RESULT impl=torch shape=1b ok=1 step_s=0.260 examples_per_s=61.538 profile=1")
else:
    print("RESULT impl=torch shape=1b ok=1 step_s=0.250 examples_per_s=64.000 tflops=376.0 "
          "mfu=0.3800 mfu_attn=0.4000 peak_mem_gib=38.70 loss=0.6931")
    print("RESULT impl=torch shape=1.4b ok=1 step_s=0.400")
    print("RESULT impl=torch shape=2.8b ok=0 oom=1")
"""


def run_script(binary=None, env_extra=None):
    """bench/gpu.sh in a temporary layout with the stand-in torch script, against `binary`
    (default: the stand-in bench binary), with `env_extra` in its environment; its output and
    the stand-in binary's calls."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="gpu-sh-"))
    try:
        (d / "bench").mkdir()
        shutil.copy(ROOT / "bench" / "gpu.sh", d / "bench" / "gpu.sh")
        (d / "bench" / "gpu_torch.py").write_text(FAKE_TORCH)
        fake = d / "fake-bench"
        fake.write_text(FAKE_BENCH)
        fake.chmod(0o755)
        env = dict(os.environ, OUT=str(d / "out"), PYTHON=sys.executable, **(env_extra or {}))
        p = subprocess.run(["bash", "bench/gpu.sh", str(binary or fake)], cwd=d, env=env,
                           capture_output=True, text=True, timeout=120)
        calls = d / "calls.txt"
        return p, calls.read_text().splitlines() if calls.exists() else []
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_summary_and_parts():
    p, calls = run_script()
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    lines = out.splitlines()
    # The last two lines are the goals; the ratio is examples/s over torch's.
    assert lines[-2:] == ["P3 ratio=0.5000", "P3 mfu=0.1806"], lines[-4:]
    assert "P3 fit overopt=2.8b torch=1.4b" in lines, out
    assert any(l.startswith("fit overopt: largest=2.8b (1b:ok, 1.4b:ok, 2.8b:ok, 6.9b:")
               for l in lines), out
    # The A/B rows are matched with their own runs, not with the default one.
    assert ("A/B overopt 1b, freed memory kept in the pool vs handed back at every sync "
            "(driver default): step_s 0.500 vs 0.900") in out, out
    assert ("A/B overopt 1b, op path differentiable (layer nodes) vs recompute (a node per "
            "op): step_s 0.500 vs 0.700") in out, out
    assert ("A/B overopt 1b, op path differentiable (layer nodes) vs composite "
            "(basic ops): step_s 0.500 vs 1.200") in out, out
    # The profiled runs (slowed by their synchronisations) are not the compared ones.
    row = next(l for l in lines if l.startswith("s/step"))
    assert row.split()[1:] == ["0.500", "0.250"], row
    assert any(c.endswith("--warmup 1 --steps 1 --profile") for c in calls), calls
    i = lines.index("profile overopt (sections of the step, own time between device syncs):")
    assert lines[i + 1].split() == ["bwd.layer.attention", "300.000", "ms", "0.3750", "x16"], lines[i + 1]
    assert "profile torch (ops with the most GPU self time in one step):" in lines, out
    assert any(l.split()[:2] == ["aten::mm", "120.000"] for l in lines), out
    # Components: torch's time over overopt's.
    comp = next(l for l in lines if l.strip().startswith("matmul"))
    assert comp.rstrip().endswith("ratio 0.50"), comp
    # The CUDA step's values against the CPU's: the failure is named.
    assert "parity on cuda:0 against the CPU (f32, basic ops): 2 of 3 configurations within " \
        "tolerance" in out, out
    assert "RMSProp update (2 steps, fused on the device): param_rel 3.1e-8, state_rel 0.0e0 " \
        "(tol 1e-5)\n" in out, out
    assert "autocast bf16, differentiable, checkpoint 1: loss_rel 1e-3, grad_rel 9e-2 (tol " \
        "5e-2)  FAILED at layers.0.mlp.bias" in out, out
    assert any(c.startswith("--shape tiny") and c.endswith("--parity") for c in calls), calls
    # What ran, with which arguments.
    # First the NVRTC check of the crate's kernels, printed in the log.
    assert calls[0] == "--nvrtc-check", calls
    assert "   NVRTC module=overopt_gelu ptx_bytes=6384 ok=1" in out, out
    first = calls[1].split()
    assert first[:6] == ["--shape", "1b", "--batch", "16", "--seq", "512"], calls
    larger = [c for c in calls if "--checkpoint" in c]
    assert [c.split()[1] for c in larger] == ["1.4b", "2.8b", "6.9b"], calls
    assert any("--cuda-alloc default" in c for c in calls), calls
    assert any("--op-path composite" in c for c in calls), calls
    assert any("--op-path recompute" in c for c in calls), calls


def test_failed_default_path_falls_back_to_a_node_per_op():
    p, calls = run_script(env_extra={"FAKE_FAIL_DEFAULT": "1"})
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    # Run right after the failed default step, with the same step counts, and only once.
    fallback = [c for c in calls if "--op-path recompute" in c]
    assert len(fallback) == 1 and "--warmup 2 --steps 4" in fallback[0], calls
    assert calls.index(fallback[0]) == 2, calls
    assert "the default op path failed (CUDA_ERROR_ILLEGAL_ADDRESS); P3 below is the step " \
        "with --op-path recompute" in out, out
    assert out.splitlines()[-2:] == ["P3 ratio=0.3571", "P3 mfu=0.1806"], out[-600:]
    # The larger shapes still run (they take the checkpointed graph).
    assert [c.split()[1] for c in calls if "--checkpoint" in c] == ["1.4b", "2.8b", "6.9b"], calls


def test_missing_binary_is_reported():
    p, calls = run_script(binary="/nonexistent/overopt-gpu-bench")
    assert not calls, calls
    assert "is missing or not executable" in p.stdout, p.stdout
    # torch's side still runs, and the ratio says it has nothing to compare.
    assert p.stdout.splitlines()[-2] == "P3 ratio=na", p.stdout[-800:]


TESTS = [test_summary_and_parts, test_failed_default_path_falls_back_to_a_node_per_op,
         test_missing_binary_is_reported]


def main():
    from pyharness import run
    return run("test_gpu_script", TESTS)


if __name__ == "__main__":
    sys.exit(main())
