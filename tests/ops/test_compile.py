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

from fastsae.kernels._variants import Variant, all_variants

pytestmark = pytest.mark.compile

FULL = os.environ.get("FASTSAE_COMPILE_GRID", "quick") == "full"
VARIANTS = [v for v in all_variants() if FULL or "quick" in v.tags]
WORK = [(v, cc) for v in VARIANTS for cc in compile_check.TARGETS]

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
    row = {"stack": 0, "local": 0, "local_ops": 0, "hgmma": 0}
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
