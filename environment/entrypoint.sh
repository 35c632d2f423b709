#!/usr/bin/env bash
# Entry point of the Docker image (the Dockerfile's ENTRYPOINT); also runs outside it.
#
#   reproduce [--section S] [--scale teach|paper] [--out DIR] [more `overopt reproduce` args]
#       `overopt reproduce` with its output in $OVEROPT_OUT/<scale> (default /out/<scale>;
#       results.parquet/.csv, claims and figures as `reproduce` writes them), then the
#       section's notebook(s) executed on those results into $OVEROPT_OUT/notebooks (an HTML
#       copy of each, figures included, in $OVEROPT_OUT/notebooks/html). S = all (notebooks
#       01-06), overoptimization (01), scaling-laws (02), length (03), reward-metrics (04),
#       likelihoods (05), toy-mdp (06). OVEROPT_NOTEBOOKS=0 skips the notebooks.
#   lab [jupyter lab args]
#       JupyterLab with the Rust kernel (environment/lab.sh); in the image it listens on
#       0.0.0.0:8888 (/etc/jupyter/jupyter_server_config.py) and prints its URL with a token.
#   sweep | collect | compare | sft | daa | score | sample | judge | export-tldr ...
#       (or `overopt ...`) the `overopt` command itself.
#   bash ... | sh ...   a shell in the image.   help   this text.
#
# Secrets are never baked into the image: HF_TOKEN (the Hugging Face hub), OPENAI_API_KEY and
# OPENAI_BASE_URL (the judge) come from `docker run -e NAME` (or a Kubernetes Secret) and are
# inherited by `overopt` and the notebook kernels; this script reports only whether each is set.
#
# Binaries: `overopt` (built with --features cuda) needs the CUDA driver library that
# `docker run --gpus all` mounts; without it `overopt-cpu` (same code, CPU only) runs instead,
# which is all the teach scale needs. OVEROPT_BIN overrides the choice.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OVEROPT_OUT:-/out}
VENV=${OVEROPT_VENV:-$ROOT/environment/.venv}

say() { echo "entrypoint: $*" >&2; }
die() {
    say "$*"
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

has_driver() { ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; }

pick_bin() {
    if [ -n "${OVEROPT_BIN:-}" ]; then
        echo "$OVEROPT_BIN"
    elif command -v overopt >/dev/null && has_driver; then
        command -v overopt
    elif command -v overopt-cpu >/dev/null; then
        command -v overopt >/dev/null && say "no CUDA driver (run with --gpus all for the GPU build): using overopt-cpu"
        command -v overopt-cpu
    elif command -v overopt >/dev/null; then
        command -v overopt
    else
        die "no overopt binary on PATH (build one with environment/build.sh, or set OVEROPT_BIN)"
    fi
}

secrets() {
    local v line="secrets from the environment:"
    for v in HF_TOKEN OPENAI_API_KEY OPENAI_BASE_URL; do
        if [ -n "${!v:-}" ]; then line+=" $v set;"; else line+=" $v not set;"; fi
    done
    say "$line"
}

# The notebooks read and write out/<scale> under the repository by default; point out/ at the
# output volume so that `lab` finds what `reproduce` wrote there (OVEROPT_LINK_OUT=0: leave
# the repository alone, as the tests do).
link_out() {
    [ "${OVEROPT_LINK_OUT:-1}" = 1 ] || return 0
    if [ -d "$OUT" ] && [ ! -e "$ROOT/out" ] && [ ! -L "$ROOT/out" ]; then
        ln -s "$OUT" "$ROOT/out" 2>/dev/null || true
    fi
}

# The section's notebooks: 01..06 for all, else NN_<section with - as _>.
notebooks_for() {
    local s=$1 f names=()
    if [ "$s" = all ]; then
        for f in notebooks/0[1-6]_*.ipynb; do [ -e "$f" ] && names+=("$(basename "$f" .ipynb)"); done
    else
        for f in notebooks/[0-9][0-9]_"${s//-/_}".ipynb; do
            [ -e "$f" ] && names+=("$(basename "$f" .ipynb)")
        done
    fi
    echo "${names[@]}"
}

reproduce() {
    local section=all scale=teach out="" config="" args=("$@") i=0
    while [ $i -lt ${#args[@]} ]; do
        local a=${args[$i]} next=${args[$((i + 1))]:-}
        case "$a" in
        --section) section=$next ;;
        --section=*) section=${a#*=} ;;
        --scale) scale=$next ;;
        --scale=*) scale=${a#*=} ;;
        --out) out=$next ;;
        --out=*) out=${a#*=} ;;
        --config) config=$next ;;
        --config=*) config=${a#*=} ;;
        esac
        i=$((i + 1))
    done
    if [ -z "$out" ]; then
        out=$OUT/$scale
        args+=(--out "$out")
    fi
    mkdir -p "$out"
    # The notebook kernels run in notebooks/: hand them absolute paths.
    out=$(realpath -m "$out")
    [ -z "$config" ] || config=$(realpath -m "$config")
    local bin
    bin=$(pick_bin)
    say "$bin reproduce ${args[*]}"
    "$bin" reproduce "${args[@]}"

    if [ "${OVEROPT_NOTEBOOKS:-1}" = 0 ]; then
        say "OVEROPT_NOTEBOOKS=0: notebooks skipped; outputs in $out"
        return 0
    fi
    local names
    names=$(notebooks_for "$section")
    [ -n "$names" ] || die "no notebook for --section $section in $ROOT/notebooks"
    [ -x "$VENV/bin/python" ] || die "$VENV is missing: run environment/setup-notebooks.sh"
    local nb_out=$OUT/notebooks
    say "executing notebooks ($names) on $out into $nb_out"
    # shellcheck disable=SC2086 # names is a list of notebook names
    env OVEROPT_RESULTS="$out" OVEROPT_SCALE="$scale" ${config:+"OVEROPT_CONFIG=$config"} \
        "$VENV/bin/python" environment/run-notebooks.py --profile "$scale" --out "$nb_out" $names
    local files=() n
    for n in $names; do files+=("$nb_out/$n.ipynb"); done
    if ! "$VENV/bin/jupyter" nbconvert --to html --output-dir "$nb_out/html" "${files[@]}" >/dev/null 2>&1; then
        say "warning: the HTML export (nbconvert) failed; the executed notebooks are in $nb_out"
    fi
    say "done: results in $out, executed notebooks in $nb_out (HTML in $nb_out/html)"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
help | --help | -h) usage ;;
reproduce)
    secrets
    link_out
    reproduce "$@"
    ;;
lab)
    secrets
    link_out
    [ -f environment/lab.sh ] || die "environment/lab.sh is missing"
    exec bash environment/lab.sh "$@"
    ;;
overopt)
    exec "$(pick_bin)" "$@"
    ;;
sweep | collect | compare | sft | daa | score | sample | judge | export-tldr)
    secrets
    exec "$(pick_bin)" "$cmd" "$@"
    ;;
bash | sh) exec "$cmd" "$@" ;;
*)
    usage >&2
    die "unknown command: $cmd"
    ;;
esac
