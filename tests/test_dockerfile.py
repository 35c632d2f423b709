"""Static checks of the Dockerfile (and of the scripts and pins it relies on).

    environment/.venv-tests/bin/python tests/test_dockerfile.py     (environment/test.sh)
    python -m pytest tests/test_dockerfile.py                       (where pytest exists)

The Dockerfile is parsed with `dockerfile` (BuildKit's parser; pinned in
environment/requirements-tests.txt). Checked:

- the base image is pinned to an exact tag (x.y.z, never `latest`), a CUDA 12.x/13.x devel
  image (candle's cudarc 0.19 needs nvcc at build time and supports CUDA up to 13.x);
- the Rust toolchain is the one of rust-toolchain.toml (an exact version): the image copies
  that file and installs through environment/install-rust.sh, which reads it, and nothing in
  the Dockerfile names another version or runs rustup itself;
- evcxr_jupyter is installed only through environment/setup-notebooks.sh, whose pin is exact,
  and any version the Dockerfile names equals it;
- the pip requirements the image installs are files in environment/, with exact pins, and pip
  runs only inside scripts;
- every RUN step calls a script under environment/, apart from the plumbing in PLUMBING;
- nothing is downloaded outside the package registries: no ADD, no curl / wget / git clone or
  URL in a RUN step or in the scripts it calls (rustup, run by install-rust.sh --install, is
  the one tool that fetches from the Rust project's own distribution channel);
- no secret is baked in (no ENV / ARG / LABEL named like a token or key);
- .dockerignore keeps build outputs, results, venvs and notebook build dirs out of the context;
- the entry point passes `reproduce` / `sweep` ... to overopt (checked by running it with a
  stub binary) and never prints a secret.

Each check is also run on broken copies of the Dockerfile (test_checks_catch_broken_pins), so a
check that could never fail would show up there.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"

# Files that another branch adds (the notebooks work: setup, runner, kernel launcher, lab).
# Until they are merged, the checks that need them are skipped, and the output says so.
PENDING = {
    "environment/setup-notebooks.sh",
    "environment/requirements-notebooks.txt",
    "environment/run-notebooks.py",
    "environment/evcxr-kernel.sh",
    "environment/lab.sh",
    "notebooks",
}

# Commands a RUN step may use without a script: package-manager and file plumbing only.
PLUMBING = {"apt-get", "rm", "mkdir", "cp", "ln", "chmod", "true"}

SCRIPT = re.compile(r"^(?:\./|/opt/overopt/)?(environment/[\w.-]+\.(?:sh|py))$")
EXACT = re.compile(r"^\d+\.\d+\.\d+$")
DOWNLOAD = re.compile(r"\bcurl\b|\bwget\b|\bgit\s+clone\b|\bgit\s+fetch\b|https?://|\bgit\+")
SECRET_NAME = re.compile(r"TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|OPENAI|PRIVATE_KEY")

skipped = []


def skip(note):
    if note not in skipped:
        skipped.append(note)


def exists(rel):
    """Whether a repository file exists; a missing PENDING file is noted and treated as fine."""
    if (ROOT / rel).exists():
        return True
    if rel in PENDING or rel.split("/")[0] in PENDING:
        skip(f"{rel} is not in this tree yet (added by the notebooks branch): its checks skipped")
        return None
    return False


# ---------------------------------------------------------------------------------------------
# Parsing helpers


def parse(text):
    return dockerfile.parse_string(text)


def global_args(cmds):
    """ARG defaults declared before the first FROM (what FROM lines may refer to)."""
    out = {}
    for c in cmds:
        if c.cmd.upper() == "FROM":
            break
        if c.cmd.upper() == "ARG":
            for v in c.value:
                k, _, d = v.partition("=")
                out[k] = d
    return out


def substitute(s, env):
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), s
    )


def key_values(c):
    """(key, value) pairs of an ENV / ARG / LABEL instruction."""
    if c.cmd.upper() == "ARG":
        return [tuple(v.partition("=")[::2]) for v in c.value]
    v = list(c.value)
    return list(zip(v[0::2], v[1::2]))


def simple_commands(run):
    """The simple commands of a RUN line: lists of words, env assignments dropped."""
    lex = shlex.shlex(run, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    words, out = [], []
    for tok in lex:
        if tok in ("&&", "||", ";", "|", "&"):
            if words:
                out.append(words)
            words = []
        else:
            words.append(tok)
    if words:
        out.append(words)
    cleaned = []
    for w in out:
        while w and re.match(r"^[A-Za-z_]\w*=", w[0]):
            w = w[1:]
        if w:
            cleaned.append(w)
    return cleaned


def script_of(words):
    """The environment/ script a simple command runs, or None."""
    cmd = words[0]
    m = SCRIPT.match(cmd)
    if m:
        return m.group(1)
    if len(words) > 1 and (
        cmd in ("bash", "sh") or re.search(r"(^|/)python3?(\.\d+)?$", cmd)
    ):
        m = SCRIPT.match(words[1])
        if m:
            return m.group(1)
    return None


def runs(cmds):
    return [c for c in cmds if c.cmd.upper() == "RUN"]


def run_text(c):
    return " ".join(c.value)


def shell_logical_lines(text):
    """Non-comment lines of a shell script, continuation lines joined."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        out.append(re.sub(r"\s+", " ", cur + s))
        cur = ""
    if cur:
        out.append(cur)
    return out


