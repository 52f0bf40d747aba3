"""The Matryoshka loss, forward + backward: fastsae's fused prefix decode against the naive sum of per-prefix
decodes and against torch.compile of it (issue #27 item 2).

    OMP_NUM_THREADS=2 python -m bench.matryoshka     # N 2048, d_in 256, d_sae 8192, k 32, 4 nested prefixes
    python -m bench.matryoshka --n 256 --d-sae 2048 --repeats 3    # a quick look
    python -m bench.matryoshka --device cuda --n 4096 --d-in 2304 --d-sae 65536 --k 128   # on a GPU

Each row computes the P prefixes' mse of TopK latents (values, indices (N, k)) and backpropagates their mean
to values, W_dec, b_dec and x:

- fused: `fastsae.ops.matryoshka.matryoshka_decode`, one pass over the active latents for all prefixes;
- fused, Triton (CUDA only): the triton backend's, whose forward is one kernel (kernels/prefix_decode.py)
  and whose backward is the fused row's;
- naive dense: what SAELens and dictionary_learning write, the dense (N, d_sae) activations and one
  `z[:, :m] @ W_dec[:m] + b_dec` per prefix;
- naive sparse: fastsae's own sparse decode once per prefix, the latents outside it masked to 0;
- naive dense, torch.compile: the naive dense row compiled (Inductor), its compile time left out.

Memory: CPUs have no allocator peak to read, so the table gives what each row keeps for its backward (the
tensors autograd saves, counted once per storage, inputs excluded, through saved_tensors_hooks): the one
allocation that grows with the prefixes. The compiled row saves inside its graph, out of the hooks' reach.
On CUDA each row also reports its allocator peak over one forward + backward, beyond the inputs.
Results go to bench/results/training/matryoshka-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.cpu_step import interleaved
from bench.saving import RESULTS, run_environment, save_report
from fastsae.ops import torch_backend, triton_backend
from fastsae.ops.matryoshka import matryoshka_decode


def inputs(n: int, d_in: int, d_sae: int, k: int, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    """values, indices (N, k) of distinct latents per row, W_dec (d_sae, d_in) unit rows, b_dec, x."""
    gen = torch.Generator(device).manual_seed(seed)
    indices = torch.rand(n, d_sae, generator=gen, device=device).topk(k, dim=1).indices
    values = torch.rand(n, k, generator=gen, device=device)
    W = torch.randn(d_sae, d_in, generator=gen, device=device)
    W /= W.norm(dim=1, keepdim=True)
    return [values.requires_grad_(), indices, W.requires_grad_(), torch.zeros(d_in, device=device, requires_grad=True),
            torch.randn(n, d_in, generator=gen, device=device).requires_grad_()]


def fused(values, indices, W, b, x, widths):
    return matryoshka_decode(values, indices, W, b, x, widths)[1].mean()


def fused_triton(values, indices, W, b, x, widths):
    return triton_backend.matryoshka_decode(values, indices, W, b, x, widths)[1].mean()


def naive_dense(values, indices, W, b, x, widths):
    z = torch.zeros(values.shape[0], W.shape[0], device=W.device).scatter(1, indices, values)  # (N, d_sae)
    return torch.stack([(x - (z[:, :m] @ W[:m] + b)).square().sum(1).mean() for m in widths]).mean()


def naive_sparse(values, indices, W, b, x, widths):
    return torch.stack([(x - torch_backend.decode(values * (indices < m), indices, W, b)).square().sum(1).mean()
                        for m in widths]).mean()


def saved_bytes(fn, args) -> int:
    """Bytes of the tensors autograd keeps for fn's backward, each storage once, the inputs left out."""
    storages = {}
    leaves = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in leaves:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def peak_mb(fn, args, widths) -> float:
    """CUDA allocator peak of one forward + backward beyond what is allocated before it (the inputs), MiB."""
    for t in args:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args, widths).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(n: int, d_in: int, d_sae: int, k: int, widths: tuple[int, ...], repeats: int, warmup: int,
        device: str = "cpu") -> dict:
    args = inputs(n, d_in, d_sae, k, device=device)
    cuda = device == "cuda"
    impls = {"fused (fastsae)": fused, **({"fused, Triton (fastsae)": fused_triton} if cuda else {}),
             "naive dense": naive_dense, "naive sparse (P decodes)": naive_sparse,
             "naive dense, torch.compile": torch.compile(naive_dense)}
    losses = {name: fn(*args, widths).item() for name, fn in impls.items()}  # compiles here, untimed

    def step(fn):
        def call():
            for t in args:
                t.grad = None
            fn(*args, widths).backward()
            if cuda:  # the timer reads the host clock: wait for the kernels
                torch.cuda.synchronize()
        return call

    times = interleaved({name: step(fn) for name, fn in impls.items()}, repeats, warmup)
    rows = []
    for name, fn in impls.items():
        saved = None if "compile" in name else saved_bytes(fn, [*args, widths])
        rows.append({"impl": name, "ms": statistics.median(times[name]), "min_ms": min(times[name]),
                     "times_ms": times[name], "saved_for_backward_mb": None if saved is None else saved / 2**20,
                     "peak_mb": peak_mb(fn, args, widths) if cuda else None, "loss": losses[name]})
    fused_ms = rows[0]["min_ms"]
    for row in rows:  # by the fastest call: on a shared CPU the median carries other jobs' load
        row["x_fused"] = row["min_ms"] / fused_ms
    return {"env": run_environment(device), "shape": {"n": n, "d_in": d_in, "d_sae": d_sae, "k": k,
                                                      "widths": list(widths), "dtype": "float32"},
            "repeats": repeats, "warmup": warmup, "rows": rows}


def markdown(result: dict) -> str:
    env, s = result["env"], result["shape"]
    lines = [f"### Matryoshka loss, forward + backward · N {s['n']} · d_in {s['d_in']} · d_sae {s['d_sae']} · "
             f"k {s['k']} · prefixes {s['widths']}",
             f"{env['device']} ({env['threads']} torch threads) · torch {env['torch']} · {env['date']} · median of "
             f"{result['repeats']} interleaved repetitions · fp32", "",
             "| implementation | ms (median) | ms (min) | × fused (min) | saved for backward (MiB) | peak (MiB) "
             "| loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        saved = "—" if r["saved_for_backward_mb"] is None else f"{r['saved_for_backward_mb']:.1f}"
        peak = "—" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['impl']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['x_fused']:.2f} | {saved} | {peak} | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.matryoshka", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="nested prefix widths (default d_sae/8, d_sae/4, d_sae/2, d_sae)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda adds the Triton kernel's row and each row's allocator peak")
    parser.add_argument("--out", default=str(RESULTS / "training"))
    args = parser.parse_args(argv)
    widths = tuple(args.widths or (args.d_sae // 8, args.d_sae // 4, args.d_sae // 2, args.d_sae))
    result = run(args.n, args.d_in, args.d_sae, args.k, widths, args.repeats, args.warmup, args.device)
    save_report(args.out, f"matryoshka-{args.device}-{result['env']['date']}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
