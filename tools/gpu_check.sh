#!/usr/bin/env bash
# The GPU check: install the project on a bare GPU machine and run its GPU-only paths (tools/gpu_check.py),
# writing one JSON of figures. At most 8 minutes; every item reports on its own.
#
#   tools/gpu_check.sh [--json FILE] [--only ITEM ...]     on the GPU machine (default FILE: $OUT/gpu_check.json)
#   tools/gpu_check.sh --dry-run [--json FILE]            anywhere: CPU, tiny sizes, no install (CI runs this)
#
# On the GPU machine the files fetched by tools/gpu_wheels.sh must be in .whl/ (carried by the device call):
# they and this work tree are installed without any index, with dependency resolution, on top of the
# machine's own torch, timm, accelerate, numpy, ... (docs/benchmarks.md, "GPU check").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY=1; done
PY="${PYTHON:-python3}"
if [[ $DRY -eq 0 ]]; then
  WHEELS="${DIST_SEG_WHEELS:-$ROOT/.whl}"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run tools/gpu_wheels.sh on a machine with PyPI access and carry .whl" >&2
    exit 2
  fi
  t0=$(date +%s)
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  # Into the machine's own environment (it is bare and given back after the call), resolving dependencies
  # against what is installed there plus the carried files: an unmet constraint stops here with pip's message.
  # Only the project itself goes in with --no-deps: mlflow and ray are not carried (tools/gpu_wheels.sh).
  REQS=(omegaconf webdataset wids braceexpand hjson pydantic deepspeed antlr4-python3-runtime pycocotools)
  if ls "$WHEELS"/pydensecrf2-*.tar.gz >/dev/null 2>&1; then REQS+=(pydensecrf2); fi
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation --no-cache-dir "${REQS[@]}"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir "$ROOT"
  "$PY" -m pip check || echo "# pip check: the lines above are what is not installed (expected: mlflow, ray)"
  export PATH="$("$PY" -c 'import sys, os; print(os.path.dirname(sys.executable))'):$PATH"
  echo "# installed the project and ${#REQS[@]} carried requirements in $(( $(date +%s) - t0 )) s"
  # The installed copy, not the work tree, is what the check imports.
  cd /tmp
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# 470 s for the Python part leaves the install and the JSON inside 8 minutes.
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" "$ROOT/tools/gpu_check.py" "$@"