def non_comment_lines(path):
    lines = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            lines.append(s)
    return lines


# ---------------------------------------------------------------------------------------------
# Facts from the repository


def toolchain_version(text=None):
    data = tomllib.loads(text if text is not None else (ROOT / "rust-toolchain.toml").read_text())
    return data.get("toolchain", {}).get("channel", "")


def evcxr_pin():
    """evcxr_jupyter's version as environment/setup-notebooks.sh pins it (None if pending)."""
    if not exists("environment/setup-notebooks.sh"):
        return None
    text = (ROOT / "environment/setup-notebooks.sh").read_text()
    m = re.search(r"^\s*EVCXR(?:_JUPYTER)?_VERSION=[\"']?([^\"'\s]+)", text, re.M) or re.search(
        r"evcxr_jupyter\S*\s+--version\s+[\"']?(\d[\w.]*)", text
    )
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------
# The checks: each returns a list of problems (strings)


def check_base_image(cmds):
    problems = []
    env = global_args(cmds)
    stages = []
    froms = [c for c in cmds if c.cmd.upper() == "FROM"]
    if not froms:
        return ["no FROM"]
    for c in froms:
        image = substitute(c.value[0], env)
        if len(c.value) >= 3 and c.value[1].upper() == "AS":
            alias = c.value[2]
        else:
            alias = None
        if image in stages:
            stages.append(alias)
            continue
        stages.append(alias)
        if "$" in image:
            problems.append(f"line {c.start_line}: FROM {c.value[0]}: unresolved variable")
            continue
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag:
            problems.append(f"line {c.start_line}: FROM {image}: no tag (means latest)")
            continue
        if tag == "latest" or not re.match(r"^\d+\.\d+\.\d+", tag):
            problems.append(f"line {c.start_line}: FROM {image}: tag {tag!r} is not an exact x.y.z")
            continue
        if name.endswith("nvidia/cuda"):
            m = re.match(r"^(\d+)\.(\d+)\.(\d+)-(?:cudnn\d*-)?devel-ubuntu\d+\.\d+$", tag)
            if not m:
                problems.append(f"line {c.start_line}: {image}: not a CUDA -devel image (nvcc)")
            elif int(m.group(1)) not in (12, 13):
                problems.append(f"line {c.start_line}: {image}: CUDA {m.group(1)}.x (want 12.x/13.x)")
    first = substitute(froms[0].value[0], env)
    if not first.split(":")[0].endswith("nvidia/cuda"):
        problems.append(f"the first stage is not an NVIDIA CUDA image: {first}")
    return problems


