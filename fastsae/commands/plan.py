"""`fastsae plan`: per-rank training memory and the largest d_sae that fits (fastsae.train.plan)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-rank memory of training an SAE on N GPUs, and the largest d_sae "
                                           "that fits")
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--k", type=int, default=64, help="active latents per row (default 64)")
    p.add_argument("--batch", type=int, default=8192, help="rows per optimizer step, all ranks together")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--latent-shards", type=int,
                   help="ranks the latents are split over (default: every GPU); the rest are data replicas")
    p.add_argument("--weights", default="float32", choices=("float32", "bfloat16"), help="master weights")
    p.add_argument("--compute", default="bfloat16", choices=("float32", "bfloat16"),
                   help="bfloat16: mixed precision (default); float32: none")
    p.add_argument("--backend", default="triton", choices=("triton", "torch"),
                   help="triton: the fused kernels (GPU, default); torch: dense pre-activations (CPU)")
    p.add_argument("--optimizer", default="fused", choices=("fused", "torch"))
    p.add_argument("--tied", action="store_true")
    p.add_argument("--activation", default="topk", choices=("topk", "batchtopk", "relu", "jumprelu"))
    p.add_argument("--resample-pool", type=int, default=0, help="rows kept for resampling (0: no resampling)")
    p.add_argument("--dead-fraction", type=float, default=0.0,
                   help="AuxK: the fraction of latents assumed dead (their rows are copied each step)")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from ..train.plan import PlanConfig, report

    cfg = PlanConfig(args.d_in, args.d_sae, args.k, args.batch, args.gpus, args.latent_shards, args.weights,
                     args.compute, "float32", args.backend, args.optimizer, args.tied, args.activation,
                     args.resample_pool, args.dead_fraction)  # a bad value: one line, from fastsae.cli's handler
    print(report(cfg, args.gpu_memory))
    return 0
