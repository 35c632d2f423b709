#!/usr/bin/env python3
"""Execute the notebooks headless in the evcxr Rust kernel and check what they printed.

    environment/.venv/bin/python environment/run-notebooks.py [NAME ...]
    environment/.venv/bin/python environment/run-notebooks.py --self-test

Every notebooks/*.ipynb (or the NAMEs given, with or without .ipynb) runs top to bottom in
the `overopt-rust` kernel (environment/setup-notebooks.sh installs it) with
OVEROPT_NOTEBOOK_PROFILE=smoke, and its executed copy is written to --out (default
out/notebooks, git-ignored). Notebooks whose metadata sets overopt.trains run first, one at a
time (they write the results directory, emptied at the start); the others then run --jobs at
a time (default 2), each in a kernel of its own; they start their kernels one at a time (a
lock file, held until the kernel listens on its ports, so two kernels can't be handed the same
ports). A notebook FAILS when

  error-output         a cell has an error output (compile errors; a dead kernel);
  panic                a printed line contains "panicked at" (evcxr reports a panic as success);
  question-mark-error  a printed line starts with "Error:" (the notebook facade's errors,
                       returned through `?`, which evcxr also reports as success);
  stderr               anything else reached stderr (a `?` on a non-facade error prints only
                       its message there), unless the notebook's metadata sets
                       overopt.allow_stderr;
  missing-sentinel     the last code cell did not print "NOTEBOOK OK: <name>";
  missing-figure       the notebook is expected to show figures (metadata
                       overopt.expect_figures, or --figures / --no-figures) and no text/html
                       output holds a plotly div.

After a run in which every notebook passed, the first executed notebook that shows figures is
exported to HTML with nbconvert and opened in headless Chromium (Debian's `chromium`; the
CHROMIUM variable names another binary): the check fails unless the rendered page holds a
plotly SVG (`<svg class="main-svg"`, outside scripts). Without a Chromium binary it prints
SKIPPED, or fails with --require-chromium.

Exit codes of cells prove nothing here; only these checks do. --self-test runs the broken
fixture tests/fixtures/notebooks/broken.ipynb and passes only when every problem it plants
(its metadata overopt.expect_problems: kind and cell) is reported at its cell; before that it
starts stand-in kernels at once, without the start lock (their ports must collide) and with it
(they must not; --self-test-start-lock runs only this part).

Timings: the kernel start (with evcxr.toml's `:dep` on the crate, the first build of the crate
happens here: cold when nothing is compiled, seconds when warm), the first cell, and each
notebook's total are printed.
"""

import argparse
import asyncio
import errno
import fcntl
import json
import os
import queue
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete, CellTimeoutError, DeadKernelError
from nbclient.util import ensure_async

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "NOTEBOOK OK:"
KERNEL = "overopt-rust"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PLOTLY_DIV = re.compile(r'class="plotly-graph-div"|Plotly\.newPlot\(')
PANIC = re.compile(r"panicked at")
FACADE_ERROR = re.compile(r"^\s*Error:", re.M)


