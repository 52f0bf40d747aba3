#!/usr/bin/env bash
# The GPU check, in one prepared run of about 7.5 minutes wall on an H100 (bench/gpu_stages.py), most
# important first, each stage with its own time budget and its own result file, written as soon as it has
# rows, so that a run cut off still returns what it measured:
#   1. every compiled kernel and dtype against its float64 reference (bench/gpu_correctness.py);
#   2. the targets at N 8192, d_in 2048, d_sae 65,536, k 64, bf16 (TopK forward + backward <= 1.5x the
#      encoder GEMM, the training step <= 1.3x GEMM + Adam), the GEMM measured in the same process;
#   3. the fused TopK encoder and the training step over d_sae {16k, 65k, 262k} x k {32, 64, 128}, against
#      naive PyTorch and torch.compile of it (TFLOP/s, GB/s, x floor, peak memory);
#   4. the largest d_sae that trains in the GPU's memory, against the memory planner;
#   5. more cases at the target shape, while time is left.
#
#   bash bench/gpu_check.sh                     # files in $OUT, else bench/results/kernels/gpu-<device>-<date>/
#   bash bench/gpu_check.sh --dry-run           # every stage on CPU at tiny shapes (Triton's interpreter)
#   bash bench/gpu_check.sh --stages 1,2        # some stages only, e.g. a rerun after a fix
#   bash bench/gpu_check.sh --help              # budgets and the rest
#
# Files (8 at most, the device tool's limit): 1-kernels.json .. 5-extra.json, summary.json, summary.md
# (every stage's table), gpu-check.log; each with the device, driver, torch, triton and CUDA versions.
# Exit status 1 when a stage failed, was killed at its budget or did not run, or a kernel disagreed.
#
# It runs on that machine's own Python (torch + triton preinstalled), from this source tree, with nothing
# from the network and nothing installed: fastsae needs only torch, numpy, safetensors and tqdm there.
# A package missing there can travel as a wheel in ./.wheels (carry .wheels with the device tool); this
# script puts it on the path first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .wheels NAME==VERSION
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  # the dry run on a development machine: its virtualenv (CPU torch); on the GPU machine: its python3
  case " $* " in
    *" --dry-run "*) [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3 ;;
    *) PY=python3 ;;
  esac
fi
if compgen -G ".wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastsae-wheels \
    .wheels/*.whl && export PYTHONPATH="/tmp/fastsae-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
# fastsae from this tree (fastsae/_kernel_package.py maps kernels/ to fastsae.kernels): no install needed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_stages "$@"
