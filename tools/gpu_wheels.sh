#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels that tools/gpu_check.sh installs on the bare GPU machine.
#
# The GPU machine (docs/benchmarks.md, "GPU check") runs Python 3.12 with torch, timm, accelerate, numpy,
# scipy, scikit-learn, matplotlib, pillow, pyyaml, tqdm, psutil, einops, msgpack, ninja, py-cpuinfo and
# nvidia-ml-py already installed, and reaches no package index. What the training, DeepSpeed and data paths
# need beyond that is listed below; everything is downloaded for CPython 3.12 / manylinux x86-64 into
# .whl/ (git-ignored), which the device call carries (`carry: [".whl"]`, 64 MiB with the work tree).
# Pure-Python packages published only as source (deepspeed, antlr4-python3-runtime) are built into wheels
# here (DeepSpeed without its C++/CUDA ops: the check uses none that need compiling).
#
# Not carried, on purpose: faiss-gpu (its 1.15.1 wheel alone is ~135 MB and needs the CUDA 12 runtime and
# cuBLAS wheels, several hundred MB more: over the carry limit; the check records the faiss-gpu item as
# skipped with that reason), mlflow and ray (the check runs with tracking off and no sweep), pydensecrf2.
#
# Usage: tools/gpu_wheels.sh [DEST]   (default DEST: .whl in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Binary or universal wheels published on PyPI (pinned to what this project is tested with).
BINARY=(
  "omegaconf==2.4.0" "webdataset==1.0.2" "wids==0.1.11" "braceexpand==0.1.7" "hjson==3.1.0"
  "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')"
  "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')"
  "annotated-types==$(python3 -c 'import importlib.metadata as m; print(m.version("annotated-types"))')"
  "typing-inspection==$(python3 -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')"
  # pydantic needs a recent one; the machine's may be older.
  "typing-extensions==$(python3 -c 'import importlib.metadata as m; print(m.version("typing-extensions"))')"
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
# Source-only pure-Python packages: build them here (no compiled code, so the wheel works on 3.12 there).
DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" \
  "deepspeed==$(python3 -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" \
  "antlr4-python3-runtime==$(python3 -c 'import importlib.metadata as m; print(m.version("antlr4-python3-runtime"))')"
# The project itself is installed on the device from the work tree that travels with the call.
ls -la "$DEST"
du -sh "$DEST"