def check_rust(cmds, toml_text=None):
    problems = []
    version = toolchain_version(toml_text)
    if not EXACT.match(version):
        problems.append(f"rust-toolchain.toml: channel {version!r} is not an exact x.y.z")
    if toml_text is None:
        out = subprocess.run(
            ["bash", str(ROOT / "environment/install-rust.sh"), "--print-version"],
            capture_output=True, text=True,
        )
        if out.returncode != 0 or out.stdout.strip() != version:
            problems.append(
                f"environment/install-rust.sh --print-version gave {out.stdout.strip()!r} "
                f"(rc {out.returncode}), rust-toolchain.toml says {version!r}"
            )
    # The image copies rust-toolchain.toml, then installs through the script.
    copied = False
    installs = 0
    for c in cmds:
        u = c.cmd.upper()
        if u == "COPY" and not any(f.startswith("--from") for f in c.flags):
            srcs = c.value[:-1]
            if "rust-toolchain.toml" in srcs or "." in srcs:
                copied = True
        if u == "RUN":
            for words in simple_commands(run_text(c)):
                if script_of(words) == "environment/install-rust.sh":
                    if "--install" not in words:
                        problems.append(f"line {c.start_line}: install-rust.sh without --install")
                    if not copied:
                        problems.append(
                            f"line {c.start_line}: install-rust.sh runs before rust-toolchain.toml is copied"
                        )
                    installs += 1
                if words[0] in ("rustup", "rustup-init") or "rustup-init" in " ".join(words):
                    problems.append(f"line {c.start_line}: runs rustup directly: {' '.join(words)}")
        if u in ("ENV", "ARG", "LABEL"):
            for k, v in key_values(c):
                if re.search(r"RUST|TOOLCHAIN", k, re.I):
                    m = re.search(r"\d+\.\d+(?:\.\d+)?", v)
                    if m and m.group(0) != version:
                        problems.append(
                            f"line {c.start_line}: {k}={v} but rust-toolchain.toml says {version}"
                        )
                    elif v in ("stable", "beta", "nightly"):
                        problems.append(f"line {c.start_line}: {k}={v}: not the pinned toolchain")
    if installs != 1:
        problems.append(f"environment/install-rust.sh --install runs {installs} times (want 1)")
    return problems


def check_evcxr(cmds, pin):
    problems = []
    ran = False
    for c in cmds:
        u = c.cmd.upper()
        if u == "RUN":
            for words in simple_commands(run_text(c)):
                if script_of(words) == "environment/setup-notebooks.sh":
                    ran = True
                joined = " ".join(words)
                if "evcxr" in joined and script_of(words) is None:
                    problems.append(f"line {c.start_line}: installs evcxr outside setup-notebooks.sh: {joined}")
        if u in ("ENV", "ARG", "LABEL"):
            for k, v in key_values(c):
                if "EVCXR" in k.upper() and re.search(r"\d+\.\d+", v) and pin is not None and v != pin:
                    problems.append(
                        f"line {c.start_line}: {k}={v} but setup-notebooks.sh pins evcxr_jupyter {pin}"
                    )
    if not ran:
        problems.append("no RUN step calls environment/setup-notebooks.sh (evcxr_jupyter, JupyterLab)")
    if pin is not None and not EXACT.match(pin or ""):
        problems.append(f"environment/setup-notebooks.sh: evcxr_jupyter pin {pin!r} is not exact")
    if pin is not None and (ROOT / "environment/setup-notebooks.sh").is_file():
        text = (ROOT / "environment/setup-notebooks.sh").read_text()
        installs = [
            line
            for line in shell_logical_lines(text)
            if re.search(r"\bcargo\s+install\s+evcxr_jupyter\b", line)
            and not re.match(r"^(echo|printf)\b", line)
        ]
        if not installs:
            problems.append("setup-notebooks.sh has no `cargo install evcxr_jupyter` line")
        for line in installs:
            if not re.search(r"--version\s+[\"']?(\$\{?EVCXR\w*VERSION\}?|" + re.escape(pin) + ")", line):
                problems.append(f"setup-notebooks.sh installs evcxr_jupyter unpinned: {line}")
    return problems