class LateOutputClient(NotebookClient):
    """A NotebookClient that keeps collecting a cell's output for a moment after the kernel
    reported the cell idle.

    evcxr forwards the stderr of the process running the cells from a thread of its own, so a
    panic message or the message of an error returned through `?` can reach the client just
    AFTER the cell's "idle" status (stdout, read in the same loop as the end of the cell, cannot).
    nbclient stops listening for a cell at "idle" and drops such lines, which would let exactly
    the failures this runner looks for slip through. The next cell is only sent when this
    returns, so late lines still carry this cell's parent id.
    """

    grace_s = 0.5

    async def _async_poll_output_msg(self, parent_msg_id, cell, cell_index):
        await super()._async_poll_output_msg(parent_msg_id, cell, cell_index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                msg = await ensure_async(self.kc.iopub_channel.get_msg(timeout=left))
            except queue.Empty:
                return
            if msg["parent_header"].get("msg_id") != parent_msg_id:
                continue
            if msg["msg_type"] == "stream":
                try:
                    self.process_message(msg, cell, cell_index)
                except CellExecutionComplete:
                    pass

    # A lock file shared by runners that start kernels at the same time (run_parallel's
    # children), or None.
    start_lock = None
    listen_timeout_s = 600

    async def async_start_new_kernel(self, **kwargs):
        """Start the kernel; with `start_lock` set, do it while holding that lock, and keep it
        until the kernel listens on all its ports (or died, or `listen_timeout_s` passed).

        jupyter_client picks a kernel's five ports by binding port 0 and closing the socket,
        and only keeps the picks of its own process apart. Two runners starting kernels at once
        could be handed the same ports: on CI one kernel died with "Address already in use"
        and its client's messages reached the other kernel, which died of "MAC tag mismatch".
        Once a kernel listens on a port, no later pick can return it."""
        if self.start_lock is None:
            return await super().async_start_new_kernel(**kwargs)
        with open(self.start_lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                await super().async_start_new_kernel(**kwargs)
                await wait_until_listening(self.km, self.listen_timeout_s)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def kernel_ports(km):
    return [km.shell_port, km.iopub_port, km.stdin_port, km.hb_port, km.control_port]


def port_in_use(ip, port):
    """True when something on this machine holds `port` (binding it fails with EADDRINUSE)."""
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


async def wait_until_listening(km, timeout_s, poll_s=0.1):
    """Wait until every port of the kernel `km` started is taken, the kernel died or
    `timeout_s` passed. (evcxr binds its sockets first thing, before it loads evcxr.toml and
    builds the crate.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if all(port_in_use(km.ip, p) for p in kernel_ports(km)):
            return
        if not await ensure_async(km.is_alive()):
            return
        await asyncio.sleep(poll_s)


def text_of(output):
    t = output.get("text", "")
    return "".join(t) if isinstance(t, list) else t


def html_of(output):
    d = output.get("data", {}).get("text/html", "")
    return "".join(d) if isinstance(d, list) else d


def check(nb, name, expect_figures):
    """The problems of an executed notebook: a list of (kind, cell index, detail)."""
    meta = nb.metadata.get("overopt", {})
    allow_stderr = bool(meta.get("allow_stderr", False))
    problems = []
    code_cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    figure_seen = False
    stderr_lines = {}
    for i, cell in code_cells:
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "error":
                msg = " ".join(out.get("traceback", []) or [out.get("evalue", "")])
                msg = re.sub(r"\s+", " ", ANSI.sub("", msg))
                problems.append(("error-output", i, f"{out.get('ename', '')}: {msg}"[:400]))
            elif kind == "stream":
                text = text_of(out)
                for line in text.splitlines():
                    if PANIC.search(line):
                        problems.append(("panic", i, line.strip()[:400]))
                    elif FACADE_ERROR.match(line):
                        problems.append(("question-mark-error", i, line.strip()[:400]))
                    elif out.get("name") == "stderr" and line.strip() and not allow_stderr:
                        stderr_lines.setdefault(i, []).append(line.strip())
            elif kind in ("execute_result", "display_data"):
                if PLOTLY_DIV.search(html_of(out)):
                    figure_seen = True
    for i, lines in stderr_lines.items():
        more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
        problems.append(("stderr", i, lines[0][:400] + more))
    if code_cells:
        i, last = code_cells[-1]
        printed = "".join(
            text_of(o) for o in last.get("outputs", []) if o.get("output_type") == "stream"
        )
        if f"{SENTINEL} {name}" not in printed:
            problems.append(
                ("missing-sentinel", i, f"last code cell did not print '{SENTINEL} {name}'")
            )
    else:
        problems.append(("missing-sentinel", -1, "no code cells"))
    if expect_figures and not figure_seen:
        problems.append(("missing-figure", -1, "no text/html output with a plotly div"))
    return problems


def find_chromium():
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render_check(executed, chromium, timeout=180):
    """Export an executed notebook to HTML and render it in headless Chromium. Returns
    (ok, detail): ok when the rendered DOM, scripts removed, holds a plotly SVG."""
    import subprocess
    import tempfile

    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / (Path(executed).stem + ".html")
        page.write_text(body)
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--no-first-run",
               "--virtual-time-budget=15000", f"--user-data-dir={tmp}/profile",
               "--dump-dom", page.as_uri()]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"{chromium} did not render {executed} within {timeout} s"
    dom = re.sub(r"<script\b.*?</script>", "", proc.stdout, flags=re.S)
    svgs = dom.count('<svg class="main-svg"')
    if svgs == 0:
        return False, (f"no plotly SVG in the page rendered from {executed} "
                       f"(chromium exit {proc.returncode}, {len(proc.stdout)} bytes of DOM)")
    return True, f"{svgs} plotly SVG layer(s) rendered from {executed}"


def run_render_check(results, args):
    """The Chromium check on the first passing notebook with figures; returns an exit code."""
    chromium = find_chromium()
    shown = [r for r in results if r.get("expect_figures") and not r["problems"]]
    if not shown:
        print("run-notebooks: render check: no executed notebook with figures", flush=True)
        return 0
    if chromium is None:
        msg = ("run-notebooks: render check SKIPPED: no chromium binary on PATH "
               "(apt-get install chromium, or set CHROMIUM)")
        print(msg, file=sys.stderr if args.require_chromium else sys.stdout, flush=True)
        return 1 if args.require_chromium else 0
    ok, detail = render_check(shown[0]["executed"], chromium)
    print(f"run-notebooks: render check {'ok' if ok else 'FAILED'}: {detail}", flush=True)
    return 0 if ok else 1


def run_one(path, out_dir, args, nb=None):
    name = path.stem
    if nb is None:
        nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("overopt", {})
    if args.figures is None:
        expect_figures = bool(meta.get("expect_figures", False))
    else:
        expect_figures = args.figures
    marks = {}

    def on_start(**_):
        marks["kernel_ready"] = time.monotonic()

    def on_execute(cell, cell_index, **_):
        marks.setdefault("first_cell_index", cell_index)
        marks.setdefault(("start", cell_index), time.monotonic())

    def on_executed(cell, cell_index, **_):
        marks[("end", cell_index)] = time.monotonic()
        if args.verbose:
            dt = marks[("end", cell_index)] - marks[("start", cell_index)]
            print(f"    cell {cell_index}: {dt:.1f} s", flush=True)

    client = LateOutputClient(
        nb,
        kernel_name=args.kernel,
        timeout=args.cell_timeout,
        startup_timeout=args.startup_timeout,
        allow_errors=True,
        record_timing=True,
        resources={"metadata": {"path": str(args.cwd)}},
        on_notebook_start=on_start,
        on_cell_execute=on_execute,
        on_cell_executed=on_executed,
    )
    client.start_lock = args.start_lock
    t0 = time.monotonic()
    crash = None
    try:
        client.execute()
    except (CellTimeoutError, DeadKernelError, RuntimeError) as e:
        crash = f"{type(e).__name__}: {e}"
    total = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)

    problems = check(nb, name, expect_figures)
    if crash:
        problems.insert(0, ("error-output", -1, crash[:400]))
    start = marks.get("kernel_ready", t0) - t0
    fi = marks.get("first_cell_index")
    first = None
    if fi is not None and ("end", fi) in marks:
        first = marks[("end", fi)] - marks[("start", fi)]
    return {
        "name": name,
        "problems": problems,
        "kernel_start_s": round(start, 1),
        "first_cell_s": None if first is None else round(first, 1),
        "total_s": round(total, 1),
        "expect_figures": expect_figures,
        "executed": str(out_dir / path.name),
    }


def run_parallel(paths, args, jobs):
    """Run each notebook in a child runner (its own kernel), `jobs` at a time; print each
    child's report when it ends."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    tmp = args.out / ".parallel"
    tmp.mkdir(parents=True, exist_ok=True)

    def child(p):
        out_json = tmp / f"{p.stem}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), p.stem, "--keep-results",
               "--jobs", "1", "--notebooks", str(args.notebooks), "--out", str(args.out),
               "--cwd", str(args.cwd), "--profile", args.profile, "--kernel", args.kernel,
               "--cell-timeout", str(args.cell_timeout),
               "--startup-timeout", str(args.startup_timeout), "--json", str(out_json),
               "--start-lock", str(tmp / "kernel-start.lock")]
        if args.figures is True:
            cmd.append("--figures")
        elif args.figures is False:
            cmd.append("--no-figures")
        sys.stdout.write(f"  {p.stem}: running\n")  # one write: threads print too
        sys.stdout.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            res = json.loads(out_json.read_text())["notebooks"][0]
        except (OSError, ValueError, KeyError, IndexError):
            res = {"name": p.stem, "problems": [("error-output", -1,
                   f"the child runner failed (exit {proc.returncode}): "
                   f"{proc.stdout[-1500:]}")], "kernel_start_s": 0.0, "first_cell_s": None,
                   "total_s": 0.0}
        if res["problems"]:
            # The kernel's own messages (why it died, say), without cargo's progress lines.
            lines = [ln for ln in proc.stdout.splitlines()
                     if not ln.strip().startswith(("Compiling", "Blocking"))]
            res["child_output"] = "\n".join(lines[-40:])
        return res

    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for res in pool.map(child, paths):
            report(res)
            if res.get("child_output"):
                print("      child runner output (last lines):\n"
                      + "\n".join("        " + ln for ln in res["child_output"].splitlines()),
                      flush=True)
            results.append(res)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


STUB_KERNEL = """\
import json, socket, sys, time
# A stand-in kernel for the start-lock self-test: it takes its ports late, like a kernel whose
# launcher has work to do first, and dies if one of them is taken.
info = json.load(open(sys.argv[1]))
time.sleep(2.0)
held = []
for key in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
    s = socket.socket()
    s.bind((info["ip"], info[key]))
    s.listen()
    held.append(s)
time.sleep(300)
"""


def file_barrier(folder, tag, n, timeout_s=120):
    """Wait until `n` processes have reached the barrier `tag` in `folder`."""
    (folder / f"{tag}.{os.getpid()}").touch()
    t0 = time.monotonic()
    while len(list(folder.glob(f"{tag}.*"))) < n:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"barrier {tag} in {folder}: fewer than {n} processes came")
        time.sleep(0.05)


