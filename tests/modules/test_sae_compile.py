"""A drop-in SAE under torch.compile (issue #27): every activation's forward and every gradient equal eager's.

The backends' ops reach the compiled graph as the custom ops of fastsae/ops/custom_ops.py, one node each,
whose fakes give TopK's width k and the others' data-dependent width as an unbacked size. Shapes are odd
(d_in 13, d_sae 37, N 19) and small: each case compiles once, and compiling dominates the time.

Dynamo traces an op with a data-dependent output shape only with capture_dynamic_output_shape_ops; without
it (torch's default) it breaks the graph there and runs the op eagerly, which is correct too: the tests of
the one-graph form set it (SINGLE_GRAPH), the training test keeps the default.
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from fastsae import SAE, SAEConfig
from fastsae.ops import custom_ops  # noqa: F401 (registers torch.ops.fastsae)
from fastsae.train import train

ACTIVATIONS = ["topk", "batchtopk", "relu", "jumprelu"]
D_IN, D_SAE, N = 13, 37, 19
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")
SINGLE_GRAPH = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sae(activation: str, seed: int = 0) -> SAE:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, **({"k": 4} if "topk" in activation else {}))
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases away from 0, so that their gradients and the firing pattern are not trivial
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
    return sae


def _inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=gen), torch.randn(N, D_IN, generator=gen)  # x, a probe of x_hat


def _step(model, sae: SAE, x: torch.Tensor, probe: torch.Tensor):
    """Forward and backward of the loss plus a probe of x_hat; the output and every gradient (x's too)."""
    sae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.loss + (out.x_hat.float() * probe).sum()).backward()
    grads = {name: getattr(sae, name).grad.clone() for name in PARAMS}
    return out, {**grads, "x": x.grad.clone()}


def _assert_same(out, grads, ref_out, ref_grads, atol: float, rtol: float) -> None:
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.latents.to_dense(), ref_out.latents.to_dense(), atol=atol, rtol=rtol)
    if ref_out.threshold is not None:
        torch.testing.assert_close(out.threshold, ref_out.threshold, atol=atol, rtol=rtol)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{name}'s gradient is zero: the test could not fail"
        torch.testing.assert_close(grads[name], ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


@SINGLE_GRAPH
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_compiled_forward_and_gradients_equal_eager(activation):
    sae, (x, probe) = _sae(activation), _inputs()
    ref_out, ref_grads = _step(sae, sae, x, probe)
    out, grads = _step(torch.compile(sae), sae, x, probe)
    _assert_same(out, grads, ref_out, ref_grads, atol=1e-5, rtol=1e-5)  # fp32: only the sums' order differs


@SINGLE_GRAPH
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_op_is_one_node_of_the_traced_graphs(activation):
    """The forward graph AOTAutograd traces holds the encoder and the decode as fastsae ops, and the backward
    graph their backwards: no graph break into them, no decomposition of them."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    sae, (x, probe) = _sae(activation), _inputs()
    _step(torch.compile(sae, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), sae, x, probe)
    encoder = {"topk": "encode_topk", "batchtopk": "encode_batchtopk", "jumprelu": "encode_jumprelu"}.get(
        activation, "encode_threshold")
    for op in (encoder, "decode", "encode_grads", "decode_grads"):
        assert f"fastsae.{op}.default" in targets, (op, sorted(set(targets)))


@SINGLE_GRAPH
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_compiled_under_cpu_autocast_equals_eager(activation):
    sae, (x, probe) = _sae(activation), _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _step(sae, sae, x, probe)
        out, grads = _step(torch.compile(sae), sae, x, probe)
    # Inductor may run the compiled graph's elementwise parts (b_dec, the loss) in bf16 where eager autocast
    # keeps fp32: a bf16 tolerance
    _assert_same(out, grads, ref_out, ref_grads, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_a_compiled_sae_trains_as_eager_does(activation):
    """train on an SAE compiled in place (nn.Module.compile): the same weights after three steps."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(N, D_IN, generator=gen) for _ in range(3)]
    ref, sae = _sae(activation), _sae(activation)
    sae.compile()
    train(ref, batches)
    train(sae, batches)
    for name in PARAMS:
        torch.testing.assert_close(getattr(sae, name), getattr(ref, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op,args", [
    ("encode_topk", lambda x, W, b: (x, W, b, 4)),
    ("encode_threshold", lambda x, W, b: (x, W, b, None)),
    ("encode_batchtopk", lambda x, W, b: (x, W, b, 4)),
    ("decode", lambda x, W, b: (x[:, :4].detach().requires_grad_(), (x[:, 4:8] * 9).long().abs().detach(), W,
                                b[:D_IN].detach().requires_grad_())),
])
def test_the_custom_ops_pass_opcheck(op, args):
    """torch.library.opcheck: schema, fake against real, autograd registration, AOT tracing."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(D_SAE, D_IN, generator=gen, requires_grad=True)
    b = torch.randn(D_SAE, generator=gen, requires_grad=True)
    x = torch.randn(N, D_IN, generator=gen, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.fastsae, op), args(x, W, b))
