#!/usr/bin/env bash
# The GPU check: install the project on a bare GPU machine and run its GPU-only paths (tools/gpu_check.py),
# writing one JSON of figures. At most 8 minutes; every item reports on its own.
#
#   tools/gpu_check.sh [--json FILE] [--only ITEM ...]     on the GPU machine (default FILE: $OUT/gpu_check.json)
#   tools/gpu_check.sh --dry-run [--json FILE]            anywhere: CPU, tiny sizes, no install (CI runs this)
#
# On the GPU machine the wheels fetched by tools/gpu_wheels.sh must be in .whl/ (carried by the device call):
# they and this work tree are installed into a private folder (/tmp/dist_seg_site) without any index, on top
# of the machine's own torch, timm, accelerate, numpy, ... (docs/benchmarks.md, "GPU check").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY=1; done
PY="${PYTHON:-python3}"
if [[ $DRY -eq 0 ]]; then
  SITE="${DIST_SEG_SITE:-/tmp/dist_seg_site}"
  WHEELS="${DIST_SEG_WHEELS:-$ROOT/.whl}"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run tools/gpu_wheels.sh on a machine with PyPI access and carry .whl" >&2
    exit 2
  fi
  t0=$(date +%s)
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  # The project from this work tree (setuptools and wheel come with the machine's Python).
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$ROOT"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
  echo "# installed the project and $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s"
  # The installed copy, not the work tree, is what the check imports.
  cd /tmp
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# 470 s for the Python part leaves the install and the JSON inside 8 minutes.
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" "$ROOT/tools/gpu_check.py" "$@"
