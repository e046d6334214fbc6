#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, what tools/gpu_check.sh installs on the bare GPU check machine.
#
# The target is the H200 check machine (docs/benchmarks.md, "GPU check"): Python 3.12, torch 2.11 built for
# CUDA 13.0 (driver 580), torchvision, timm, accelerate, numpy, scipy, scikit-learn, matplotlib, pillow, pyyaml,
# tqdm, psutil, einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, cython, setuptools and wheel already
# installed, and no package registry. What the checked paths import beyond that goes into .whl/ (git-ignored;
# the device call carries it: `carry: [".whl"]`, 64 MiB together with the work tree):
#   * binary wheels for CPython 3.12 / manylinux x86-64: omegaconf, webdataset, wids, braceexpand, hjson,
#     pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions), pycocotools;
#   * pure-Python sdist-only packages built into wheels here: deepspeed (no C++/CUDA ops compiled; the check
#     uses none that need compiling), antlr4-python3-runtime;
#   * pydensecrf2 as its source archive: it publishes no wheel, so gpu_check.sh builds it there (Cython and a
#     C++ compiler are on that machine) and the CRF path is importable.
# gpu_check.sh installs these with dependency resolution (no --no-deps): a constraint the machine's own
# packages do not meet stops the install with pip's message instead of being hidden.
#
# Not carried, and why:
#   * faiss: no faiss wheel from the faiss maintainers has Hopper kernels (faiss-gpu-cu12 1.14 declares compute
#     capability 7.0-8.9 and links the CUDA 12 runtime; torch there is CUDA 13). The check's knn-faiss-gpu item
#     records why `backend=auto` keeps the exact torch search. (A third-party CUDA 13 build, `faiss-cuda`,
#     declares sm_90; it was not tried here.) faiss-cpu is not needed: no checked path uses it.
#   * mlflow and ray: the check runs with tracking off and no sweep (their wheels are far over the carry limit).
#
# Usage: tools/gpu_wheels.sh [DEST]   (default DEST: .whl in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
mkdir -p "$DEST"
PY=python3
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Versions this project is tested with (read from this environment), fetched for CPython 3.12.
BINARY=(
  "omegaconf==$(version omegaconf)" "webdataset==$(version webdataset)" "wids==$(version wids)"
  "braceexpand==$(version braceexpand)" "hjson==$(version hjson)"
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)"
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
  "typing-extensions==$(version typing-extensions)" "pycocotools==$(version pycocotools)"
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
# Source-only pure-Python packages: built here (no compiled code, so the wheel works on 3.12 there).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" \
  "deepspeed==$(version deepspeed)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
# pydensecrf2: the source archive, built on the GPU machine by gpu_check.sh.
"$PY" -m pip download --quiet --no-deps --no-build-isolation --no-binary=:all: -d "$DEST" "pydensecrf2==$(version pydensecrf2)"
ls -la "$DEST"
du -sh "$DEST"
