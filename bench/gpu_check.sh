#!/usr/bin/env bash
# On a CUDA machine: compile and test every kernel, then run the quick benchmark.
#
#   bash bench/gpu_check.sh            # results land in bench/results/ (or $OUT)
#
# Uses that machine's own Python (torch + triton preinstalled, no internet).
# Missing pure-Python tools (pytest, setuptools>=64, wheel) are installed from
# ./.wheels when present; fill it beforehand on a machine with a registry:
#   pip download --no-deps -d .wheels pytest pluggy iniconfig packaging setuptools wheel
# and, with the device tool, carry .wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
FIND=()
[ -d .wheels ] && FIND=(--no-index --find-links .wheels)
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q "${FIND[@]}" pytest
# Editable: maps kernels/ to fastsae.kernels also when run from this source tree.
"$PY" -m pip install -q --no-deps --no-build-isolation "${FIND[@]}" -e . 2>/dev/null \
  || "$PY" -m pip install -q --no-deps "${FIND[@]}" -e .
"$PY" -c "import torch, triton, sys; torch.cuda.is_available() or sys.exit('gpu_check.sh needs CUDA'); \
print('device', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
status=${PIPESTATUS[0]}
set -e
"$PY" -m bench --quick --out "$OUT"
exit "$status"