def check_requirements(cmds):
    problems = []
    referenced = set()
    copied = set()
    for c in cmds:
        u = c.cmd.upper()
        if u in ("COPY", "ADD"):
            for s in c.value[:-1]:
                if re.search(r"requirements[\w.-]*\.txt$", s):
                    referenced.add(s)
                copied.add(s)
        if u == "RUN":
            for words in simple_commands(run_text(c)):
                joined = " ".join(words)
                for m in re.finditer(r"[\w./-]*requirements[\w.-]*\.txt", joined):
                    referenced.add(m.group(0))
                if words[0] in ("pip", "pip3") or re.search(r"-m\s+pip\b", joined):
                    problems.append(f"line {c.start_line}: pip runs outside a script: {joined}")
    # What setup-notebooks.sh installs is what the image installs.
    if exists("environment/setup-notebooks.sh"):
        text = (ROOT / "environment/setup-notebooks.sh").read_text()
        for m in re.finditer(r"-r\s+[\"']?([\w./$-]*requirements[\w.-]*\.txt)", text):
            path = re.sub(r"^\$\{?ROOT\}?/", "", m.group(1))
            referenced.add(path)
            if path not in copied and "." not in copied:
                problems.append(f"setup-notebooks.sh installs {path}, which the Dockerfile does not copy")
            elif path not in copied:
                # Copied only with the whole tree: it must be there before setup-notebooks runs.
                problems.append(f"{path} is not copied before RUN environment/setup-notebooks.sh")
    if not referenced:
        problems.append("the Dockerfile installs no pip requirements file (JupyterLab and clients)")
    for r in sorted(referenced):
        if not r.startswith("environment/"):
            problems.append(f"requirements file {r} is not in environment/")
            continue
        ok = exists(r)
        if ok is False:
            problems.append(f"requirements file {r} does not exist")
        elif ok:
            for line in non_comment_lines(ROOT / r):
                if not re.match(r"^[A-Za-z0-9_.\[\],-]+==[\w.+!-]+(\s*;.*)?$", line):
                    problems.append(f"{r}: not an exact pin: {line}")
    return problems


def check_run_steps(cmds):
    problems = []
    for c in runs(cmds):
        text = run_text(c)
        scripts = []
        for words in simple_commands(text):
            s = script_of(words)
            if s:
                scripts.append(s)
                ok = exists(s)
                if ok is False:
                    problems.append(f"line {c.start_line}: {s} does not exist")
            elif words[0] not in PLUMBING:
                problems.append(
                    f"line {c.start_line}: `{' '.join(words)[:80]}` is neither a script under "
                    f"environment/ nor whitelisted plumbing {sorted(PLUMBING)}"
                )
        if not scripts and not any(w[0] == "apt-get" for w in simple_commands(text)):
            problems.append(f"line {c.start_line}: RUN calls no script under environment/")
    return problems


def check_downloads(cmds):
    problems = []
    for c in cmds:
        u = c.cmd.upper()
        if u == "ADD":
            problems.append(f"line {c.start_line}: ADD (may fetch URLs or git repos): use COPY")
        if u == "RUN":
            text = run_text(c)
            if DOWNLOAD.search(text):
                problems.append(f"line {c.start_line}: downloads outside the registries: {text[:100]}")
            for words in simple_commands(text):
                s = script_of(words)
                if s and (ROOT / s).is_file():
                    for line in non_comment_lines(ROOT / s):
                        if DOWNLOAD.search(line):
                            problems.append(f"{s} (run at line {c.start_line}) downloads: {line[:100]}")
    return problems


def check_secrets(cmds):
    problems = []
    for c in cmds:
        u = c.cmd.upper()
        if u in ("ENV", "ARG", "LABEL"):
            for k, v in key_values(c):
                if SECRET_NAME.search(k.upper()):
                    problems.append(f"line {c.start_line}: {u} {k}: secrets come from `docker run -e`")
        if u in ("COPY", "ADD"):
            for s in c.value[:-1]:
                if re.search(r"(^|/)\.env$|\.pem$|\.key$|credentials|\.netrc$", s):
                    problems.append(f"line {c.start_line}: copies a secret-like file {s}")
    return problems


def check_build_and_entry(cmds):
    problems = []
    env = {}
    cuda_build = False
    prewarm = False
    entry = None
    for c in cmds:
        u = c.cmd.upper()
        if u == "ARG":
            env.update(dict(key_values(c)))
        if u == "RUN":
            text = run_text(c)
            for words in simple_commands(text):
                if script_of(words) == "environment/build.sh":
                    # The assignments in front of this build.sh call.
                    seg = text.split("environment/build.sh")[0].split("&&")[-1]
                    if re.search(r"FEATURES=cuda\b", seg) and "CUDA_COMPUTE_CAP=" in seg:
                        cuda_build = True
                if script_of(words) == "environment/run-notebooks.py":
                    if "00_quickstart" in " ".join(words) and "smoke" in words:
                        prewarm = True
        if u == "ENTRYPOINT":
            entry = " ".join(c.value)
    if not cuda_build:
        problems.append("no RUN builds with FEATURES=cuda CUDA_COMPUTE_CAP=... environment/build.sh")
    if env.get("CUDA_COMPUTE_CAP") != "90":
        problems.append(f"ARG CUDA_COMPUTE_CAP default is {env.get('CUDA_COMPUTE_CAP')!r}, want 90")
    if not prewarm:
        problems.append("the evcxr build is not pre-warmed (run-notebooks.py 00_quickstart, smoke)")
    if not entry or "environment/entrypoint.sh" not in entry:
        problems.append(f"ENTRYPOINT is not environment/entrypoint.sh: {entry}")
    if not any(c.cmd.upper() == "EXPOSE" and "8888" in c.value for c in cmds):
        problems.append("EXPOSE 8888 missing (lab)")
    if not any(c.cmd.upper() == "VOLUME" and "/out" in c.value for c in cmds):
        problems.append("VOLUME /out missing")
    return problems


