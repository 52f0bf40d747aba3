"""The parts of the CPU training step that fastsae's torch backend and trainer do differently, each timed against
what it replaced, side by side in one run (the numbers the docstrings and README cite).

    OMP_NUM_THREADS=2 flock /work/heavy.lock python -m bench.cpu_parts     # N 2048, d_in 768, d_sae 16384, k 32
    python -m bench.cpu_parts --n 256 --d-sae 2048 --repeats 3              # a quick look

Rows, each a median over interleaved repetitions (bench.cpu_step.interleaved):

- a fresh (d_sae, d_in) fp32 tensor, filled (a weight gradient's first touch), with transparent huge pages
  as fastsae sets them on import and, in a child process, with THP_MEM_ALLOC_ENABLE=0; and a kept one, filled;
- the encoder GEMM in fp32 against bf16 (AMX, where the CPU has it), and TopK's whole selection: the fp32 GEMM
  and the two-level top-k against the bf16 screen, fp32 rescore and certificate (ops/screened_topk.py);
- the group maxima of the two-level top-k on bf16 (the screen's): groups of adjacent columns against strided ones;
- top-k of the (N, d_sae) pre-activations: torch.topk against fastsae's two-level top-k;
- BatchTopK's selection (the batch's top N·k): a top-k over all N·d_sae entries and the masks, as it was, against
  the two-level selection over group maxima (`two_level_batch_select`);
- the decode backward's per-entry dots <grad[n], W[idx[n, j]]>: in batch order (as before) against latent
  order (`rows_dot`);
- the decoder constraint's row dots and update: linalg.vecdot in one go, a batch of bmm products, and
  `SAE.remove_parallel_decoder_grad_` (a block of rows at a time);
- tanh of a (640, 4096) float64 block, torch against numpy (the ICA fit's nonlinearity on CPU).

Results go to bench/results/training/cpu-parts-<date>.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bench.cpu_step import interleaved, step_arguments
from bench.saving import run_environment, save_report
from fastsae import SAE, SAEConfig
from fastsae.ops import cpu_gemm
from fastsae.ops.row_select import TOPK_GROUP, rows_dot, topk_rows, two_level_topk
from fastsae.ops.screened_topk import screened_topk
from fastsae.ops.torch_backend import two_level_batch_select


def fresh_filled(shape: tuple[int, int]) -> torch.Tensor:
    return torch.empty(shape).fill_(1.0)


def fresh_fill_without_huge_pages(shape: tuple[int, int], repeats: int, warmup: int) -> list[float]:
    """The fresh-tensor row timed in a child process that keeps 4 kB pages (PyTorch reads the setting once)."""
    code = (f"import json; from bench.cpu_parts import fresh_filled; from bench.cpu_step import interleaved; "
            f"print(json.dumps(interleaved({{'x': lambda: fresh_filled({shape})}}, {repeats}, {warmup})['x']))")
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_dot_batch_order(grad: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """What rows_dot did before: one dot per entry, entries in batch order (random rows of W)."""
    n, w = indices.shape
    offsets = torch.arange(0, n * w, w)
    bag_of_entry = torch.arange(n).repeat_interleave(w)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.contiguous(), W, indices.reshape(-1), offsets, bag_of_entry, 0, -1).view(n, w)


def batch_select_flat(pre: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What BatchTopK's selection did before: a top-k over every entry for tau, then the masks (out of place
    here, so that every repetition sees the same pre-activations)."""
    p = pre.relu()
    tau = torch.topk(p.reshape(-1), budget).values[-1]
    return ((p >= tau) & (p > 0)).nonzero(as_tuple=True)


