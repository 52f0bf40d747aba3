"""The analysis tools with a transcoder (mlp_in.1 -> mlp_out.1) on a tiny random GPT-NeoX: latents are read at the
in-site, and every edit (ablation, steering, patching) lands at the out-site; what cannot apply is refused."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.model import capture, hook_sites

from helpers import tiny_causal_lm

T = pytest.importorskip("transformers")
IN, OUT = "mlp_in.1", "mlp_out.1"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n" * 20


def make_tc(kind="skip_transcoder", d_in=32, d_sae=24, k=4, seed=0) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, kind=kind, apply_b_dec_to_input=False),
              seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.5 * torch.randn(sae.W_enc.shape, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        if kind == "skip_transcoder":
            sae.W_skip.copy_(0.2 * torch.randn(d_in, d_in, generator=gen))
    sae.metadata.update(site=IN, out_site=OUT)
    return sae.eval()


@pytest.fixture(scope="module")
def lm():
    from fastsae.model import random_causal_lm

    return random_causal_lm()[0]


def ids(b=2, t=9, seed=0):
    x = torch.randint(4, 50, (b, t), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1
    return x


def manual_logits(model, tokens, tc, delta):
    """logits with the out-site y replaced by y + delta(codes of the in-site x) — the edit written by hand."""
    seen = {}

    def read(x):
        seen["x"] = x

    def write(y):
        return y + delta(tc.encode(seen["x"]).to_dense())

    with torch.no_grad(), hook_sites(model, {IN: read, OUT: write}):
        return model(input_ids=tokens).logits


def firing(tc, model, tokens):
    x = capture(model, [IN], input_ids=tokens)[IN]
    return int(tc.encode(x).fire_counts().argmax()), x


def test_intervene_zeroes_steers_and_patches_at_the_out_site(lm):
    from fastsae.analysis.interventions import intervene

    tc, tokens = make_tc(), ids()
    j, _ = firing(tc, lm, tokens)
    W = tc.W_dec.detach()
    with torch.no_grad():
        clean = lm(input_ids=tokens).logits
        with intervene(lm, IN, tc, zero=[j], record=True) as iv:
            zeroed = lm(input_ids=tokens).logits
        with intervene(lm, IN, tc, steer={j: 3.0}):
            steered = lm(input_ids=tokens).logits
    torch.testing.assert_close(zeroed, manual_logits(lm, tokens, tc, lambda z: -z[..., j, None] * W[j]))
    torch.testing.assert_close(steered, manual_logits(lm, tokens, tc, lambda z: 3.0 * W[j]))
    assert (zeroed - clean).abs().max() > 1e-4  # the edit reached the logits
    torch.testing.assert_close(iv.inputs[0], capture(lm, [IN], input_ids=tokens)[IN])  # codes from the in-site
    # patch latent j from another forward: its in-site activations are the source
    other = ids(seed=5)
    x_other = capture(lm, [IN], input_ids=other)[IN]
    z_other = tc.encode(x_other).to_dense()[..., j, None]
    with torch.no_grad(), intervene(lm, IN, tc, patch=[j], source=x_other):
        patched = lm(input_ids=tokens).logits
    torch.testing.assert_close(patched, manual_logits(lm, tokens, tc, lambda z: (z_other - z[..., j, None]) * W[j]))


def test_transcoder_edits_refuse_what_cannot_apply(lm):
    from fastsae.analysis.interventions import Intervention, intervene
    from fastsae.analysis.interventions.ioi_patching import compare

    tc = make_tc()
    with pytest.raises(ValueError, match="patch_error: a transcoder"):
        Intervention(tc, patch=[0], source=torch.zeros(1, 1, 32), patch_error=True)
    bare = make_tc()
    bare.metadata.pop("out_site")
    with pytest.raises(ValueError, match="out_site: this skip_transcoder does not record"):
        Intervention(bare, zero=[0])
    assert Intervention(bare, zero=[0], out_site=OUT).out_site == OUT
    with pytest.raises(ValueError, match="out_site: only a transcoder"):
        Intervention(make_sae_like(), zero=[0], out_site=OUT)
    with pytest.raises(ValueError, match="hooked twice"), intervene(lm, {IN: Intervention(tc), OUT: Intervention(
            make_sae_like())}):
        pass
    with pytest.raises(ValueError, match="sae 'sae': the IOI patching curves compare dictionaries of one site"):
        compare(lm, IN, tc, prompts=None)


def make_sae_like():
    return SAE(SAEConfig(d_in=32, d_sae=24, activation="topk", k=4), seed=3).eval()


def test_ablation_effects_act_at_the_out_site(lm):
    from fastsae.analysis.features.logit_effects import ablation_effects

    tc, tokens = make_tc(), ids()
    j, _ = firing(tc, lm, tokens)
    W = tc.W_dec.detach()
    effect = ablation_effects(lm, IN, tc, j, tokens, exclude_token_ids=[1])
    keep = (tokens != 1)[..., None].float()
    clean = torch.log_softmax(lm(input_ids=tokens).logits.detach(), -1)
    ablated = torch.log_softmax(manual_logits(lm, tokens, tc, lambda z: -keep * z[..., j, None] * W[j]), -1)
    target = tokens[:, 1:, None]
    manual = (ablated[:, :-1].gather(-1, target) - clean[:, :-1].gather(-1, target))[..., 0]
    torch.testing.assert_close(effect[:, 1:], manual, atol=1e-5, rtol=1e-4)
    assert effect[:, 1:].abs().max() > 1e-5


def test_steer_runs_at_the_out_site(lm):
    from fastsae.analysis.interventions import steer
    from fastsae.model.loading import char_tokenizer

    tc = make_tc()
    result = steer(lm, char_tokenizer(), IN, tc, 3, "a truth", alphas=(0.0, 8.0), max_new_tokens=3)
    assert result["out_site"] == OUT
    assert result["rows"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and result["rows"][1]["kl"] > 1e-4


def test_features_and_browser_of_a_transcoder_read_its_in_site(tmp_path):
    from fastsae.analysis.features import run_browse, run_features

    lm, tokenizer = tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    tc = make_tc()
    tc.metadata["model"] = str(tmp_path / "lm")
    tc.save(tmp_path / "tc")
    cache = run_features(tmp_path / "tc", tmp_path / "features", corpus=str(tmp_path / "book.txt"), tokens=256,
                         context_size=32, effects=2, progress=False)
    assert cache.meta["meta"]["site"] == IN and cache.meta["meta"]["out_site"] == OUT
    # every latent's count and maximum are those of the in-site's codes over the same windows (BOS excluded)
    from fastsae.harvest.corpus import read_documents, token_windows

    windows = token_windows(tokenizer, read_documents(str(tmp_path / "book.txt")), 32, 256, seed=0)
    x = capture(lm, [IN], input_ids=windows.long())[IN]
    z = tc.encode(x).to_dense().detach() * (windows != 1)[..., None]  # (S, T, d_sae)
    torch.testing.assert_close(cache.tensors["count"].long(), (z > 0).sum((0, 1)).long())
    j = int(cache.tensors["count"].argmax())
    assert cache.stats(j)["max_activation"] == pytest.approx(float(z[..., j].max()), rel=1e-5)
    assert cache.top(j)[0].max_activation == pytest.approx(float(z[..., j].max()), rel=1e-5)
    effects = (tmp_path / "features" / "effects.json").read_text()
    assert f'"out_site": "{OUT}"' in effects
    index, table = run_browse(tmp_path / "features", progress=False)
    assert index.is_file() and "| latent |" in table


def test_connect_refuses_a_transcoder(tmp_path):
    from fastsae.analysis.compare.connect_run import run_connect

    make_tc().save(tmp_path / "tc")
    make_sae_like().save(tmp_path / "sae")
    with pytest.raises(ValueError, match="sae_out: connect learns the map"):
        run_connect(str(tmp_path / "sae"), str(tmp_path / "tc"), str(tmp_path / "store"), tmp_path / "out",
                    progress=False)


def test_erasure_and_circuit_take_transcoders(lm):
    from fastsae.analysis.interventions import circuit
    from fastsae.analysis.interventions.erasure import erasure

    tc = make_tc()
    windows = ids(b=6, t=12, seed=2)
    target = windows.roll(-1, 1) % 3 == 0
    result = erasure(lm, IN, tc, windows, target, counts=(1, 2), against=("pca",), excluded=[1])
    assert result["out_site"] == OUT and {r["method"] for r in result["rows"]} == {"sae", "pca"}
    lower = make_tc(seed=4)
    lower.metadata.update(site="mlp_in.0", out_site="mlp_out.0")
    j, _ = firing(tc, lm, windows)
    graph = circuit(lm, {"mlp_in.0": lower, IN: tc}, (IN, j), windows, depth=1, keep=2, candidates=4, excluded=[1])
    assert graph["root"] == f"1_{j}" and len(graph["edges"]) == 2
    assert all(e["source"].startswith("0_") for e in graph["edges"])
