"""splice_transcoder: the out-site replaced by a transcoder's prediction from the in-site, checked against
hand-written hooks, the ablations it can express, the error term and its refusals."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.model import capture, resolve, splice, splice_transcoder

T = pytest.importorskip("transformers")
from tests.tiny_models import _model  # noqa: E402


def transcoder(kind="skip_transcoder", d=32, seed=0):
    tc = SAE(SAEConfig(d_in=d, d_sae=48, activation="topk", k=4, kind=kind, apply_b_dec_to_input=False), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero bias and skip map, so that dropping either would show
        tc.b_dec.copy_(torch.randn(d, generator=g))
        if kind == "skip_transcoder":
            tc.W_skip.copy_(0.3 * torch.randn(d, d, generator=g))
    return tc


def ids(b=2, t=9):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(3))


def by_hand(model, in_site, out_site, tc, input_ids, keep=None):
    """The logits with raw torch hooks: record x at in_site, replace y at out_site by the dense prediction."""
    seen = {}
    where_in, where_out = resolve(model, in_site), resolve(model, out_site)
    assert where_in.capture == "input" and where_out.capture == "output"

    def pre(_m, args, kwargs):
        seen["x"] = (args[0] if args else next(iter(kwargs.values()))).detach()

    def post(_m, _args, out):
        y = out[0] if isinstance(out, tuple) else out
        x = seen["x"]
        z = tc.encode(x)
        dense = torch.zeros(*x.shape[:-1], tc.cfg.d_sae).scatter(-1, z.indices, z.values)
        y_hat = dense @ tc.W_dec + tc.b_dec
        if tc.cfg.kind == "skip_transcoder":
            y_hat = y_hat + x @ tc.W_skip.T
        if keep is not None:
            y_hat = torch.where(keep[..., None], y_hat, y)
        return (y_hat, *out[1:]) if isinstance(out, tuple) else y_hat

    h1 = model.get_submodule(where_in.module).register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.get_submodule(where_out.module).register_forward_hook(post)
    try:
        return model(input_ids=input_ids).logits
    finally:
        h1.remove()
        h2.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
@torch.no_grad()
def test_the_spliced_forward_equals_hand_written_hooks(arch, kind):
    model, tc, x = _model(arch), transcoder(kind), ids()
    keep = torch.ones(x.shape, dtype=torch.bool)
    keep[:, 0] = False
    expected = by_hand(model, "mlp_in.1", "mlp_out.1", tc, x, keep)
    with splice_transcoder(model, "mlp_in.1", "mlp_out.1", tc, record=True) as sp:
        sp.keep = keep
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    clean = model(input_ids=x).logits
    assert (got - clean).abs().max() > 1e-3  # the splice changed the forward: the test can fail
    sites = capture(model, ["mlp_in.1", "mlp_out.1"], input_ids=x)
    torch.testing.assert_close(sp.activations[0], sites["mlp_out.1"])  # record: the clean y
    torch.testing.assert_close(sp.reconstructions[0], tc(sites["mlp_in.1"], target=sites["mlp_out.1"]).x_hat,
                               rtol=1e-5, atol=1e-5)
    assert sp.latents[0].indices.shape == (*x.shape, 4)


@torch.no_grad()
def test_ablations_and_the_error_term():
    model, x = _model("llama"), ids()
    tc = transcoder("transcoder")
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.zero_()
    with splice_transcoder(model, "mlp_in.1", "mlp_out.1", tc):
        zero_tc = model(input_ids=x).logits
    with splice(model, "mlp_out.1", replace="zero"):
        zero = model(input_ids=x).logits
    torch.testing.assert_close(zero_tc, zero)
    mean = torch.randn(32)
    with torch.no_grad():
        tc.b_dec.copy_(mean)
    with splice_transcoder(model, "mlp_in.1", "mlp_out.1", tc):
        mean_tc = model(input_ids=x).logits
    with splice(model, "mlp_out.1", replace=mean):
        mean_abl = model(input_ids=x).logits
    torch.testing.assert_close(mean_tc, mean_abl)
    with splice_transcoder(model, "mlp_in.1", "mlp_out.1", transcoder(), error_term=True):
        with_error = model(input_ids=x).logits
    torch.testing.assert_close(with_error, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_refusals():
    model, x = _model("llama"), ids()
    sae = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4), seed=0)
    with pytest.raises(ValueError, match="needs a transcoder"), splice_transcoder(model, "mlp_in.1", "mlp_out.1", sae):
        pass
    # out-site before the in-site (mlp_in.1 is reached before mlp_out.1): nothing to predict from
    with pytest.raises(RuntimeError, match="before the in-site"), \
            splice_transcoder(model, "mlp_out.1", "mlp_in.1", transcoder()), torch.no_grad():
        model(input_ids=x)
