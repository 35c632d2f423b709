# overopt: the reproduction of "Scaling Laws for Reward Model Overoptimization in Direct
# Alignment Algorithms" (2024), with JupyterLab and the Rust kernel, for NVIDIA GPUs.
#
#   docker build -t overopt .                                   # H100/H200 (compute cap 90)
#   docker build -t overopt --build-arg CUDA_COMPUTE_CAP=80 .   # A100 (86: A40, 89: L40S)
#   docker run --rm --gpus all -v "$PWD/out:/out" overopt reproduce --section overoptimization --scale teach
#   docker run --rm --gpus all -p 8888:8888 -v "$PWD/out:/out" overopt lab
# Paper scale: the grid of artifact/configs/paper/grid.toml (TL;DR export, SFT, 63 DAA runs,
# each checkpoint judged by the API), resumable, into /out/paper:
#   docker run --rm --gpus all -v "$PWD/out:/out" -v hf-cache:/cache -e HF_TOKEN -e OPENAI_API_KEY \
#       overopt reproduce --scale paper --section overoptimization
# or one run at a time with the configs of artifact/configs/paper (they write under runs/paper/):
#   docker run ...same mounts, -v "$PWD/runs:/opt/overopt/runs"... overopt sft --config artifact/configs/paper/sft-pythia-1b.toml
#
# Every RUN step that installs or builds calls a script in environment/ that the README's
# commands and CI also run (with CPU features); apt-get is the only inline plumbing.
# tests/test_dockerfile.py checks that, the pins, and that nothing is fetched outside the
# package registries. Secrets are never baked in: pass them with `docker run -e NAME`.
# Needs BuildKit (the default builder since Docker 23) for the cargo cache mounts.

# Base image, pinned to an exact tag. CUDA 12.8.1:
# - candle 0.11's cudarc 0.19 supports CUDA 11.4-13.x and reads the version from
#   `nvcc --version` at build time (hence a -devel image: candle-kernels also needs nvcc);
# - 12.8 compiles for every GPU this project targets (sm_80 A100, sm_86 A40, sm_89 L40S,
#   sm_90 H100/H200) and for Blackwell;
# - candle-kernels ships PTX that the driver JIT-compiles at run time, so the host driver must
#   be at least as new as the toolkit: 12.8 needs driver >= 570, where a 13.x image would need
#   >= 580, which many clusters do not run yet. For an older driver build with an older
#   toolkit, e.g. --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 (driver >= 560);
# - no -cudnn- variant: the crate does not use candle's cudnn feature;
# - Ubuntu 24.04: Python 3.12 for the JupyterLab venv, and the distribution's rustup package.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04

# ---- toolchain: system packages and the Rust toolchain of rust-toolchain.toml ---------------
FROM ${CUDA_IMAGE} AS toolchain
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:$PATH \
    CARGO_TERM_COLOR=never
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential ca-certificates pkg-config python3 python3-venv rustup \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/overopt
# The version is read from rust-toolchain.toml by the script, nowhere else.
COPY rust-toolchain.toml ./
COPY environment/install-rust.sh environment/
RUN bash environment/install-rust.sh --install

# ---- build: the overopt binaries (CUDA, and CPU-only for machines without a GPU) -----------
FROM toolchain AS build
# Compute capability of the target GPU: 90 H100/H200, 80 A100, 86 A40.
ARG CUDA_COMPUTE_CAP=90
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY environment/build.sh environment/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/opt/overopt/target \
    FEATURES=cuda CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} OVEROPT_INSTALL_DIR=/opt/overopt-bin \
        bash environment/build.sh \
    && FEATURES= OVEROPT_INSTALL_DIR=/opt/overopt-bin OVEROPT_BIN_NAME=overopt-cpu \
        bash environment/build.sh

# ---- image: notebooks (JupyterLab, evcxr), the repository, the binaries ---------------------
FROM toolchain AS image
ARG CUDA_COMPUTE_CAP=90
# Kept for notebook kernels that build the crate with --features cuda.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    OVEROPT_OUT=/out \
    HF_HOME=/cache/huggingface
# The notebook environment: a venv with environment/requirements-notebooks.txt (pinned
# JupyterLab and clients), evcxr_jupyter at the version pinned in setup-notebooks.sh, the
# `overopt-rust` kernel spec, and `cargo fetch` of the crate's dependencies (hence the crate's
# manifest and sources here; the notebooks build offline).
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY environment/setup-notebooks.sh environment/requirements-notebooks.txt environment/evcxr-kernel.sh environment/
RUN bash environment/setup-notebooks.sh
COPY . .
COPY --from=build /opt/overopt-bin/ /usr/local/bin/
COPY environment/jupyter_server_config.py /etc/jupyter/jupyter_server_config.py
# Pre-warm the evcxr build directory and cache: run the quickstart notebook (smoke profile), so
# that the first notebook a user opens starts in seconds. Its outputs are thrown away.
RUN environment/.venv/bin/python environment/run-notebooks.py --profile smoke \
        --out /tmp/prewarm 00_quickstart \
    && rm -rf /tmp/prewarm /opt/overopt/out
VOLUME ["/out"]
EXPOSE 8888
ENTRYPOINT ["bash", "/opt/overopt/environment/entrypoint.sh"]
CMD ["help"]
