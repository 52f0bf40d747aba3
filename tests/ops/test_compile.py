"""Every Triton kernel compiles for sm_80 and sm_90 on this CPU machine, without spilling.

Compiled ahead of time by tests/compile_check.py (triton.compile for a
GPUTarget, ptxas and cuobjdump from the triton wheel; no GPU or driver).
By default a small representative set (the variants tagged "quick" in
fastsae.kernels._variants) compiles, so `make test` stays quick; the full
grid runs with FASTSAE_COMPILE_GRID=full, or as `make compile-check`, which
CI runs too. Results are cached per kernel source hash (see compile_check).

    FASTSAE_COMPILE_GRID=full .venv/bin/python -m pytest -q -m compile tests/ops/test_compile.py
"""

import os

import compile_check
import pytest
import torch

from fastsae.kernels._autotune import EncoderConfig, is_hopper
from fastsae.kernels._variants import Variant, all_variants
from fastsae.kernels.encoder_threshold import encoder_threshold
from fastsae.kernels.encoder_topk import encoder_topk

pytestmark = pytest.mark.compile

FULL = os.environ.get("FASTSAE_COMPILE_GRID", "quick") == "full"
VARIANTS = [v for v in all_variants() if FULL or "quick" in v.tags]
WORK = [(v, cc) for v in VARIANTS for cc in compile_check.TARGETS if cc in v.targets]

# A kernel that must spill: a 128 x 128 fp32 accumulator held by one warp is 512 values per thread,
# twice the 255 registers a thread can have.
SPILLING = Variant("compile_toys", "spilling_kernel", "128x128 fp32 on one warp", "fp32",
                   types={"x_ptr": "*fp32", "out_ptr": "*fp32"}, constexprs={}, num_warps=1, num_stages=1)


@pytest.fixture(scope="module")
def results():
    rows = compile_check.run(VARIANTS)
    print("\n" + compile_check.table(rows))
    return {(id(r["variant"]), r["cc"]): r for r in rows}


@pytest.mark.parametrize("variant,cc", WORK, ids=[f"{v.kernel}-{v.label}-{v.dtype}-sm_{cc}" for v, cc in WORK])
def test_compiles_without_spills(results, variant, cc):
    row = results[(id(variant), cc)]
    assert not row["problems"], f"{variant.name} {variant.label} {variant.dtype} sm_{cc}: {row['problems']}"
    r = row["result"]
    assert r["regs"] <= 255 and r["blocks_per_sm"] >= 1
    if cc == 90 and variant.wgmma_expected:
        assert r["hgmma"] > 0 and r["wgmma_ptx"]


def test_grid_covers_every_encoder_family():
    """16-bit encoders are expected to use warpgroup MMA; every dtype and both fp32 modes are compiled."""
    encoders = [v for v in all_variants() if "encoder" in v.kernel]
    assert {(v.dtype, v.constexprs["PRECISION"]) for v in encoders} == {
        ("fp32", "tf32"), ("fp32", "ieee"), ("bf16", "ieee"), ("fp16", "ieee")}
    assert all(v.wgmma_expected == (v.dtype != "fp32") for v in encoders)
    assert {v.constexprs["K_PAD"] for v in encoders if "topk" in v.kernel} == {64, 128, 256}
    assert all(v.constexprs["BLOCK_M"] >= 64 for v in encoders)  # warpgroup MMA needs M in multiples of 64


def test_the_check_fails_on_a_spilling_kernel():
    [row] = compile_check.run([SPILLING], targets=(90,), jobs=1)
    assert row["result"]["stack"] > 0
    assert any("spills" in p for p in row["problems"])


def test_the_check_fails_without_warpgroup_mma():
    row = {"stack": 0, "local": 0, "local_ops": 0, "hgmma": 0, "copy": "LDGSTS", "mma_shape": "-"}
    assert compile_check.problems(Variant("m", "k", "", "bf16", {}, {}, wgmma_expected=True), 90, row)
    assert not compile_check.problems(Variant("m", "k", "", "bf16", {}, {}, wgmma_expected=True), 80, row)


def test_occupancy_from_registers_and_shared_memory():
    assert compile_check.occupancy(255, 74752, 8, 90) == 1  # 256 regs x 256 threads fills the register file
    assert compile_check.occupancy(128, 0, 4, 90) == 4  # 128 regs x 128 threads: a quarter of it
    assert compile_check.occupancy(32, 100 * 1024, 4, 90) == 2  # shared memory bound: 228 KB / 101 KB
    assert compile_check.occupancy(32, 100 * 1024, 4, 80) == 1  # 164 KB on sm_80
    assert compile_check.occupancy(16, 0, 1, 80) == 32  # the per-SM block limit