def all_problems(text, toml_text=None, pin="from-script"):
    cmds = parse(text)
    if pin == "from-script":
        pin = evcxr_pin()
    return (
        check_base_image(cmds)
        + check_rust(cmds, toml_text)
        + check_evcxr(cmds, pin)
        + check_requirements(cmds)
        + check_run_steps(cmds)
        + check_downloads(cmds)
        + check_secrets(cmds)
        + check_build_and_entry(cmds)
    )


# ---------------------------------------------------------------------------------------------
# Tests


def test_dockerfile_is_clean():
    problems = all_problems(DOCKERFILE.read_text())
    assert not problems, "Dockerfile problems:\n  " + "\n  ".join(problems)


def test_checks_catch_broken_pins():
    """Every check fails on a Dockerfile broken in the way it guards against."""
    good = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", good, re.M).group(1)
    version = toolchain_version()
    # name: (broken Dockerfile, words the problem report must contain)
    breaks = {
        "latest base": (good.replace(base, "nvidia/cuda:latest"), "not an exact"),
        "floating base tag": (
            good.replace(base, base.split(":")[0] + ":12.8-devel-ubuntu24.04"), "not an exact"
        ),
        "runtime base (no nvcc)": (good.replace(base, base.replace("-devel-", "-runtime-")), "-devel"),
        "CUDA 11": (good.replace(base, "nvidia/cuda:11.8.0-devel-ubuntu22.04"), "CUDA 11"),
        "other Rust version": (
            good.replace("ARG CUDA_IMAGE=", "ARG RUST_VERSION=1.80.0\nARG CUDA_IMAGE=", 1),
            "rust-toolchain.toml says",
        ),
        "rustup in a RUN": (
            good.replace(
                "RUN bash environment/install-rust.sh --install",
                f"RUN rustup toolchain install {version}",
            ),
            "runs rustup directly",
        ),
        "toolchain not copied first": (
            good.replace("COPY rust-toolchain.toml ./\n", ""),
            "before rust-toolchain.toml is copied",
        ),
        "other evcxr version": (
            good.replace("ARG CUDA_IMAGE=", "ARG EVCXR_JUPYTER_VERSION=0.21.0\nARG CUDA_IMAGE=", 1),
            "pins evcxr_jupyter",
        ),
        "cargo install evcxr": (
            good.replace(
                "RUN bash environment/setup-notebooks.sh",
                "RUN cargo install evcxr_jupyter --version 0.22.0",
            ),
            "outside setup-notebooks.sh",
        ),
        "requirements outside environment/": (
            good.replace(
                "RUN bash environment/setup-notebooks.sh",
                "COPY requirements.txt ./\nRUN bash environment/setup-notebooks.sh requirements.txt",
            ),
            "not in environment/",
        ),
        "pip in a RUN": (
            good.replace(
                "RUN bash environment/setup-notebooks.sh",
                "RUN bash environment/setup-notebooks.sh && pip install jupyterlab",
            ),
            "pip runs outside a script",
        ),
        "RUN without a script": (
            good.replace(
                "RUN bash environment/install-rust.sh --install",
                "RUN bash environment/install-rust.sh --install && cargo build --release",
            ),
            "neither a script",
        ),
        "curl": (
            good.replace(
                "RUN bash environment/setup-notebooks.sh",
                "RUN curl -sSf https://example.invalid/x.sh | sh && bash environment/setup-notebooks.sh",
            ),
            "downloads outside the registries",
        ),
        "git clone": (
            good.replace(
                "RUN bash environment/setup-notebooks.sh",
                "RUN git clone https://example.invalid/r.git && bash environment/setup-notebooks.sh",
            ),
            "downloads outside the registries",
        ),
        "ADD": (good.replace("COPY src src", "ADD src src", 1), "ADD (may fetch"),
        "baked secret": (
            good.replace(
                "ENV DEBIAN_FRONTEND=noninteractive",
                "ENV OPENAI_API_KEY=sk-x DEBIAN_FRONTEND=noninteractive",
            ),
            "secrets come from",
        ),
        "CPU-only build": (good.replace("FEATURES=cuda ", "FEATURES= "), "FEATURES=cuda"),
        "no pre-warm": (good.replace("00_quickstart", "01_overoptimization"), "pre-warmed"),
    }
    # The evcxr checks compare with setup-notebooks.sh's pin; while that script is not in the
    # tree, they are exercised against a stand-in pin.
    pin = evcxr_pin() or "0.22.0"
    missed = []
    assert not all_problems(good, pin=pin), "the unbroken Dockerfile has problems"

    def caught(problems, words):
        return any(words in p for p in problems)

    for name, (text, words) in breaks.items():
        assert text != good, f"mutation {name!r} did not apply: the Dockerfile changed shape"
        if not caught(all_problems(text, pin=pin), words):
            missed.append(name)
    toml = '[toolchain]\nchannel = "stable"\n'
    if not caught(all_problems(good, toml_text=toml, pin=pin), "not an exact x.y.z"):
        missed.append("toolchain channel 'stable'")
    if not caught(all_problems(good, pin="0.22"), "is not exact"):
        missed.append("inexact evcxr pin")
    assert not missed, f"checks did not catch: {missed}"


