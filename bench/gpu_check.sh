#!/usr/bin/env bash
# On a CUDA machine, in one command: the kernel tests compiled (tests/test_kernels.py,
# tests/test_gpu.py), the ahead-of-time compile check of every kernel variant with this
# machine's triton (tests/test_compile.py, bench/compile_check.py), then the quick benchmark
# and the kernels issue's targets at N 8192, d_in 2048, d_sae 65,536, k 64, bf16:
# TopK forward + backward <= 1.5x the encoder GEMM, the training step <= 1.3x GEMM + Adam;
# last, the main job's eval phase along both paths (bench/eval_speed.py) on a randomly
# initialised Gemma 3 270M and SAE of the main job's shape: no weights to carry (needs transformers).
#
#   bash bench/gpu_check.sh            # results land in bench/results/ (or $OUT), named by device
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
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
status=0
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py tests/test_compile.py 2>&1 \
  | tee "$OUT/gpu-tests-$DEVICE.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
"$PY" -m bench.compile_check --table "$OUT/compile-occupancy-$DEVICE.md" > "$OUT/compile-check-$DEVICE.log" 2>&1 \
  || status=1
tail -n 3 "$OUT/compile-check-$DEVICE.log"
set -e
"$PY" -m bench --quick --out "$OUT"
# The targets, read off the benchmark just written (the newest quick run on this device).
"$PY" - "$OUT" <<'PY' | tee "$OUT/targets-$DEVICE.md" || status=1
import json, sys
from pathlib import Path
run = max(Path(sys.argv[1]).glob("*-quick-*.json"), key=lambda p: p.stat().st_mtime)
rows = json.loads(run.read_text())["rows"]
def row(op, impl):
    return next(r for r in rows if (r["op"], r["activation"], r["n"], r["d_in"], r["d_sae"], r["k"], r["impl"])
                == (op, "topk", 8192, 2048, 65536, 64, impl))
enc, enc_floor = row("encoder", "fastsae_triton"), row("encoder", "floor")
step = row("step", "fastsae_triton")
checks = [("TopK forward + backward / encoder GEMM", enc["ms"] / enc_floor["gemm_ms"], 1.5),
          ("training step / (GEMM + Adam bytes)", step["x_floor"], 1.3)]
print(f"Targets from {run.name} (N 8192, d_in 2048, d_sae 65536, k 64, bf16)\n")
print("| target | ratio | limit | met |\n|---|---:|---:|---|")
for name, ratio, limit in checks:
    print(f"| {name} | {ratio:.2f} | {limit} | {'yes' if ratio <= limit else 'NO'} |")
sys.exit(0 if all(r <= lim for _, r, lim in checks) else 1)
PY
"$PY" -m bench.eval_speed --random-model gemma-3-270m --out "$OUT" || status=1
exit "$status"