def test_resource_line_is_parsed():
    text = " Function k:\n  REG:168 STACK:8 SHARED:0 LOCAL:4 CONSTANT[0]:560 TEXTURE:0"
    assert compile_check.parse_resources(text) == dict(regs=168, stack=8, static_shared=0, local=4)
    with pytest.raises(RuntimeError, match="no resource usage"):
        compile_check.parse_resources("nothing")


def test_copy_engine_and_mma_shape_are_read_from_sass():
    sass = ("  /*0a0*/ UTMALDG.2D [UR8], [UR6] ;\n  /*0b0*/ LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;\n"
            "  /*0c0*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;\n  /*0d0*/ LDG.E R3, desc[UR4][R4.64] ;")
    assert compile_check.copy_engine(sass) == "UTMALDG"
    assert compile_check.copy_engine(sass.replace("UTMALDG", "NOP")) == "LDGSTS"
    assert compile_check.copy_engine("LDG.E.64 R2, desc[UR4][R4.64] ;") == "LDG"
    assert compile_check.mma_shapes(sass) == "HGMMA.64x128x16"
    assert compile_check.mma_shapes("HMMA.16816.F32.BF16 R4, R8, R12, R4 ;") == "HMMA.16816"
    assert compile_check.mma_shapes("FFMA R1, R2, R3, R1 ;") == "-"


def test_the_check_fails_when_tma_or_wide_mma_is_missing():
    row = {"stack": 0, "local": 0, "local_ops": 0, "hgmma": 4, "copy": "LDGSTS", "mma_shape": "HGMMA.64x64x16"}
    tma = Variant("m", "k", "", "bf16", {}, {"TMA": True, "QUARTERS": True}, wgmma_expected=True, targets=(90,))
    assert len(compile_check.problems(tma, 90, row)) == 2
    assert not compile_check.problems(tma, 90, {**row, "copy": "UTMALDG", "mma_shape": "HGMMA.64x128x16"})


def test_hopper_only_candidates_compile_for_sm_90_only():
    """tma / q4 encoder variants exist for both 16-bit dtypes and are never compiled for sm_80."""
    hopper = [v for v in all_variants() if v.constexprs.get("TMA") or v.constexprs.get("QUARTERS")]
    assert {v.dtype for v in hopper} == {"bf16", "fp16"}
    assert all(v.targets == (90,) for v in hopper)


@pytest.mark.skipif(torch.cuda.is_available() and not is_hopper(torch.device("cuda")),
                    reason="tensor descriptors are compiled and checked for sm_90 only")
@pytest.mark.parametrize("d_in", [24, 13])  # 13: rows not 16-byte aligned, so the launcher falls back to loads
def test_hopper_candidates_match_the_plain_tiles(d_in):
    """The tma / q4 kernels (the Hopper-only candidates, run here in the interpreter or on an sm_90 GPU) give
    what the same tiles give through plain loads and a whole-tile epilogue: bit for bit in the interpreter,
    and to fp32 summation-order error compiled (the two may pick different MMA layouts)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, d_in, generator=gen).to(device, torch.bfloat16)
    W = (torch.randn(150, d_in, generator=gen) / 4).to(device, torch.bfloat16)
    b = (torch.randn(150, generator=gen) / 8).to(device, torch.bfloat16)
    theta = (0.2 * torch.rand(150, generator=gen)).to(device)
    plain, hopper = EncoderConfig(16, 64, 16, 4, 1), EncoderConfig(16, 64, 16, 4, 1, tma=True, quarters=True)
    for got, want in ((encoder_topk(x, W, b, 7, splits=2, config=hopper), encoder_topk(x, W, b, 7, splits=2,
                                                                                       config=plain)),
                      (encoder_threshold(x, W, b, theta, 64, splits=2, config=hopper),
                       encoder_threshold(x, W, b, theta, 64, splits=2, config=plain))):
        for g, w in zip(got, want, strict=True):  # integer outputs (indices, counts) must match exactly
            torch.testing.assert_close(g, w, rtol=0 if device == "cpu" else 1e-5, atol=0 if device == "cpu" else 1e-5)
