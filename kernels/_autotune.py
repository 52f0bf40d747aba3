"""Tile configs of the fused encoders: a small generator, a prune filter, and one choice per shape.

On a GPU, the first call for a shape key (kernel, d_in, d_sae, K_PAD, dtype,
precision, device) times each candidate the filter keeps on that call's own
inputs (triton.testing.do_bench) and caches the fastest for the process;
later calls with the key reuse it (FASTSAE_AUTOTUNE=0 takes the first
candidate untimed: each candidate costs a compile, about 30 s, the first time
a process on a machine meets it). In Triton's interpreter there is a single
small config (tl.dot needs every dimension >= 16). tests/ops/test_compile.py
compiles every candidate for sm_80 and sm_90 and checks that none spills.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from ._common import interpreting, next_pow2

# int64 sort keys per thread in one chunk of a top-k compaction: 16 keys = 32 registers, which with the
# sort's temporaries stays clear of spilling at 4 and 8 warps (measured by tests/ops/test_compile.py).
KEYS_PER_THREAD = 4


@dataclass(frozen=True)
class EncoderConfig:
    """Tiles of a fused encoder: (BLOCK_M rows) x (BLOCK_N latents), stepping BLOCK_K through d_in."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # a register cap for ptxas (None: its own choice)
    tma: bool = False  # x and W tiles by Hopper's tensor copy engine (tensor descriptors), not cp.async
    quarters: bool = False  # the epilogue runs on the tile's four column quarters in turn (fewer registers)

    def launch_options(self) -> dict:
        """num_warps, num_stages (and maxnreg) for the kernel launch."""
        out = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return out if self.maxnreg is None else {**out, "maxnreg": self.maxnreg}

    def sub_m(self, cap: int) -> int:
        """Rows per chunk when a top-k compaction sorts CAP keys a row."""
        return max(1, min(self.block_m, KEYS_PER_THREAD * 32 * self.num_warps // cap))

    def label(self) -> str:
        cap = "" if self.maxnreg is None else f" r{self.maxnreg}"
        extra = (" tma" if self.tma else "") + (" q4" if self.quarters else "")
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}{cap}{extra}"


INTERPRETER = EncoderConfig(16, 32, 16, 4, 1)

# Hopper's warpgroup MMA needs BLOCK_M a multiple of 64 and 4 warps (a warpgroup) per 64 rows; a 64 x 128
# fp32 accumulator on one warpgroup (64 values a thread) left too few registers for the epilogue and spilled,
# so 128-wide tiles get two warpgroups. fp32 reads twice the bytes per element: half the BLOCK_K. Exact fp32
# (FMA, no tensor cores) spilled 8-88 B at every tile tried: ptxas held it to 128-168 registers (its own
# occupancy target) where 255 were allowed; with the cap lifted (maxnreg 255) 64 x 32 x 16 fits.
_CANDIDATES = {
    "16bit": (EncoderConfig(64, 128, 64, 8, 3), EncoderConfig(128, 64, 64, 8, 3), EncoderConfig(64, 64, 64, 4, 4)),
    "tf32": (EncoderConfig(64, 128, 32, 8, 3), EncoderConfig(128, 64, 32, 8, 3)),
    "ieee": (EncoderConfig(64, 32, 16, 4, 1, maxnreg=255),),
}
# Extra 16-bit candidates on Hopper (sm_90), after the others. UNMEASURED ON HARDWARE: they compile for sm_90
# with 0 spills (bench/results/kernels/compile-occupancy.md), and timing on an H100 decides whether the
# autotuner picks them and whether one becomes the default. tma: x and W tiles by the tensor copy engine
# (UTMALDG) instead of cp.async (LDGSTS), alone at the default tile; q4 (epilogue by column quarters) lets
# each warpgroup own a 64 x 128 accumulator, so the MMA is HGMMA.64x128x16 instead of 64x64x16.
_HOPPER = (EncoderConfig(128, 128, 64, 8, 3, tma=True, quarters=True),
           EncoderConfig(64, 128, 64, 4, 3, tma=True, quarters=True),
           EncoderConfig(64, 128, 64, 8, 3, tma=True))


def _family(dtype: torch.dtype, precision: str) -> str:
    return precision if dtype == torch.float32 else "16bit"


def topk_k_pad(k: int, interpreter: bool | None = None) -> int:
    """Candidates per (row, slice): k rounded up to a power of two. On a GPU at least 64: a row's list holds
    next_pow2(K_PAD + BLOCK_N) >= 128 slots anyway, so smaller K_PAD would save nothing but add compiled
    variants (each costs about a minute of the compile check)."""
    interpreter = interpreting() if interpreter is None else interpreter
    return max(16 if interpreter else 64, next_pow2(k))


def topk_capacity(k_pad: int, block_n: int) -> int:
    """Slots of a row's candidate list: the K_PAD kept plus room for one whole tile."""
    return next_pow2(k_pad + block_n)


def encoder_configs(d_in: int, d_sae: int, k_pad: int | None, dtype: torch.dtype, precision: str,
                    hopper: bool = False) -> list[EncoderConfig]:
    """The candidates for a shape, in order of preference (hopper: for an sm_90 device). The filter only
    removes candidates, so every shape's list is a subset of the largest shapes' (which the compile test
    covers)."""
    family = _CANDIDATES[_family(dtype, precision)]
    if hopper and _family(dtype, precision) == "16bit":
        family += _HOPPER
    kept = [c for c in family if _keep(c, d_in, d_sae, k_pad)]
    return kept or [family[0]]


def is_hopper(device: torch.device) -> bool:
    """An sm_90 GPU: the only target where the tma / q4 candidates are compiled and checked."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _keep(c: EncoderConfig, d_in: int, d_sae: int, k_pad: int | None) -> bool:
    if c.block_n > max(64, next_pow2(d_sae)):  # a latent tile mostly past d_sae
        return False
    if c.block_k > max(32, next_pow2(d_in)):  # a d_in step mostly masked
        return False
    if c.tma and d_in % 8:  # a descriptor's row stride must be a multiple of 16 bytes
        return False
    if k_pad is not None and k_pad >= 128 and c.block_m > 64:  # the compaction sorts 512 keys a row
        return False
    return True


_chosen: dict[tuple, EncoderConfig] = {}


def choose(kernel: str, d_in: int, d_sae: int, k_pad: int | None, dtype: torch.dtype, precision: str,
           device: torch.device, run: Callable[[EncoderConfig], object]) -> EncoderConfig:
    """The config for this shape: cached, else the fastest candidate of run(config) (one launch each)."""
    if interpreting():
        return INTERPRETER
    key = (kernel, d_in, d_sae, k_pad, dtype, precision, str(device))
    if key not in _chosen:
        candidates = encoder_configs(d_in, d_sae, k_pad, dtype, precision, is_hopper(device))
        if len(candidates) == 1 or os.environ.get("FASTSAE_AUTOTUNE", "1") == "0":
            _chosen[key] = candidates[0]
        else:
            times = [triton.testing.do_bench(lambda c=c: run(c), warmup=3, rep=10) for c in candidates]
            _chosen[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _chosen[key]
