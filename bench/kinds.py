"""One training step of each kind of dictionary: fastsae against a naive PyTorch version of the same kind and
against the floor of the same shape (issue #27 item 5).

    python -m bench.kinds                 # N 2048, d_in 640, d_sae 16384, k 32 (Gemma 3 270M's width), CPU
    python -m bench.kinds --quick         # tiny shapes, seconds
    python -m bench.kinds --device cuda   # adds fastsae's Triton backend

A step is forward + backward + the optimizer's step. fastsae's is its Trainer's (`Trainer.step`, torch
backend; Triton too on CUDA). The naive one is written as SAELens and dictionary_learning write it: the dense
(N, d_sae) activations, JumpReLU and its L0 step as autograd Functions on dense tensors with the rectangle
kernel's straight-through gradient, Matryoshka as the mean of per-prefix dense decodes, a transcoder's dense
encode and decode against its target y, a skip transcoder's dense W_skip; torch.optim.Adam and the decoder
constraint as separate passes (bench/suite.py's naive_step). Before timing, each naive loss is checked against
fastsae's on the same weights and inputs, so that the two compute the same thing.

The floor (DESIGN.md): the vendor GEMM x @ W_enc^T at this shape (a skip transcoder's adds its x @ W_skip^T)
plus the step's minimum bytes over the measured copy bandwidth (bench/suite.py's min_bytes). The GEMMs are
timed as rows of the same interleaved repetitions as the steps (bench/cpu_step.py's interleaved), so each
ratio is taken side by side. KINDS is the one list: a new kind (the crosscoder) is one line.
Results go to bench/results/training/kinds-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from statistics import NormalDist

import torch

from bench.cpu_step import interleaved
from bench.kinds_naive import naive_loss
from bench.saving import RESULTS, run_environment, save_report
from bench.suite import Case, copy_bandwidth, min_bytes
from fastsae import SAE, SAEConfig, use_backend
from fastsae.train import TrainConfig, Trainer

LR = 1e-4
TRANSCODER = {"apply_b_dec_to_input": False}


TRANSCODERS = ("transcoder", "skip_transcoder")  # the kinds trained on (x, y) pairs


def kinds(d_sae: int, k: int) -> dict[str, dict]:
    """name: the SAEConfig fields beyond d_in, d_sae. JumpReLU's θ starts where unit-variance pre-activations
    fire k of d_sae latents, the sparsity the others have."""
    theta = NormalDist().inv_cdf(1 - k / d_sae)
    widths = tuple(w for w in (d_sae // 8, d_sae // 4, d_sae // 2) if w >= 1)
    return {
        "topk (reference SAE)": {"activation": "topk", "k": k},
        "jumprelu step": {"activation": "jumprelu", "jumprelu_sparsity": "step", "jumprelu_threshold": theta},
        "jumprelu quadratic": {"activation": "jumprelu", "jumprelu_sparsity": "quadratic", "k": k,
                               "jumprelu_threshold": theta},
        "matryoshka batchtopk": {"activation": "batchtopk", "k": k, "matryoshka_widths": widths},
        "transcoder": {"kind": "transcoder", "activation": "topk", "k": k, **TRANSCODER},
        "skip transcoder": {"kind": "skip_transcoder", "activation": "topk", "k": k, **TRANSCODER},
        # d_in is the sites side by side (2 of d_in/2 here): the same kernels as an SAE of that width
        "crosscoder (2 sites)": {"kind": "crosscoder", "n_sites": 2, "activation": "topk", "k": k},
    }


def _batch(sae: SAE, x: torch.Tensor, y: torch.Tensor):
    """What the trainer takes: x, or a transcoder's (x, y) pair."""
    return (x, y) if sae.cfg.kind in TRANSCODERS else x


def _forward_args(sae: SAE, x: torch.Tensor, y: torch.Tensor) -> dict:
    return {"target": y} if sae.cfg.kind in TRANSCODERS else {}


def _make_sae(cfg: SAEConfig, device: str) -> SAE:
    sae = SAE(cfg, device=device, seed=0)
    sae.check_finite = False  # neither the naive step nor the floor checks its inputs
    if cfg.kind == "skip_transcoder":
        with torch.no_grad():  # not the zero it starts at, so that the loss check sees the skip term
            sae.W_skip.copy_(torch.randn(cfg.d_in, cfg.d_in, generator=torch.Generator().manual_seed(5)).to(
                sae.W_skip) / cfg.d_in)
    return sae


def check_losses(cfg: SAEConfig, x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-4) -> dict:
    """fastsae's loss and the naive one on the same weights and inputs; a ValueError when they differ."""
    sae = _make_sae(cfg, x.device.type)
    with torch.no_grad():
        fast, naive = sae(x, **_forward_args(sae, x, y)).loss.item(), naive_loss(sae, x, y).item()
    if abs(fast - naive) > rtol * max(1.0, abs(fast)):
        raise ValueError(f"{cfg}: the naive loss {naive} is not fastsae's {fast}: the two compute different things")
    return {"loss_fastsae": fast, "loss_naive": naive}


