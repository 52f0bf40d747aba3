"""The other SAE libraries the suite (bench/suite.py) times fastsae against, each where it is installed:
SAELens's SAE and EleutherAI sparsify's SparseCoder, built for one case and run as their own training loops
run them. A library that is missing, or a case it has no counterpart for, gives None (the suite's "n/a")."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bench.suite import Case


def build_saelens(case: Case, x: torch.Tensor):
    try:
        from sae_lens import SAE as LensSAE
    except ImportError:
        return None
    if case.activation == "batchtopk" or case.op not in ("encode", "step"):
        return None
    cfg = {"architecture": {"topk": "topk", "relu": "standard"}[case.activation], "d_in": case.d_in,
           "d_sae": case.d_sae, "dtype": str(x.dtype).removeprefix("torch."), "device": str(x.device),
           "apply_b_dec_to_input": True, "normalize_activations": "none"}
    if case.k:
        cfg["k"] = case.k
    lens = LensSAE.from_dict(cfg)
    if case.op == "encode":
        def encode():
            with torch.no_grad():
                return lens.encode(x)
        return encode
    opt = torch.optim.Adam(lens.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        (lens(x) - x).pow(2).sum(-1).mean().backward()
        opt.step()
    return step


def sparsify_coder(d_in: int, d_sae: int, k: int, device, dtype):
    """EleutherAI sparsify's SparseCoder (eai-sparsify), or None when it is not installed. Off CUDA its
    eager decoder (SPARSIFY_DISABLE_TRITON=1): its Triton one needs a GPU driver."""
    if torch.device(device).type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    return SparseCoder(d_in, SparseCoderConfig(k=k, num_latents=d_sae), device=device, dtype=dtype)


def sparsify_train_step(coder, x: torch.Tensor, lr: float = 1e-4) -> Callable[[], object]:
    """One step as sparsify's Trainer takes it: FVU loss, backward, the decoder-parallel gradient removed,
    torch.optim.Adam (its choice without bitsandbytes), decoder rows renormalised."""
    opt = torch.optim.Adam(coder.parameters(), lr=lr)

    def step():
        coder(x).fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()
    return step


def build_sparsify(case: Case, x: torch.Tensor):
    if case.activation != "topk" or case.op not in ("encode", "step"):
        return None
    coder = sparsify_coder(case.d_in, case.d_sae, case.k, x.device, x.dtype)
    if coder is None:
        return None
    if case.op == "encode":
        def encode():
            with torch.no_grad():
                return coder.encode(x)
        return encode
    return sparsify_train_step(coder, x)