def test_dockerignore():
    lines = set(non_comment_lines(ROOT / ".dockerignore"))
    want = ["target/", "out/", "runs/", "environment/.venv", "notebooks/.evcxr-build/", ".git"]
    missing = [w for w in want if w not in lines]
    assert not missing, f".dockerignore lacks {missing}"


def test_entrypoint_dispatch():
    """entrypoint.sh with a stub overopt: arguments pass through, /out is the default output,
    secrets are reported as set but never printed."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        log = d / "calls"
        stub = d / "overopt-stub"
        stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
        stub.chmod(0o755)
        env = dict(
            os.environ,
            OVEROPT_BIN=str(stub),
            OVEROPT_OUT=str(d / "out"),
            OVEROPT_NOTEBOOKS="0",
            OVEROPT_LINK_OUT="0",  # the repository's out/ must not point into this temp dir
            HF_TOKEN="hf_secret_value_123",
            OPENAI_API_KEY="sk-secret-value-456",
        )
        env.pop("OPENAI_BASE_URL", None)
        entry = str(ROOT / "environment/entrypoint.sh")

        def run(*args):
            p = subprocess.run(["bash", entry, *args], env=env, capture_output=True, text=True)
            assert p.returncode == 0, f"entrypoint {args}: rc {p.returncode}\n{p.stderr}"
            return p.stdout + p.stderr

        out = run("reproduce", "--section", "toy-mdp", "--scale", "teach")
        out += run("reproduce", "--section=length", "--out", str(d / "mine"))
        out += run("sweep", "--list")
        out += run("overopt", "compare", "--expected", "a", "--actual", "b")
        out += run("export-tldr", "--data", "data.toml")
        calls = log.read_text().splitlines()
        assert calls == [
            f"reproduce --section toy-mdp --scale teach --out {d / 'out' / 'teach'}",
            f"reproduce --section=length --out {d / 'mine'}",
            "sweep --list",
            "compare --expected a --actual b",
            "export-tldr --data data.toml",
        ], calls
        assert "HF_TOKEN set" in out and "OPENAI_BASE_URL not set" in out, out
        assert "secret_value" not in out and "secret-value" not in out, "a secret was printed"
        p = subprocess.run(["bash", entry, "frobnicate"], env=env, capture_output=True, text=True)
        assert p.returncode != 0 and "unknown command" in p.stderr
        link = ROOT / "out"
        assert not (link.is_symlink() and str(d) in os.readlink(link)), \
            f"the entrypoint linked {link} into the test's temporary directory"


TESTS = [
    test_dockerfile_is_clean,
    test_checks_catch_broken_pins,
    test_dockerignore,
    test_entrypoint_dispatch,
]


def main():
    from pyharness import run
    return run("test_dockerfile", TESTS, skipped)


if __name__ == "__main__":
    sys.exit(main())