def start_probe(args):
    """--start-probe FILE (the start-lock self-test's child): start one kernel of --kernel as
    run_one does (under --start-lock when given) right after the other probes reached the same
    point, write its ports and whether it lives to FILE, and stop it once every probe wrote.

    Ports are picked as the lowest free ones from OVEROPT_PROBE_PORT_BASE instead of at random,
    so probes that pick before another's kernel took its ports are sure to collide."""
    from jupyter_client.connect import LocalPortCache

    base = int(os.environ["OVEROPT_PROBE_PORT_BASE"])
    n = int(os.environ["OVEROPT_PROBE_N"])
    folder = args.start_probe.parent

    def lowest_free(cache, ip):
        port = base
        while port in cache.currently_used_ports or port_in_use(ip, port):
            port += 1
        cache.currently_used_ports.add(port)
        return port

    LocalPortCache.find_available_port = lowest_free
    client = LateOutputClient(nbformat.v4.new_notebook(), kernel_name=args.kernel,
                              startup_timeout=60)
    client.start_lock = args.start_lock
    client.listen_timeout_s = 30

    async def probe():
        client.km = client.create_kernel_manager()
        file_barrier(folder, "start", n)
        await client.async_start_new_kernel()
        if client.start_lock is None:  # with the lock, the start waited for this already
            await wait_until_listening(client.km, client.listen_timeout_s)
        file_barrier(folder, "listening", n)
        await asyncio.sleep(0.5)  # a stub that lost a port exits at once
        res = {"ports": kernel_ports(client.km),
               "alive": bool(await ensure_async(client.km.is_alive()))}
        tmp = args.start_probe.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.rename(args.start_probe)
        file_barrier(folder, "written", n)
        await ensure_async(client.km.shutdown_kernel(now=True))

    asyncio.run(probe())
    return 0


