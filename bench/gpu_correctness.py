"""Stage 1 of bench/gpu_check.sh: every compiled kernel, in every dtype, against its float64 reference.

The interpreter (the CPU test suite) checks the kernels' logic; only a GPU checks the compiled code:
tensor-core tiles, warpgroup MMA, the register-level sort of the TopK epilogue, int64 offsets past 2^31.
Each group below runs in a process of its own (bench/gpu_stages.py starts them side by side): a kernel
that faults poisons its CUDA context and costs only its own group, and the groups' cold compiles (the
fused encoders take 5-30 s each, kernels/_autotune.py) overlap on the machine's cores.

Shapes are odd (no block multiples) and small; the `realistic` group checks the target shape and an
N·d_sae past 2^31. Every candidate tile config of the autotuner is checked for the encoders, pinned,
since the autotuner may pick any of them on some shape.

Tolerances model what the kernel does: products and sums in fp32 (atol, times a per-check scale of about
the square root of the terms summed) and one rounding to the output dtype on store (rtol: twice its unit
roundoff); TF32 first rounds the GEMM's inputs to 10 bits of mantissa (about 1e-3 on a pre-activation).
A row records max_abs_err, rel_err (‖a − b‖ / ‖b‖), tol_ratio = max |a − b| / (atol + rtol·|b|) and
passed (tol_ratio ≤ 1 and the check's own conditions): a ratio near 1 on a pass is worth a look.

Here: the groups and how each runs. The comparisons and shapes are in bench/gpu_compare.py, the kernel
groups in bench/gpu_kernel_checks.py, the whole-SAE groups in bench/gpu_sae_checks.py.
"""

from __future__ import annotations

from bench.gpu_compare import FAMILIES
from bench.gpu_kernel_checks import adam_group, decode_group, resample_group, segment_group, threshold_group, topk_group
from bench.gpu_sae_checks import realistic_group, sae_bf16_group, sae_fp32_group, step_bf16_group

# Group name -> what it checks, in priority order (the order the driver starts them in). A group is one
# process on a GPU, and holds at most about four cold encoder compiles, so that a dozen of them side by
# side end within stage 1's budget.
GROUPS = {
    "topk-bf16": "fused TopK encoder, bf16, K_PAD 64, every tile config",
    "realistic": "TopK at the target shape (and its memory), and past 2^31 elements",
    "step-bf16": "a bf16 TopK SAE forward + backward of tests/ops/test_gpu.py's shape against float64",
    "sae-bf16": "a whole bf16 SAE forward + backward through the Triton backend against float64",
    "decode": "sparse decode and its value gradient (fp32, bf16, fp16)",
    "segment": "the segment reduction of the weight gradients (fp32, bf16, fp16), and its determinism",
    "adam-resample": "fused Adam (unit rows and elementwise, fp32/bf16 state) and resampling",
    "topk-bf16-wide": "fused TopK encoder, bf16, K_PAD 128 and 256, every tile config",
    "sae-fp32": "a whole fp32 SAE forward + backward (exact fp32) against float64, every activation",
    "threshold-bf16": "fused ReLU/JumpReLU encoder, bf16, every tile config",
    "topk-edges": "fused TopK encoder at one row and k 1, every dtype",
    "topk-fp16": "fused TopK encoder, fp16, K_PAD 64, every tile config",
    "topk-fp16-wide": "fused TopK encoder, fp16, K_PAD 128 and 256, every tile config",
    "topk-tf32": "fused TopK encoder, fp32 in TF32, every K_PAD and tile config",
    "topk-fp32": "fused TopK encoder, exact fp32, every K_PAD and tile config",
    "threshold-fp16": "fused ReLU/JumpReLU encoder, fp16, every tile config",
    "threshold-fp32": "fused ReLU/JumpReLU encoder, fp32 (TF32 and exact), every tile config",
}


def run_group(name: str, rec, ctx) -> None:
    runs = {
        "topk-bf16": lambda: topk_group(rec, ctx, ("bf16",), (64,)),
        "topk-bf16-wide": lambda: topk_group(rec, ctx, ("bf16",), (128, 256)),
        "topk-fp16": lambda: topk_group(rec, ctx, ("fp16",), (64,)),
        "topk-fp16-wide": lambda: topk_group(rec, ctx, ("fp16",), (128, 256)),
        "topk-tf32": lambda: topk_group(rec, ctx, ("tf32",), (64, 128, 256)),
        "topk-fp32": lambda: topk_group(rec, ctx, ("fp32",), (64, 128, 256)),
        "topk-edges": lambda: topk_group(rec, ctx, tuple(FAMILIES), (), edges=True),
        "threshold-bf16": lambda: threshold_group(rec, ctx, ("bf16",)),
        "threshold-fp16": lambda: threshold_group(rec, ctx, ("fp16",)),
        "threshold-fp32": lambda: threshold_group(rec, ctx, ("tf32", "fp32")),
        "decode": lambda: decode_group(rec, ctx),
        "segment": lambda: segment_group(rec, ctx),
        "adam-resample": lambda: (adam_group(rec, ctx), resample_group(rec, ctx)),
        "sae-fp32": lambda: sae_fp32_group(rec, ctx),
        "sae-bf16": lambda: sae_bf16_group(rec, ctx),
        "realistic": lambda: realistic_group(rec, ctx),
        "step-bf16": lambda: step_bf16_group(rec, ctx),
    }
    assert set(runs) == set(GROUPS)
    runs[name]()
