"""fp32 GEMMs on CPU: PyTorch's F.linear (MKL's sgemm on x86) against oneDNN's (fastsae.ops.cpu_gemm.linear).

    OMP_NUM_THREADS=2 flock /work/heavy.lock python -m bench.cpu_gemm                       # the shapes below
    OMP_NUM_THREADS=2 flock /work/heavy.lock python -m bench.cpu_gemm --model gemma-3-270m  # + a model forward

Shapes (N, d_in, d_out), each x (N, d_in) @ W^T (d_out, d_in) + b: the SAE encoders fastsae trains on CPU
(the issue's reference step, a smaller batch, the main job's) and Gemma 3 270M's layers at 1,024 tokens
(attention's q projection, the MLP's up and down projections, the 262,144-word LM head). The two run
interleaved, a call each in turn, and the table gives medians; each row also gives both results' largest
error against float64, relative to Σ|x·W| for that output. --model adds a forward of that model
(fastsae.model.load, 8 × 128 random tokens) with its nn.Linear layers as loaded (oneDNN) and as plain
nn.Linear (MKL), and the largest difference in logits. Results go to bench/results/training/cpu-gemm-<date>.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.cpu_step import environment, interleaved
from bench.saving import RESULTS, save_report
from fastsae.ops import cpu_gemm

SHAPES = {
    "SAE encoder, the issue's CPU step": (2048, 768, 16384),
    "SAE encoder, N 256": (256, 768, 16384),
    "SAE encoder, the main job's (Gemma d 640, d_sae 4,096)": (1024, 640, 4096),
    "Gemma attention q projection": (1024, 640, 1024),
    "Gemma MLP up projection": (1024, 640, 2048),
    "Gemma MLP down projection": (1024, 2048, 640),
    "Gemma LM head": (1024, 640, 262144),
}


def _relative_error(got: torch.Tensor, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> float:
    exact = F.linear(x.double(), W.double(), b.double())
    scale = F.linear(x.double().abs(), W.double().abs()) + b.double().abs()
    return float(((got.double() - exact).abs() / scale.clamp_min(1e-30)).max())


def gemm_rows(repeats: int, warmup: int, shapes: dict[str, tuple[int, int, int]] = SHAPES) -> list[dict]:
    rows = []
    for name, (n, d_in, d_out) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        x, W = torch.randn(n, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, generator=gen)
        fns = {"F.linear": lambda x=x, W=W, b=b: F.linear(x, W, b),
               "oneDNN": lambda x=x, W=W, b=b: cpu_gemm.linear(x, W, b)}
        times = interleaved(fns, repeats, warmup)
        mkl, onednn = statistics.median(times["F.linear"]), statistics.median(times["oneDNN"])
        rows.append({"shape": name, "n": n, "d_in": d_in, "d_out": d_out, "f_linear_ms": mkl, "onednn_ms": onednn,
                     "speedup": mkl / onednn, "gflops_onednn": 2 * n * d_in * d_out / onednn / 1e6,
                     "f_linear_error": _relative_error(F.linear(x, W, b), x, W, b),
                     "onednn_error": _relative_error(cpu_gemm.linear(x, W, b), x, W, b),
                     "times_ms": times})
        print(f"{name}: F.linear {mkl:.1f} ms, oneDNN {onednn:.1f} ms", file=sys.stderr)
    return rows


def model_row(model_name: str, repeats: int, warmup: int) -> dict:
    from fastsae.model import load
    from fastsae.model.loading import CPUGemmLinear

    model, _ = load(model_name)
    ids = torch.randint(10, min(20000, model.config.vocab_size), (8, 128), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if type(m) is CPUGemmLinear]

    def forward(cls) -> torch.Tensor:
        for m in linears:
            m.__class__ = cls
        with torch.no_grad():
            return model(input_ids=ids).logits

    times = interleaved({"F.linear": lambda: forward(nn.Linear), "oneDNN": lambda: forward(CPUGemmLinear)},
                        repeats, warmup)
    difference = float((forward(nn.Linear) - forward(CPUGemmLinear)).abs().max())
    forward(CPUGemmLinear)
    mkl, onednn = statistics.median(times["F.linear"]), statistics.median(times["oneDNN"])
    return {"model": model_name, "tokens": ids.numel(), "linears": len(linears), "f_linear_ms": mkl,
            "onednn_ms": onednn, "speedup": mkl / onednn, "max_logit_difference": difference, "times_ms": times}


def markdown(result: dict) -> str:
    env = result["env"]
    lines = ["### fp32 GEMM on CPU: F.linear (MKL) against oneDNN (fastsae.ops.cpu_gemm)",
             f"{env['device']} ({env['cores']} cores, torch threads {env['torch_threads']}) · torch {env['torch']} · "
             f"{env['date']} · median of {result['repeats']} interleaved repetitions",
             "", "| GEMM | N × d_in × d_out | F.linear ms | oneDNN ms | speed-up | oneDNN GFLOP/s | "
                 "error F.linear | error oneDNN |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['n']} × {r['d_in']} × {r['d_out']} | {r['f_linear_ms']:.1f} | "
                     f"{r['onednn_ms']:.1f} | **{r['speedup']:.2f}×** | {r['gflops_onednn']:.0f} | "
                     f"{r['f_linear_error']:.1e} | {r['onednn_error']:.1e} |")
    lines += ["", "error: the largest |result − float64| / Σ|x·W| + |b| over the outputs."]
    if result.get("model"):
        m = result["model"]
        lines += ["", f"`{m['model']}` forward, {m['tokens']} tokens, its {m['linears']} nn.Linear layers: "
                      f"F.linear {m['f_linear_ms']:.0f} ms, oneDNN {m['onednn_ms']:.0f} ms, "
                      f"**{m['speedup']:.2f}×**; largest logit difference {m['max_logit_difference']:.1e}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_gemm", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default=None, help="also time a forward of this fastsae.model.load name")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a quick check, not a measurement)")
    parser.add_argument("--out", type=Path, default=RESULTS / "training",
                        help="directory for the JSON and markdown")
    args = parser.parse_args(argv)
    if cpu_gemm._op() is None:
        print("this PyTorch build has no oneDNN: nothing to compare", file=sys.stderr)
        return 1
    shapes = {"small": (33, 17, 65)} if args.small else SHAPES
    result = {"env": environment(), "repeats": args.repeats, "rows": gemm_rows(args.repeats, args.warmup, shapes),
              "model": model_row(args.model, args.repeats, args.warmup) if args.model else None}
    save_report(args.out, f"cpu-gemm-{result['env']['date'][:10]}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
