"""Every kind of dictionary under torch.compile (issue #27 item 6): transcoders, skip transcoders, Matryoshka
SAEs and JumpReLU with θ trained. The compiled module's forward (a transcoder's with target=) and every gradient
(W_skip's and θ's included) equal eager's, in fp32 and under CPU autocast to bfloat16.

tests/modules/test_sae_compile.py covers the four activations of a plain SAE; this file adds what the kinds
add: the Matryoshka prefix decode (fastsae::matryoshka_decode), JumpReLU's θ estimators (traced torch ops
on the (N, w) slots), the target and the dense skip GEMM. KINDS is the one list: a new kind (the crosscoder,
SAEConfig(kind="crosscoder", n_sites=L, d_in=L·d)) is one more entry. Shapes are odd and tiny (d_in 13,
d_sae 37, N 19); compiling dominates the time, so each kind compiles twice (fp32, autocast) and no more.
"""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.ops import custom_ops  # noqa: F401 (registers torch.ops.fastsae)

D_IN, D_SAE, N = 13, 37, 19
SINGLE_GRAPH = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
TRANSCODER = {"apply_b_dec_to_input": False}
# a bandwidth wide enough that, at N 19, many entries fall within ε/2 of θ: θ's estimators have something to sum
JUMPRELU = {"activation": "jumprelu", "jumprelu_bandwidth": 0.5}

# name: the SAEConfig fields beyond d_in, d_sae (one line per kind)
KINDS = {
    "transcoder": {"kind": "transcoder", "activation": "topk", "k": 4, **TRANSCODER},
    "skip_transcoder": {"kind": "skip_transcoder", "activation": "topk", "k": 4, **TRANSCODER},
    "matryoshka_topk": {"activation": "topk", "k": 4, "matryoshka_widths": (5, 16)},
    "matryoshka_batchtopk": {"activation": "batchtopk", "k": 4, "matryoshka_widths": (5, 16)},
    "jumprelu_step": {**JUMPRELU, "jumprelu_sparsity": "step"},
    "jumprelu_tanh": {**JUMPRELU, "jumprelu_sparsity": "tanh"},
    "jumprelu_quadratic": {**JUMPRELU, "jumprelu_sparsity": "quadratic", "k": 6},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sae(fields: dict, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, **fields), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the initial zeros, so that no gradient is trivially zero
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(0.1 * torch.randn(D_IN, D_IN, generator=gen))
        if sae.cfg.activation == "jumprelu":
            # θ spread over the pre-activations' range, one per latent
            sae.threshold.copy_(0.2 + 0.3 * torch.rand(D_SAE, generator=gen))
    return sae


def _inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(N, D_IN, generator=gen) for _ in range(3))  # x, target y, a probe of x_hat


def _step(model, sae: SAE, x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor):
    """Forward and backward of the loss plus a probe of x_hat: the output and every gradient (x's too)."""
    sae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, target=y) if sae.cfg.kind != "sae" else model(x)
    (out.loss + (out.x_hat.float() * probe).sum()).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.requires_grad}
    return out, {**grads, "x": x.grad.clone()}


def _assert_same(out, grads, ref_out, ref_grads, atol: float, rtol: float) -> None:
    for name in ("x_hat", "loss", "prefix_mse", "l0", "threshold"):
        if getattr(ref_out, name) is not None:
            torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out.latents.to_dense(), ref_out.latents.to_dense(), atol=atol, rtol=rtol)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{name}'s gradient is zero: the test could not fail"
        torch.testing.assert_close(grads[name], ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


@SINGLE_GRAPH
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_kind_equals_eager(kind):
    sae, (x, y, probe) = _sae(KINDS[kind]), _inputs()
    ref_out, ref_grads = _step(sae, sae, x, y, probe)
    if sae.cfg.activation == "jumprelu":
        assert ref_grads["threshold"].abs().max() > 0  # θ is trained, and its estimator reached
    out, grads = _step(torch.compile(sae), sae, x, y, probe)
    _assert_same(out, grads, ref_out, ref_grads, atol=1e-5, rtol=1e-5)  # fp32: only the sums' order differs


@SINGLE_GRAPH
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_kind_under_cpu_autocast_equals_eager(kind):
    sae, (x, y, probe) = _sae(KINDS[kind]), _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _step(sae, sae, x, y, probe)
        out, grads = _step(torch.compile(sae), sae, x, y, probe)
    # Inductor may keep in bf16 what eager autocast computes in fp32 (the skip GEMM, the loss): bf16's tolerance
    _assert_same(out, grads, ref_out, ref_grads, atol=3e-2, rtol=3e-2)


@SINGLE_GRAPH
def test_the_matryoshka_decode_is_one_node_of_the_traced_graphs():
    """The prefix decode and its backward reach the graphs as fastsae ops: no graph break, no decomposition."""
    from torch._dynamo.backends.common import aot_autograd

    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    sae, (x, y, probe) = _sae(KINDS["matryoshka_batchtopk"]), _inputs()
    _step(torch.compile(sae, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), sae, x, y, probe)
    for op in ("encode_batchtopk", "matryoshka_decode", "encode_grads", "matryoshka_grads"):
        assert f"fastsae.{op}.default" in targets, (op, sorted(set(targets)))
