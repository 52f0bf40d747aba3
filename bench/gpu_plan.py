"""The plan of bench/gpu_check.sh's run (bench/gpu_stages.py): its five stages, their time budgets, the
shapes each one measures (and the dry run's tiny ones), and the targets' limits."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = {1: "kernels", 2: "targets", 3: "sweep", 4: "capacity", 5: "extra"}
TITLES = {1: "Compiled kernels against their float64 references",
          2: "Targets at N 8192, d_in 2048, d_sae 65,536, k 64, bf16",
          3: "Sweep: fused TopK encoder and training step against naive PyTorch and torch.compile",
          4: "Largest dictionary that trains in GPU memory, against the memory planner",
          5: "Extra cases at the target shape"}
# Seconds per stage on an H100; the last stage gets the rest of TOTAL_S. The five stages' own guesses:
# stage 1's cold compiles (5-30 s per encoder config) overlap in up to 12 processes; stage 3 spends most
# of its time in torch.compile (20-40 s a shape), which comes last.
BUDGETS = {1: 100, 2: 90, 3: 160, 4: 75, 5: None}
TOTAL_S = 460  # 7 min 40 s: 8 minutes wall with room for the processes' start and the summary
GRACE_S = 8  # a job's own deadline is this much before the stage's; the driver kills it at the stage's
MIN_START_S = 12  # a stage with less time left than this is not started

TARGET = dict(n=8192, d_in=2048, d_sae=65_536, k=64)
SWEEP_D_SAE, SWEEP_K = (16_384, 65_536, 262_144), (32, 64, 128)
# The dry run: tiny and odd, since a fused TopK launch takes about a second a tile in Triton's interpreter.
DRY = dict(target=dict(n=12, d_in=16, d_sae=30, k=4), sweep_d_sae=(20, 30), sweep_k=(2, 4),
           capacity_start=16, capacity_step=8, fake_memory_latents=30)
LIMITS = {"TopK forward + backward / encoder GEMM": 1.5, "training step / (GEMM + Adam memory traffic)": 1.3}
SMI_ENV = "FASTSAE_GPU_CHECK_SMI"
TREE_ENV = "FASTSAE_GPU_CHECK_TREE"


def budgets_for(stages: list[int], overrides: dict[int, float], total: float) -> dict[int, float]:
    """Each stage's deadline, in seconds from the start: the cumulative sum of the budgets of the stages up
    to it, and never into the budgets of the stages after it."""
    own = {s: overrides.get(s, BUDGETS[s]) for s in stages}
    out, cumulative = {}, 0.0
    for i, s in enumerate(stages):
        later = sum(own[t] or 0 for t in stages[i + 1:])
        cumulative += own[s] if own[s] is not None else total
        out[s] = min(cumulative, total - later)
    return out
