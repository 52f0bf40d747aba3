"""Running a model from a site upward (fastsae.model.upper) equals running the whole model with the site
replaced, on tiny random models of every supported family (Gemma 3's sliding windows, GPT-NeoX's parallel
residual included)."""

import pytest
import torch

from fastsae.model import Splice, lm_head_logits, resolve, run_from_site, run_to_site, splice
from fastsae.model.upper import _split

T = pytest.importorskip("transformers")

from tiny_models import ARCHS, _model  # noqa: E402

SITES = ["resid_pre.0", "resid_pre.1", "resid_mid.1", "attn_out.1", "mlp_in.1", "mlp_hidden.1", "mlp_out.1",
         "resid_post.1", "resid_post.2"]




def _ids():
    return torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _full(model, ids):
    """Reference: the whole model's final hidden states and (causal) logits."""
    out = model(input_ids=ids, output_hidden_states=True)
    logits = getattr(out, "logits", None)
    hidden = out.hidden_states[-1] if logits is not None else out.last_hidden_state
    return hidden, logits


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", ARCHS)
def test_upper_runs_equal_full_runs_with_the_site_replaced(arch, site):
    model, ids = _model(arch), _ids()
    mean = torch.randn(48 if "hidden" in site else 32, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 4] = False
    scale = lambda x: 0.5 * x  # noqa: E731
    variants = [None, {"replace": "zero"}, {"replace": mean}, {"replace": scale}]
    with torch.no_grad():
        expected = []
        for kw in variants:
            if kw is None:
                expected.append(_full(model, ids))
                continue
            with splice(model, site, **kw) as sp:
                sp.keep = keep
                expected.append(_full(model, ids))
        lower = run_to_site(model, site, input_ids=ids)
        fns = []
        for kw in variants:
            if kw is None:
                fns.append(None)
                continue
            s = Splice(None, kw["replace"], False, False)
            s.keep = keep
            fns.append(s)
        hidden = run_from_site(model, lower, fns, input_ids=ids)
    assert hidden.shape == (len(variants), 2, 9, 32)
    for i, (h, logits) in enumerate(expected):
        torch.testing.assert_close(hidden[i], h, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"variant {i}: {m}")
        if logits is not None:
            torch.testing.assert_close(lm_head_logits(model, hidden[i]), logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0][0], expected[1][0])  # the variants differ: the check can fail


@pytest.mark.parametrize("arch", ["gemma3", "pythia-parallel"])
def test_lower_blocks_run_once(arch):
    """The blocks below the site do not run again in the upper run; those above run once per call."""
    model, ids = _model(arch), _ids()
    blocks, split = _split(model, resolve(model, "resid_mid.1"))
    assert split == 1
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    inner = []
    attn = blocks[0].get_submodule("attention" if "pythia" in arch else "self_attn")
    handles.append(attn.register_forward_pre_hook(lambda *a: inner.append(1)))
    try:
        lower = run_to_site(model, "resid_mid.1", input_ids=ids)
        assert inner == [1]
        run_from_site(model, lower, [None, None, None], input_ids=ids)
        assert inner == [1]  # block 0 stubbed: its attention never ran again
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 0, 1, 2]  # the stub's hooks still fire; block 1 reruns (the site is inside it)


def test_lower_run_refuses_unknown_families():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(ValueError, match="model_type 'odd'"):
        run_to_site(Odd(), "resid_post.0", input_ids=_ids())