def parts(n: int, d_in: int, d_sae: int, k: int) -> dict:
    """name -> function, grouped by the part they compare."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(n, d_sae, generator=gen)
    indices = torch.topk(torch.randn(n, d_sae, generator=gen), k, dim=1).indices
    grad, W = torch.randn(n, d_in, generator=gen), torch.randn(d_sae, d_in, generator=gen)
    kept = torch.empty(d_sae, d_in)
    sae = SAE(SAEConfig(d_in, d_sae), seed=0)
    sae.W_dec.grad = torch.randn(d_sae, d_in, generator=gen)
    g, Wd = sae.W_dec.grad, sae.W_dec.detach()
    block = torch.randn(640, 4096, dtype=torch.float64, generator=gen)
    x = torch.randn(n, d_in, generator=gen)
    W_enc, b_enc = torch.randn(d_sae, d_in, generator=gen) / d_in**0.5, torch.randn(d_sae, generator=gen) / 10
    xb, Wb = x.bfloat16(), W_enc.bfloat16()
    pre_bf16 = pre.bfloat16()
    return {
        "weight gradient": {"fresh, huge pages": lambda: fresh_filled((d_sae, d_in)),
                            "kept": lambda: kept.fill_(1.0)},
        "encoder GEMM": {"fp32": lambda: F.linear(x, W_enc, b_enc), "bf16": lambda: F.linear(xb, Wb)},
        "TopK selection": {"fp32 GEMM, two-level top-k": lambda: topk_rows(cpu_gemm.linear(x, W_enc, b_enc), k),
                           "bf16 screen, fp32 rescore": lambda: screened_topk(x, W_enc, b_enc, k)},
        "bf16 group maxima (the screen's top-k)": {
            "runs of 32 columns": lambda: pre_bf16.view(n, d_sae // TOPK_GROUP, TOPK_GROUP).amax(2),
            "strided columns": lambda: pre_bf16.view(n, TOPK_GROUP, d_sae // TOPK_GROUP).amax(1)},
        "top-k": {"torch.topk": lambda: torch.topk(pre, k, dim=1),
                  "two-level": lambda: two_level_topk(pre, k, TOPK_GROUP)},
        "batch top-k": {"flat top-k and masks": lambda: batch_select_flat(pre, n * k),
                        "two-level": lambda: two_level_batch_select(pre, n * k, TOPK_GROUP)},
        "decode backward dots": {"batch order": lambda: rows_dot_batch_order(grad, indices, W),
                                 "latent order": lambda: rows_dot(grad, indices, W)},
        "decoder constraint": {
            "vecdot in one go": lambda: g.addcmul_(torch.linalg.vecdot(g, Wd, dim=1).unsqueeze(1), Wd, value=-1.0),
            "bmm": lambda: g.addcmul_(torch.bmm(g.unsqueeze(1), Wd.unsqueeze(2)).squeeze(2), Wd, value=-1.0),
            "blocks of rows": sae.remove_parallel_decoder_grad_},
        "tanh (640, 4096) float64": {"torch": lambda: block.tanh(), "numpy": lambda: np.tanh(block.numpy())},
    }


def run(n: int, d_in: int, d_sae: int, k: int, repeats: int, warmup: int) -> dict:
    groups = parts(n, d_in, d_sae, k)
    rows = []
    for part, fns in groups.items():
        times = interleaved(fns, repeats, warmup)
        if part == "weight gradient":
            times["fresh, 4 kB pages"] = fresh_fill_without_huge_pages((d_sae, d_in), repeats, warmup)
        for name, t in times.items():
            rows.append({"part": part, "impl": name, "ms": statistics.median(t), "min_ms": min(t), "times_ms": t})
    env = run_environment("cpu", THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE"))
    return {"env": env, "shape": {"n": n, "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32"},
            "repeats": repeats, "warmup": warmup, "rows": rows}


def markdown(result: dict) -> str:
    env, s = result["env"], result["shape"]
    lines = [f"### Parts of the CPU training step · N {s['n']} · d_in {s['d_in']} · d_sae {s['d_sae']} · k {s['k']}",
             f"{env['device']} ({env['threads']} torch threads) · torch {env['torch']} · {env['date']} · median of "
             f"{result['repeats']} interleaved repetitions", "",
             "| part | implementation | ms (median) | ms (min) |", "|---|---|---:|---:|"]
    lines += [f"| {r['part']} | {r['impl']} | {r['ms']:.1f} | {r['min_ms']:.1f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = step_arguments("python -m bench.cpu_parts", __doc__.splitlines()[0]).parse_args(argv)
    result = run(args.n, args.d_in, args.d_sae, args.k, args.repeats, args.warmup)
    save_report(args.out, f"cpu-parts-{result['env']['date']}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
