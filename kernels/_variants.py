"""Every compiled variant the launchers (and the autotuner) can choose, for ahead-of-time compilation.

tests/compile_check.py compiles each for its targets (sm_80 and sm_90; the Hopper-only
encoder candidates for sm_90) without a GPU and checks registers, spills, the
copy engine and the MMA instructions (tests/ops/test_compile.py).
A variant names its kernel, the argument types as Triton's launcher would
specialise them on a realistic large shape (pointers and sizes divisible by
16, unit strides folded into constants), the constexprs and the launch
options. Change a launcher's choices here too: the compile test is what
proves a choice fits in registers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    module: str  # the module that defines the kernel
    kernel: str  # the @triton.jit function's name
    label: str  # the configuration, for tables
    dtype: str  # "fp32" | "bf16" | "fp16": the SAE's dtype
    types: dict  # argument -> Triton type ("*bf16", "i32", "fp32"); every other argument is an i32 size
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None
    plain: tuple = ()  # i32 arguments not known to be multiples of 16
    unit: tuple = ()  # arguments equal to 1 (unit strides): Triton folds them into constants
    wgmma_expected: bool = False  # on sm_90: must use warpgroup MMA
    targets: tuple = (80, 90)  # the compute capabilities it is compiled for (tma / q4 encoders: sm_90 only)
    tags: tuple = field(default=())  # "quick": in the small set that `make test` compiles

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"

    def fn(self):
        return getattr(importlib.import_module(self.module), self.kernel)

    def signature(self, arg_names: list[str]) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) for triton.compiler.ASTSource."""
        constexprs = dict(self.constexprs)
        constexprs.update({a: 1 for a in self.unit})
        signature, attrs = {}, {}
        for i, arg in enumerate(arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
                continue
            signature[arg] = self.types.get(arg, "i32")
            if signature[arg].startswith("*") or (signature[arg] == "i32" and arg not in self.plain):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return signature, constexprs, attrs


def _encoder_families() -> list[tuple[str, str]]:
    """(dtype, tl.dot precision) pairs an encoder compiles for: fp32 in TF32 (default) and exact."""
    return [("fp32", "tf32"), ("fp32", "ieee"), ("bf16", "ieee"), ("fp16", "ieee")]


def _tile_types(dtype: str, c) -> dict:
    """x_ptr / w_ptr types: pointers, or (tma) tensor descriptors of the (BLOCK_M|BLOCK_N, BLOCK_K) tiles."""
    if not c.tma:
        return {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}"}
    return {"x_ptr": f"tensordesc<{dtype}[{c.block_m}, {c.block_k}]>",
            "w_ptr": f"tensordesc<{dtype}[{c.block_n}, {c.block_k}]>"}


def _encoder_configs(dtype: str, precision: str, k_pad: int | None) -> list:
    """(config, targets) of every candidate: the Hopper-only candidates (tma, q4) compile for sm_90 only.

    The tma / q4 variants are UNMEASURED ON HARDWARE: the check proves they compile for sm_90 with 0 spills,
    UTMALDG tile copies and (q4) HGMMA.64x128x16; timing on an H100 decides whether the autotuner keeps
    them among its candidates and whether one becomes the sm_90 default (now they come last)."""
    from ._autotune import encoder_configs

    everywhere = encoder_configs(1 << 20, 1 << 20, k_pad, DTYPES[dtype], precision)
    hopper = encoder_configs(1 << 20, 1 << 20, k_pad, DTYPES[dtype], precision, hopper=True)
    return [(c, (80, 90) if c in everywhere else (90,)) for c in hopper]


def topk_variants() -> list[Variant]:
    from .encoder_topk import MAX_K, topk_constexprs, topk_k_pad

    out = []
    k_pads = sorted({topk_k_pad(k, interpreter=False) for k in range(1, MAX_K + 1)})
    for dtype, precision in _encoder_families():
        for k_pad in k_pads:
            for i, (c, targets) in enumerate(_encoder_configs(dtype, precision, k_pad)):
                quick = ("quick",) if (dtype, k_pad, i) == ("bf16", 256, 0) else ()
                out.append(Variant(
                    f"{__package__}.encoder_topk", "_encoder_topk_kernel", f"K_PAD {k_pad} {precision} {c.label()}",
                    dtype,
                    types={**_tile_types(dtype, c), "b_ptr": f"*{dtype}", "key_ptr": "*i64", "count_ptr": "*i32",
                           "tau_ptr": "*fp32"},
                    constexprs={**topk_constexprs(k_pad, c, precision), "UPCAST": False},
                    num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg,
                    plain=("tiles_per_split", "stride_cm"), unit=("stride_xd", "stride_wd"),
                    wgmma_expected=dtype != "fp32", targets=targets, tags=quick))
    return out


def threshold_variants() -> list[Variant]:
    from .encoder_threshold import threshold_constexprs

    out = []
    for dtype, precision in _encoder_families():
        for i, (c, targets) in enumerate(_encoder_configs(dtype, precision, None)):
            out.append(Variant(
                f"{__package__}.encoder_threshold", "_encoder_threshold_kernel", f"{precision} {c.label()}", dtype,
                types={**_tile_types(dtype, c), "b_ptr": f"*{dtype}", "theta_ptr": "*fp32", "out_ptr": "*i64",
                       "count_ptr": "*i32"},
                constexprs={**threshold_constexprs(c, precision), "UPCAST": False},
                num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg,
                plain=("tiles_per_split", "capacity", "stride_cm"), unit=("stride_xd", "stride_wd"),
                wgmma_expected=dtype != "fp32", targets=targets,
                tags=("quick",) if (precision, i) == ("tf32", 0) or (dtype, c.block_m, c.tma) == ("bf16", 128, True)
                else ()))
    return out


def sparse_variants() -> list[Variant]:
    """Decode, value gradient and segment reduction: every block size their launchers pick."""
    from . import segment_reduce, sparse_decode

    out = []
    for dtype in DTYPES:
        for block_m, block_d in sorted({sparse_decode.blocks(d_in) for d_in in range(1, 4097)}):
            # decode takes values in the SAE's dtype (with b_dec: the forward; without: the encoders' input
            # gradient, ops' gather_rows of g cast to W's dtype) or fp32 gradients
            for coef, has_bias in sorted({(dtype, True), (dtype, False), ("fp32", False)}):
                out.append(Variant(
                    f"{__package__}.sparse_decode", "_decode_kernel",
                    f"values {coef}{'' if has_bias else ' no bias'} BLOCK {block_m}x{block_d}", dtype,
                    types={"val_ptr": f"*{coef}", "idx_ptr": "*i64", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                           "out_ptr": f"*{dtype}"},
                    constexprs={"HAS_BIAS": has_bias, "BLOCK_M": block_m, "BLOCK_D": block_d},
                    plain=("width",), tags=("quick",) if (dtype, coef, has_bias, block_d) == ("bf16", "bf16", True, 128)
                    else ()))
            out.append(Variant(
                f"{__package__}.sparse_decode", "_value_grad_kernel", f"BLOCK {block_m}x{block_d}", dtype,
                types={"grad_ptr": f"*{dtype}", "idx_ptr": "*i64", "w_ptr": f"*{dtype}", "out_ptr": "*fp32"},
                constexprs={"BLOCK_M": block_m, "BLOCK_D": block_d}, plain=("width", "stride_im")))
        for block_e, block_d in sorted({segment_reduce.blocks(d_in) for d_in in range(1, 4097)}):
            for out_dtype in sorted({dtype, "fp32"}):
                out.append(Variant(
                    f"{__package__}.segment_reduce", "_segment_reduce_kernel",
                    f"out {out_dtype} BLOCK {block_e}x{block_d}", dtype,
                    types={"seg_start_ptr": "*i64", "rows_ptr": "*i64", "coef_ptr": "*fp32", "y_ptr": f"*{dtype}",
                           "out_ptr": f"*{out_dtype}", "out_sum_ptr": "*fp32"},
                    constexprs={"HAS_SUM": out_dtype == "fp32", "BLOCK_E": block_e, "BLOCK_D": block_d}))
    return out


def prefix_variants() -> list[Variant]:
    """The Matryoshka prefix decode (x_hat and every prefix's loss): every block size its launcher picks (the
    decode's), one variant for any number of prefixes (a runtime loop)."""
    from . import sparse_decode
    from .prefix_decode import num_warps

    out = []
    for dtype in DTYPES:
        for block_m, block_d in sorted({sparse_decode.blocks(d_in) for d_in in range(1, 4097)}):
            out.append(Variant(
                f"{__package__}.prefix_decode", "_prefix_decode_kernel", f"BLOCK {block_m}x{block_d}", dtype,
                types={"val_ptr": f"*{dtype}", "idx_ptr": "*i64", "ends_ptr": "*i32", "w_ptr": f"*{dtype}",
                       "bias_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "part_ptr": "*fp32"},
                constexprs={"BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=num_warps(block_d),
                plain=("n_prefixes", "stride_vm", "stride_em"),
                tags=("quick",) if (dtype, block_d) == ("bf16", 128) else ()))
    return out


def optimizer_variants() -> list[Variant]:
    """Adam (elementwise, and per unit row at every block the launcher picks for d_in >= 16) and resampling
    (every flag combination at the widest block, every block for the fp32 SAE with optimizer state)."""
    from .adam import adam_block
    from .resample import resample_block

    out = []
    widths = (16, 32, 64, 128, 256, 512, 1024, 4096)
    scalars = {a: "fp32" for a in ("beta1", "beta2", "step_size", "bc2_sqrt", "eps", "encoder_scale")}
    for param, state in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
        types = {"w_ptr": f"*{param}", "g_ptr": f"*{param}", "m_ptr": f"*{state}", "v_ptr": f"*{state}", **scalars}
        out.append(Variant(f"{__package__}.adam", "_adam_rows_kernel", f"elementwise state {state}", param, types,
                           {"CONSTRAIN": False, "RENORM": False, "BLOCK": adam_block(4096)}, plain=("row_len",)))
        for block in sorted({adam_block(d) for d in widths}):
            out.append(Variant(f"{__package__}.adam", "_adam_rows_kernel", f"unit rows state {state} BLOCK {block}",
                               param, types, {"CONSTRAIN": True, "RENORM": True, "BLOCK": block},
                               plain=("row_len",),
                               tags=("quick",) if (param, state, block) == ("bf16", "fp32", 1024) else ()))
        pointers = {a: f"*{param}" for a in ("w_dec_ptr", "w_enc_ptr", "b_enc_ptr")}
        pointers.update({a: f"*{state}" for a in ("m_dec_ptr", "v_dec_ptr", "m_enc_ptr", "v_enc_ptr", "m_b_ptr",
                                                   "v_b_ptr")})
        pointers.update(latent_ptr="*i64", dir_ptr="*fp32", **scalars)
        blocks = sorted({resample_block(d) for d in widths}) if param == "fp32" else [resample_block(4096)]
        for has_enc in (False, True):
            for has_state in (False, True):
                for block in blocks if has_enc and has_state else [resample_block(4096)]:
                    out.append(Variant(f"{__package__}.resample", "_resample_kernel",
                                       f"enc {has_enc} state {has_state} BLOCK {block}", param, pointers,
                                       {"HAS_ENC": has_enc, "HAS_STATE": has_state, "BLOCK_D": block},
                                       plain=("stride_dir",)))
    return out


def all_variants() -> list[Variant]:
    return topk_variants() + threshold_variants() + sparse_variants() + prefix_variants() + optimizer_variants()