def start_lock_self_test(args, n=3):
    """Start `n` stand-in kernels at once, first without the start lock (the control: their
    ports must collide, or the probe does not provoke the race), then with it (no port may be
    shared, every kernel must live). Returns an exit code."""
    import subprocess

    top = (args.out / "self-test-start-lock").resolve()
    shutil.rmtree(top, ignore_errors=True)
    spec = top / "share" / "kernels" / "overopt-stub"
    spec.mkdir(parents=True)
    (top / "stub_kernel.py").write_text(STUB_KERNEL)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(top / "stub_kernel.py"), "{connection_file}"],
        "display_name": "overopt start-lock stub", "language": "none"}))
    env = dict(os.environ, JUPYTER_PATH=str(top / "share"),
               OVEROPT_PROBE_PORT_BASE=str(23000 + os.getpid() % 500 * 20),
               OVEROPT_PROBE_N=str(n))

    def run(locked):
        folder = top / ("locked" if locked else "control")
        folder.mkdir()
        procs = []
        for i in range(n):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--kernel", "overopt-stub",
                   "--start-probe", str(folder / f"probe-{i}.json")]
            if locked:
                cmd += ["--start-lock", str(folder / "kernel-start.lock")]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=300)[0] for p in procs]
        probes = []
        for i, (p, out) in enumerate(zip(procs, outs)):
            f = folder / f"probe-{i}.json"
            if p.returncode != 0 or not f.exists():
                raise RuntimeError(f"start probe {i} failed (exit {p.returncode}): {out[-800:]}")
            probes.append(json.loads(f.read_text()))
        ports = [q for pr in probes for q in pr["ports"]]
        shared = sorted({q for q in ports if ports.count(q) > 1})
        dead = [i for i, pr in enumerate(probes) if not pr["alive"]]
        return shared, dead

    try:
        shared, dead = run(locked=False)
        if not shared:
            print("run-notebooks: SELF-TEST FAILED: the start-lock control (kernels started "
                  "at once without the lock) shared no port: the probe no longer provokes the "
                  "race", file=sys.stderr)
            return 1
        print(f"run-notebooks: self-test: without the start lock, {n} kernels started at once "
              f"shared ports {shared} ({len(dead)} died)", flush=True)
        shared, dead = run(locked=True)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"run-notebooks: SELF-TEST FAILED: start-lock probe: {e}", file=sys.stderr)
        return 1
    if shared or dead:
        print(f"run-notebooks: SELF-TEST FAILED: with the start lock, kernels started at once "
              f"shared ports {shared}; kernels that died: {dead}", file=sys.stderr)
        return 1
    print(f"run-notebooks: self-test ok: with the start lock, {n} kernels started at once get "
          f"ports of their own and all live", flush=True)
    shutil.rmtree(top, ignore_errors=True)
    return 0


