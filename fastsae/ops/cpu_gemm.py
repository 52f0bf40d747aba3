"""fp32 GEMMs on CPU by whichever of MKL and oneDNN is faster on this machine, measured once and cached.

PyTorch sends a float32 `F.linear` on an x86 CPU to MKL's sgemm. oneDNN, built into the same wheel, has
its own fp32 GEMM (the matmul primitive behind `torch.ops.mkldnn._linear_pointwise`, which PyTorch's own
compiler emits for CPU linears). Which is faster depends on the CPU, so neither is assumed:
- on this project's AMD EPYC (2 cores, AVX-512) oneDNN is 2.1–2.8x faster at every shape fastsae runs (the
  CPU step's encoder 2048 × 768 × 16384: 123 against 274 ms; Gemma 3 270M's LM head at 1,024 tokens 0.82
  against 2.26 s; bench/results/training/cpu-gemm-2026-11-21.md);
- on an Intel Xeon (2 cores) it is no faster: 0.91–1.09x MKL across four shapes, the encoder GEMM 177–187 ms
  through oneDNN against 151–172 ms by MKL (issue 26, item 5).
Both are plain fp32 arithmetic (no bf16 or TF32 inside: errors ~3e-7 of Σ|x·W| for oneDNN, MKL's ~1e-7),
and oneDNN reads the weight in place and gives the same bits for 1 or 2 threads.

`linear(x, W, b)` is F.linear's function everywhere. Where oneDNN can run it (CPU, float32 everywhere, no
gradient asked for, oneDNN present and `torch.backends.mkldnn.enabled`, not while torch.compile traces), the
first call at a shape class times both GEMMs on that call's own tensors (one warm-up, then the least of a few
calls each) and keeps the faster. The verdict is keyed by the CPU model (/proc/cpuinfo), the torch version,
the thread count and the shape's power-of-two bucket (rows, d_in, d_out), held in memory and in
$FASTSAE_CACHE/cpu_gemm.json (default ~/.cache/fastsae), written atomically, so later processes reuse it;
delete the file to measure again (a damaged one is ignored and rewritten). Overrides:
`torch.backends.mkldnn.enabled = False` forces MKL, and `FASTSAE_CPU_GEMM=mkl|onednn|auto` forces either
(auto, the default, measures). The torch backend's encoders use `linear`, and so do the nn.Linear layers of
the models `fastsae.model.load` gives. The op has no autograd formula, so anything that needs a gradient
through the product keeps F.linear.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ENV = "FASTSAE_CPU_GEMM"
CHOICES = ("auto", "mkl", "onednn")
SCREEN_ENV = "FASTSAE_CPU_SCREEN"
CACHE_NAME = "cpu_gemm.json"
REPEATS = 3  # timed calls per path after one warm-up; one where a call takes over SLOW_S
SLOW_S = 0.25

_verdicts: dict[str, str] = {}  # key -> "mkl" | "onednn", this process's


@functools.cache
def _op():
    """The oneDNN linear op, or None in a build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def forced() -> str:
    """$FASTSAE_CPU_GEMM: "auto" (unset or empty), "mkl" or "onednn"."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"${ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}")
    return value


def forced_screen() -> str:
    """$FASTSAE_CPU_SCREEN: "auto" (unset or empty: measured), "on" or "off" (ops/screened_topk.py)."""
    value = os.environ.get(SCREEN_ENV, "").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"${SCREEN_ENV} must be one of auto, on, off, got {os.environ[SCREEN_ENV]!r}")
    return value


def _onednn_can_run(x: Tensor, W: Tensor, b: Tensor | None) -> bool:
    if torch.compiler.is_compiling():  # Inductor picks oneDNN for a traced F.linear itself, and cannot lower this op
        return False
    tensors = (x, W) if b is None else (x, W, b)
    return (torch.backends.mkldnn.enabled and _op() is not None and x.dim() >= 2 and W.dim() == 2
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                    for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def applies(x: Tensor, W: Tensor, b: Tensor | None = None) -> bool:
    """Whether linear(x, W, b) takes oneDNN's GEMM (measuring the two, once per key, where it may)."""
    if not _onednn_can_run(x, W, b):
        return False
    choice = forced()
    if choice != "auto":
        return choice == "onednn"
    return _verdict(x, W, b) == "onednn"


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, W, b): x (..., d_in), W (d_out, d_in), b (d_out,) -> (..., d_out), by oneDNN where it applies
    and is the faster here."""
    if applies(x, W, b):
        return _op()(x, W, b, "none", [], "")
    return F.linear(x, W, b)


# ---- the measured choice -----------------------------------------------------------------------------


@functools.cache
@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere), with its family, model and the
    vector ISA torch dispatches to: under a hypervisor the name can be as bare as "AMD EPYC", which both an
    AVX-512 Zen 4 and an AVX2 Zen 3 report, and GEMM verdicts (and benchmark tables) must tell them apart.
    Cached: key() asks for it on every linear call."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown cpu"
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    return f"{name} ({', '.join([*detail, torch.backends.cpu.get_cpu_capability()])})"


def _bucket(n: int) -> int:
    return max(n, 1).bit_length() - 1  # floor(log2 n): one bucket per power of two


def key(x: Tensor, W: Tensor) -> str:
    """The verdict's key: CPU model, torch version, thread count and the shape's power-of-two bucket."""
    rows = x.numel() // max(x.shape[-1], 1)
    shape = "x".join(f"2^{_bucket(n)}" for n in (rows, W.shape[1], W.shape[0]))
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {shape}"


def cache_file() -> Path:
    return Path(os.environ.get("FASTSAE_CACHE", Path.home() / ".cache" / "fastsae")) / CACHE_NAME


def _read_cache() -> dict[str, dict]:
    """The verdicts on disk; {} where there is no file or it is damaged (then measured again and rewritten)."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON (UnicodeDecodeError is a ValueError)
        return {}
    if not isinstance(data, dict):
        return {}
    verdicts = data.get("verdicts")
    if not isinstance(verdicts, dict):
        return {}
    return {k: v for k, v in verdicts.items() if isinstance(v, dict) and isinstance(v.get("path"), str)}