def fastsae_step(cfg: SAEConfig, x, y, backend: str):
    sae = _make_sae(cfg, x.device.type)
    trainer = Trainer(sae, TrainConfig.flat(lr=LR, progress=False))
    batch = _batch(sae, x, y)

    def step():
        with use_backend(backend):
            trainer.step(batch, metrics=False)
    return step


def naive_step(cfg: SAEConfig, x, y):
    """bench/suite.py's naive step for this kind: its dense loss, Adam, the constraint as separate passes."""
    sae = _make_sae(cfg, x.device.type)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        naive_loss(sae, x, y).backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
    return step


def _sync(fn, device: str):
    if device != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()  # the timer reads the host clock: wait for the kernels
    return call


def run_kind(name: str, fields: dict, n: int, d_in: int, d_sae: int, repeats: int, warmup: int, device: str,
             bandwidth: float) -> list[dict]:
    cfg = SAEConfig(d_in, d_sae, **fields)
    gen = torch.Generator(device).manual_seed(1)
    x, y = (torch.randn(n, d_in, generator=gen, device=device) for _ in range(2))
    losses = check_losses(cfg, x, y)
    W_enc = torch.randn(d_sae, d_in, generator=gen, device=device)
    fns = {"floor: GEMM": lambda: x @ W_enc.T}
    if cfg.kind == "skip_transcoder":
        W_skip = torch.randn(d_in, d_in, generator=gen, device=device)
        fns["floor: skip GEMM"] = lambda: x @ W_skip.T
    fns["naive"] = naive_step(cfg, x, y)
    fns["fastsae torch"] = fastsae_step(cfg, x, y, "torch")
    if device == "cuda":
        fns["fastsae triton"] = fastsae_step(cfg, x, y, "triton")
    times = interleaved({row: _sync(fn, device) for row, fn in fns.items()}, repeats, warmup)
    median = {row: statistics.median(t) for row, t in times.items()}
    active = cfg.k or max(1, round(d_sae * (1 - NormalDist().cdf(fields["jumprelu_threshold"]))))
    bytes_ms = min_bytes(Case("step", "topk", n, d_in, d_sae, active), torch.float32) / bandwidth * 1e3
    floor = median["floor: GEMM"] + median.get("floor: skip GEMM", 0.0) + bytes_ms
    rows = [{"kind": name, "impl": "floor", "ms": floor, "gemm_ms": floor - bytes_ms, "bytes_ms": bytes_ms}]
    for row in fns:
        if not row.startswith("floor"):
            rows.append({"kind": name, "impl": row, "ms": median[row], "min_ms": min(times[row]),
                         "times_ms": times[row], "x_floor": median[row] / floor,
                         "x_naive": median[row] / median["naive"], **losses})
    return rows


def run(n: int, d_in: int, d_sae: int, k: int, repeats: int, warmup: int, device: str = "cpu",
        only: list[str] | None = None) -> dict:
    bandwidth = copy_bandwidth(torch.device(device))
    rows = []
    for name, fields in kinds(d_sae, k).items():
        if only is None or name in only:
            rows += run_kind(name, fields, n, d_in, d_sae, repeats, warmup, device, bandwidth)
    return {"env": run_environment(device), "shape": {"n": n, "d_in": d_in, "d_sae": d_sae, "k": k,
                                                      "dtype": "float32"},
            "copy_bandwidth_gbps": bandwidth / 1e9, "repeats": repeats, "warmup": warmup, "rows": rows}


def markdown(result: dict) -> str:
    env, s = result["env"], result["shape"]
    lines = [f"### One training step per kind · N {s['n']} · d_in {s['d_in']} · d_sae {s['d_sae']} · k {s['k']} · "
             f"{s['dtype']}",
             f"{env['device']} ({env['threads']} torch threads) · torch {env['torch']} · {env['date']} · median of "
             f"{result['repeats']} interleaved repetitions · copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s",
             "", "| kind | step | ms (median) | ms (min) | × floor | × naive | loss (fastsae / naive) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["impl"] == "floor":
            lines.append(f"| {r['kind']} | floor (GEMM {r['gemm_ms']:.1f} + bytes {r['bytes_ms']:.1f}) | "
                         f"{r['ms']:.1f} | | 1.00 | | |")
            continue
        lines.append(f"| {r['kind']} | {r['impl']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['x_floor']:.2f} | "
                     f"{r['x_naive']:.2f} | {r['loss_fastsae']:.5g} / {r['loss_naive']:.5g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kinds", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (N 64, d_in 24, d_sae 256, k 8): seconds")
    parser.add_argument("--only", nargs="+", metavar="KIND", help="only these kinds (names as in the table)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "training"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d_in, args.d_sae, args.k, args.repeats, args.warmup = 64, 24, 256, 8, 3, 1
    result = run(args.n, args.d_in, args.d_sae, args.k, args.repeats, args.warmup, args.device, args.only)
    save_report(args.out, f"kinds-{args.device}-{result['env']['date']}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