def report(res):
    first = "-" if res["first_cell_s"] is None else f"{res['first_cell_s']:.1f} s"
    status = "ok" if not res["problems"] else "FAILED"
    print(
        f"  {res['name']}: {status}  kernel start {res['kernel_start_s']:.1f} s, "
        f"first cell {first}, total {res['total_s']:.1f} s",
        flush=True,
    )
    for kind, cell, detail in res["problems"]:
        where = f"cell {cell}" if cell >= 0 else "notebook"
        print(f"      [{kind}] {where}: {detail}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    ap.add_argument("--notebooks", type=Path, default=ROOT / "notebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "notebooks")
    ap.add_argument("--cwd", type=Path, default=ROOT / "notebooks",
                    help="kernel working directory (where evcxr.toml is)")
    ap.add_argument("--profile", default="smoke",
                    help="OVEROPT_NOTEBOOK_PROFILE for the kernels ('' leaves it unset)")
    ap.add_argument("--kernel", default=KERNEL)
    ap.add_argument("--cell-timeout", type=int, default=1200)
    ap.add_argument("--startup-timeout", type=int, default=3600,
                    help="seconds for the kernel to start (the cold crate build happens here)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="notebooks run at once (each in its own kernel) after the ones that "
                         "train (default 2)")
    ap.add_argument("--keep-results", action="store_true",
                    help="keep the smoke results directory (default: start from scratch)")
    figs = ap.add_mutually_exclusive_group()
    figs.add_argument("--figures", dest="figures", action="store_true", default=None,
                      help="require figures in every notebook")
    figs.add_argument("--no-figures", dest="figures", action="store_false",
                      help="require figures in none (default: each notebook's metadata)")
    ap.add_argument("--self-test", action="store_true",
                    help="run the broken fixture and pass only if every planted problem is found")
    ap.add_argument("--warm-only", action="store_true",
                    help="start one kernel, run one cell that uses the crate, and stop: builds "
                         "what the kernels need and prints the kernel start and first-cell time")
    ap.add_argument("--json", type=Path, help="write the timings and problems here")
    ap.add_argument("--start-probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--self-test-start-lock", action="store_true",
                    help="run only the start-lock part of --self-test (no evcxr needed)")
    ap.add_argument("--start-lock", type=Path,
                    help="lock file shared with runners started at the same time: each starts "
                         "its kernel holding it, until the kernel listens on its ports "
                         "(run_parallel passes it to its children)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every cell's time")
    ap.add_argument("--require-chromium", action="store_true",
                    help="fail (instead of skipping) the render check without Chromium")
    ap.add_argument("--no-render-check", dest="render_check", action="store_false",
                    help="skip exporting an executed notebook to HTML and rendering it")
    args = ap.parse_args()

    if args.profile:
        os.environ["OVEROPT_NOTEBOOK_PROFILE"] = args.profile
    else:
        os.environ.pop("OVEROPT_NOTEBOOK_PROFILE", None)

    if args.start_probe:
        return start_probe(args)
    if args.self_test_start_lock:
        return start_lock_self_test(args)

    if args.warm_only:
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_code_cell('overopt::notebook::done("warm");'))
        nb.metadata["overopt"] = {"expect_figures": False}
        res = run_one(Path("warm.ipynb"), args.out / "warm", args, nb=nb)
        report(res)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2))
        return 1 if res["problems"] else 0

    if args.self_test:
        if start_lock_self_test(args) != 0:
            return 1
        fixture = ROOT / "tests" / "fixtures" / "notebooks" / "broken.ipynb"
        print(f"run-notebooks: self-test on {fixture.relative_to(ROOT)}", flush=True)
        nb = nbformat.read(fixture, as_version=4)
        want = {(k, c) for k, c in nb.metadata.get("overopt", {}).get("expect_problems", [])}
        if not want:
            print("run-notebooks: the fixture lists no expect_problems", file=sys.stderr)
            return 2
        res = run_one(fixture, args.out / "self-test", args)
        report(res)
        found = {(k, c) for k, c, _ in res["problems"]}
        missed = sorted(want - found)
        if missed:
            print("run-notebooks: SELF-TEST FAILED: not detected: "
                  + ", ".join(f"{k} at cell {c}" for k, c in missed), file=sys.stderr)
            return 1
        print("run-notebooks: self-test ok: the runner rejects the broken notebook and finds "
              "every planted problem (" + ", ".join(f"{k} at cell {c}" for k, c in sorted(want))
              + ")", flush=True)
        chromium = find_chromium()
        if args.render_check and chromium:
            # The render check must fail on a page without a figure (the broken fixture).
            ok, detail = render_check(res["executed"], chromium)
            if ok:
                print(f"run-notebooks: SELF-TEST FAILED: the render check passed a notebook "
                      f"without figures: {detail}", file=sys.stderr)
                return 1
            print(f"run-notebooks: self-test ok: the render check rejects a page without a "
                  f"figure ({detail})", flush=True)
        return 0

    paths = sorted(args.notebooks.glob("*.ipynb"))
    if args.names:
        want = {n[:-6] if n.endswith(".ipynb") else n for n in args.names}
        paths = [p for p in paths if p.stem in want]
        unknown = want - {p.stem for p in paths}
        if unknown:
            print(f"run-notebooks: no such notebook: {', '.join(sorted(unknown))}",
                  file=sys.stderr)
            return 2
    if not paths:
        print(f"run-notebooks: no notebooks in {args.notebooks}", file=sys.stderr)
        return 2
    if args.profile == "smoke" and not args.keep_results:
        smoke = Path(os.environ.get("OVEROPT_RESULTS") or ROOT / "out" / "notebook-smoke")
        shutil.rmtree(smoke, ignore_errors=True)

    # Notebooks that train (metadata overopt.trains) run first, one at a time, in name order:
    # they write the shared results directory. The others only read it and run --jobs at a
    # time, each in a kernel of its own (which also exercises several kernels at once).
    first = [p for p in paths if nbformat.read(p, as_version=4).metadata.get("overopt", {})
             .get("trains", False)]
    rest = [p for p in paths if p not in first]
    jobs = max(1, args.jobs)
    print(f"run-notebooks: {len(paths)} notebooks, profile "
          f"{args.profile or '(unset)'}, kernel {args.kernel}, {jobs} at a time after "
          f"{', '.join(p.stem for p in first) or 'none'}", flush=True)
    t0 = time.monotonic()
    results = []
    for p in first:
        print(f"  {p.stem}: running", flush=True)
        res = run_one(p, args.out, args)
        report(res)
        results.append(res)
    if jobs == 1:
        for p in rest:
            print(f"  {p.stem}: running", flush=True)
            res = run_one(p, args.out, args)
            report(res)
            results.append(res)
    elif rest:
        results.extend(run_parallel(rest, args, jobs))
    total = time.monotonic() - t0
    failed = [r["name"] for r in results if r["problems"]]
    print(f"run-notebooks: {len(results) - len(failed)}/{len(results)} ok in {total:.1f} s",
          flush=True)
    print("  timings (s): " + ", ".join(
        f"{r['name']} {r['total_s']:.1f} (start {r['kernel_start_s']:.1f}, "
        f"first cell {r['first_cell_s']})" for r in results), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"total_s": round(total, 1), "notebooks": results},
                                        indent=2))
    if failed:
        print(f"run-notebooks: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.render_check:
        return run_render_check(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