def _write_cache(k: str, entry: dict) -> None:
    """Add a verdict to the file, atomically: a temporary beside it, then os.replace (by hand, not fastsae.io's
    writers: ops sits above the package's modules in DESIGN.md's layers and imports none of them)."""
    verdicts = _read_cache()  # merged with what other processes wrote since
    verdicts[k] = entry
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            json.dump({"version": 1, "verdicts": verdicts}, f)
        os.replace(f.name, path)
    except OSError:  # a read-only or full cache: the verdict stays in this process only
        try:
            os.unlink(f.name)
        except (OSError, NameError):
            pass


def _seconds(path: str, run: Callable[[], object]) -> float:
    """The least wall time of run() (the GEMM named path) over REPEATS calls after one warm-up."""
    start = time.perf_counter()
    run()
    warm = time.perf_counter() - start
    best = float("inf")
    for _ in range(1 if warm > SLOW_S else REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _verdict(x: Tensor, W: Tensor, b: Tensor | None) -> str:
    """"mkl" or "onednn" for this call's key: from memory, else from disk, else measured on x, W, b."""
    return measured("", x, W, {"onednn": lambda: _op()(x, W, b, "none", [], ""), "mkl": lambda: F.linear(x, W, b)})


def measured(kind: str, x: Tensor, W: Tensor, runs: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest of runs for this kind of choice ("" for the GEMM's) and key(x, W): from memory,
    else from disk, else timed here on the call's own tensors (a verdict naming none of runs is measured again)."""
    k = f"{kind} | {key(x, W)}" if kind else key(x, W)
    if k not in _verdicts:
        entry = _read_cache().get(k)
        if entry is None or entry["path"] not in runs:
            with torch.no_grad():
                seconds = {name: _seconds(name, run) for name, run in runs.items()}
            entry = {"path": min(seconds, key=seconds.get), **{f"{name}_s": s for name, s in seconds.items()}}
            _write_cache(k, entry)
        _verdicts[k] = entry["path"]
    return _verdicts[k]
