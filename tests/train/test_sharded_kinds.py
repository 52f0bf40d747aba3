"""Latent sharding of every kind: transcoders, skip transcoders, JumpReLU with θ trained (step, tanh, quadratic-L0)
and Matryoshka SAEs, on two gloo ranks against the single-process SAE (the reference of fastsae/ops/sharded_terms.py).

38 latents split 19 | 19; Matryoshka widths (7, 19, 30, 38) put a prefix boundary at the shard boundary and one
inside each shard. Inputs are float64 (torch.optim.Adam) but for the Triton cases (the interpreter, fp32, SAEAdam).
The reference backend's cases match to float64 rounding; the torch and Triton backends' to fp32's, since their
decoder weight gradient accumulates in fp32 whatever the inputs (torch_backend.segment_rows_sum), and the sharded
Matryoshka decode runs the backend's decode where one process runs the fused pass. Each case checks the loss and
its terms, x_hat, the latents, every gradient gathered over the ranks (θ's and W_skip's included, each non-zero),
and the parameters after one optimizer step; the sharded files then consolidate into the same SAE, θ and W_skip
included.
"""

import pytest
import torch
from sharded_steps import assert_step_matches, one_step, record_sharded_step
from spawn import run_ranks

from fastsae import SAE, use_backend
from fastsae.ops.distributed import ProcessGrid
from fastsae.train.sharded import ShardedSAE, consolidate, save_sharded

from conftest import make_sae

D_IN, D_SAE, N, K_AUX = 13, 38, 19, 5
TC = dict(apply_b_dec_to_input=False)
JUMP = dict(activation="jumprelu", jumprelu_threshold=0.3, jumprelu_bandwidth=0.2, l1_coefficient=0.2)
WIDTHS = (7, 19, 30)
# name: (config, backend, float64)
CASES = {
    "transcoder_topk": (dict(kind="transcoder", activation="topk", k=4, **TC), "torch", True),
    "skip_relu": (dict(kind="skip_transcoder", activation="relu", l1_coefficient=0.3, **TC), "reference", True),
    "skip_batchtopk": (dict(kind="skip_transcoder", activation="batchtopk", k=3, **TC), "torch", True),
    "jumprelu_step": (dict(jumprelu_sparsity="step", **JUMP), "reference", True),
    "jumprelu_tanh": (dict(jumprelu_sparsity="tanh", **JUMP), "torch", True),
    "jumprelu_quadratic": (dict(jumprelu_sparsity="quadratic", k=3, **JUMP), "reference", True),
    "matryoshka_topk": (dict(activation="topk", k=6, matryoshka_widths=WIDTHS), "reference", True),
    "matryoshka_skip_batchtopk": (dict(kind="skip_transcoder", activation="batchtopk", k=4,
                                       matryoshka_widths=WIDTHS, **TC), "torch", True),
    "matryoshka_jumprelu_quadratic": (dict(jumprelu_sparsity="quadratic", k=3, matryoshka_widths=WIDTHS, **JUMP),
                                      "reference", True),
    "skip_jumprelu_triton": (dict(kind="skip_transcoder", jumprelu_sparsity="step", **JUMP, **TC), "triton", False),
    # the Triton interpreter's TopK encoder takes seconds even here: its sharded merge is covered by test_sharded.py
    "matryoshka_skip_relu_triton": (dict(kind="skip_transcoder", activation="relu", l1_coefficient=0.3,
                                         matryoshka_widths=WIDTHS, **TC), "triton", False),
}


def _inputs(name, float64=None):
    """The same SAE (θ and W_skip not at their initial values), batch, target and dead latents in every process."""
    cfg, _, wide = CASES[name]
    sae = make_sae(d_in=D_IN, d_sae=D_SAE, seed=3, **cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if sae.cfg.activation == "jumprelu":
            sae.threshold.copy_(0.3 + 0.1 * torch.rand(D_SAE, generator=gen))
        if sae.cfg.kind == "skip_transcoder":
            sae.W_skip.copy_(0.2 * torch.randn(D_IN, D_IN, generator=gen))
    x = torch.randn(N, D_IN, generator=gen) * 2
    y = torch.randn(N, D_IN, generator=gen) if sae.cfg.kind != "sae" else None
    dead = torch.rand(D_SAE, generator=gen) < 0.4
    if wide if float64 is None else float64:
        sae, x, y = sae.double(), x.double(), None if y is None else y.double()
    return sae, x, y, dead


def _worker(rank, world, out_dir):
    grid = ProcessGrid.create(latent_size=world)
    results = {}
    for name, (_, backend, _) in CASES.items():
        sae, x, y, dead = _inputs(name)
        model = ShardedSAE.from_sae(sae, grid)
        s = model.shard
        with use_backend(backend):
            out, grads = one_step(model, x, dead[s.start:s.stop], K_AUX, y=y)
        record_sharded_step(results, name, model, out, grads)
        save_sharded(ShardedSAE.from_sae(_inputs(name, float64=False)[0], grid), out_dir / f"{name}-sharded")
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded_kinds")
    run_ranks(_worker, 2, out_dir)
    return out_dir, torch.load(out_dir / "results.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_step_equals_unsharded(sharded_results, name):
    _, got = sharded_results
    sae, x, y, dead = _inputs(name)
    with use_backend(CASES[name][1]):
        out, grads = one_step(sae, x, dead, K_AUX, y=y)
    assert_step_matches(got, name, sae, out, grads, torch.float64 if CASES[name][1] == "reference" else torch.float32)
    if sae.cfg.activation == "jumprelu":  # θ trained: every mode reaches it
        assert "threshold" in grads


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_files_consolidate_to_the_sae(sharded_results, tmp_path, name):
    out_dir, _ = sharded_results
    sae = _inputs(name, float64=False)[0]
    back = consolidate(out_dir / f"{name}-sharded", tmp_path / "sae")
    assert back.cfg == sae.cfg
    for loaded in (back, SAE.load(tmp_path / "sae")):
        state = loaded.state_dict()
        assert set(state) == set(sae.state_dict())
        for n, t in sae.state_dict().items():
            assert torch.equal(state[n], t), n
    if sae.cfg.activation == "jumprelu":
        assert back.threshold.requires_grad  # θ trains on after a reload
