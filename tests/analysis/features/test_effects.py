"""Logit effects, ablation and context attribution against manual computations on tiny random models."""

import pytest
import torch
import torch.nn.functional as F

from fastsae.analysis.features.cache_effects import load_effects, measure_effects
from fastsae.analysis.features.context_attribution import context_attribution, latent_value
from fastsae.analysis.features.feature_pass import FeatureConfig, StoreSource, collect_features
from fastsae.analysis.features.logit_effects import ablation_effects, direct_logit_effects, final_norm, norm_gain
from fastsae.harvest import harvest
from fastsae.model import capture, hook_site

from conftest import make_sae

T = pytest.importorskip("transformers")
SITE = "resid_post.0"


@pytest.fixture(scope="module")
def tiny():
    from fastsae.model import random_causal_lm

    return random_causal_lm()[0]


def tiny_llama():
    torch.manual_seed(1)
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    return model


def ids(b=3, t=11, seed=0):
    x = torch.randint(4, 50, (b, t), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1
    return x


def firing_latent(sae, model, tokens):
    x = capture(model, [SITE], input_ids=tokens)[SITE]
    counts = sae.encode(x).fire_counts()
    return int(counts.argmax()), x


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_ablation_equals_a_manual_splice_with_that_latent_zeroed(tiny, activation):
    sae = make_sae(d_in=32, d_sae=37, activation=activation, k=4 if activation == "topk" else None)
    tokens = ids()
    tokens[2, 8:] = 0  # right padding
    j, x = firing_latent(sae, tiny, tokens)
    with torch.no_grad():
        dense = sae.encode(x).to_dense()
        ablated = dense.clone()
        ablated[..., j] = 0
        manual = sae.decode(ablated) + (x - sae.decode(dense))
        keep = (tokens > 2)[..., None]  # BOS and pad keep their clean activation
        manual = torch.where(keep, manual, x)
        clean = F.log_softmax(tiny(input_ids=tokens).logits, -1)
        with hook_site(tiny, SITE, lambda _: manual):
            patched = F.log_softmax(tiny(input_ids=tokens).logits, -1)
    expected = (patched - clean)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    got = ablation_effects(tiny, SITE, sae, j, tokens)
    vocab, length = 66, tokens.shape[1]  # one context per forward gives the same numbers
    torch.testing.assert_close(ablation_effects(tiny, SITE, sae, j, tokens, max_logits=2 * length * vocab), got,
                               equal_nan=True)
    assert torch.isnan(got[:, 0]).all()
    window = torch.tensor([[0, 1, 2], [4, 5, 6], [8, 9, 10]])  # only some positions: logits_to_keep
    torch.testing.assert_close(ablation_effects(tiny, SITE, sae, j, tokens, positions=window),
                               got.gather(1, window), equal_nan=True)
    torch.testing.assert_close(got[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert got[:, 1:].abs().max() > 1e-4  # the latent matters somewhere
    first = int((dense[0, :, j] > 0).nonzero()[0]) if (dense[0, :, j] > 0).any() else 11
    assert (got[0, 1:first + 1] == 0).all()  # nothing changes before the latent first fires


@pytest.mark.parametrize("which", ["gpt_neox layernorm", "llama rmsnorm"])
def test_direct_logit_effect_is_the_unembedded_normed_direction(tiny, which):
    model = tiny if which.startswith("gpt") else tiny_llama()
    norm = final_norm(model)
    gain, centres = norm_gain(norm, 32)
    torch.testing.assert_close(gain, norm.weight.detach(), rtol=1e-4, atol=1e-5)
    assert centres == which.startswith("gpt")
    directions = torch.randn(9, 32)
    effects = direct_logit_effects(model, directions, k=4, block=4)
    d = directions - directions.mean(1, keepdim=True) if centres else directions
    logits = (d * norm.weight.detach()) @ model.get_output_embeddings().weight.detach().T
    top, bottom = logits.topk(4, dim=1), logits.topk(4, dim=1, largest=False)
    assert torch.equal(effects["top_ids"].long(), top.indices)
    assert torch.equal(effects["bottom_ids"].long(), bottom.indices)
    torch.testing.assert_close(effects["top_values"], top.values, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="residual-stream"):
        direct_logit_effects(model, torch.randn(3, 48))


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_attribution_equals_a_manual_loop(tiny, mode):
    sae = make_sae(d_in=32, d_sae=37)
    tokens = ids(b=2, t=12)
    j, x = firing_latent(sae, tiny, tokens)
    peaks = [int(latent_value(sae, x[b], j).argmax()) for b in range(2)]
    peaks = [max(p, 3) for p in peaks]
    firsts = [0, 2]
    clean, changes = context_attribution(tiny, SITE, sae, j, list(tokens), peaks, firsts, mode=mode,
                                         neutral_token_id=5, skip_token_ids=[1], batch_size=3)
    for b in range(2):
        full = capture(tiny, [SITE], input_ids=tokens[b:b + 1])[SITE][0]
        assert clean[b] == pytest.approx(float(latent_value(sae, full[peaks[b]:peaks[b] + 1], j)[0]), abs=1e-6)
        for q in range(tokens.shape[1]):
            tried = firsts[b] <= q < peaks[b] and q != 0  # position 0 holds BOS, which is skipped
            if not tried:
                assert torch.isnan(changes[b][q])
                continue
            variant = torch.cat([tokens[b, :q], tokens[b, q + 1:]]) if mode == "remove" else \
                tokens[b].clone().index_fill_(0, torch.tensor([q]), 5)
            read = peaks[b] - 1 if mode == "remove" else peaks[b]
            x_v = capture(tiny, [SITE], input_ids=variant[None])[SITE][0, read:read + 1]
            expected = float(latent_value(sae, x_v, j)[0]) - float(clean[b])
            assert float(changes[b][q]) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="mode"):
        context_attribution(tiny, SITE, sae, j, list(tokens), peaks, firsts, mode="shuffle")
    with pytest.raises(ValueError, match="peaks"):
        context_attribution(tiny, SITE, sae, j, list(tokens), [40, 2], firsts)


def test_measure_effects_fills_the_cache_and_resumes(tiny, tmp_path):
    windows = ids(b=16, t=12, seed=3)
    store = harvest(tiny, [SITE], windows, tmp_path / "store", batch_size=4, dtype=torch.float32, shard_rows=30,
                    progress=False)
    sae = make_sae(d_in=32, d_sae=37)
    cfg = FeatureConfig(top=3, samples=2, before=3, after=2, random_contexts=4)
    cache = collect_features(sae, StoreSource(store, SITE, windows), tmp_path / "cache", cfg, progress=False)
    latents = [j for j in range(37) if cache.stats(j)["count"] > 0][:3]
    measure_effects(cache, tiny, SITE, sae, windows, latents, attribution_contexts=2, progress=False,
                    checkpoint_seconds=0)
    effects = load_effects(tmp_path / "cache")
    assert effects["measured.latent"].tolist() == latents
    assert effects["ablation"].shape == (3, 3, 6) and effects["logits.top_ids"].shape == (37, 10)
    assert torch.isnan(effects["attribution"][:, 2]).all()  # only the first two contexts
    j, ex = latents[0], cache.top(latents[0])[0]
    prefix = windows[ex.window, :ex.start + 6]
    direct = ablation_effects(tiny, SITE, sae, j, prefix[None])[0, ex.start:]
    torch.testing.assert_close(effects["ablation"][0, 0], direct, equal_nan=True)
    peak = ex.meta["position"] - ex.start
    tried = effects["attribution"][0, 0]
    assert torch.isnan(tried[peak:]).all()
    if ex.start + peak > 1:  # a token before the peak that is not BOS was tried
        assert not torch.isnan(tried[peak - 1])


def test_interrupted_measuring_resumes_without_redoing_latents(tiny, tmp_path, monkeypatch):
    from fastsae.analysis.features import cache_effects as module

    windows = ids(b=12, t=12, seed=4)
    store = harvest(tiny, [SITE], windows, tmp_path / "store", batch_size=4, dtype=torch.float32, progress=False)
    sae = make_sae(d_in=32, d_sae=37)
    cache = collect_features(sae, StoreSource(store, SITE, windows), tmp_path / "cache",
                             FeatureConfig(top=2, samples=1, before=2, after=1, random_contexts=2), progress=False)
    latents = [j for j in range(37) if cache.stats(j)["count"] > 0][:4]
    measure_effects(cache, tiny, SITE, sae, windows, latents, attribution_contexts=1, progress=False)
    full = load_effects(tmp_path / "cache")
    (tmp_path / "cache" / "effects.safetensors").unlink()
    real, calls = module.ablation_effects, []

    def dies(*args, **kw):
        calls.append(args[3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(module, "ablation_effects", dies)
    with pytest.raises(KeyboardInterrupt):
        measure_effects(cache, tiny, SITE, sae, windows, latents, attribution_contexts=1, progress=False,
                        checkpoint_seconds=0)
    monkeypatch.setattr(module, "ablation_effects", real)
    counted = []
    monkeypatch.setattr(module, "ablation_effects", lambda *a, **k: counted.append(a[3]) or real(*a, **k))
    measure_effects(cache, tiny, SITE, sae, windows, latents, attribution_contexts=1, progress=False)
    assert counted == latents[2:]  # the two measured before the interruption were kept
    resumed = load_effects(tmp_path / "cache")
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, equal_nan=True, rtol=0, atol=0)
    assert not (tmp_path / "cache" / "effects.partial.safetensors").exists()


def test_direct_effect_scale_free_summary(tiny):
    directions = torch.randn(5, 32)
    effects = direct_logit_effects(tiny, directions, k=3)
    doubled = direct_logit_effects(tiny, 2 * directions, k=3)
    torch.testing.assert_close(doubled["top_values"], 2 * effects["top_values"])
    z = (effects["top_values"] - effects["mean"][:, None]) / effects["std"][:, None]
    z2 = (doubled["top_values"] - doubled["mean"][:, None]) / doubled["std"][:, None]
    torch.testing.assert_close(z, z2)  # the browser's z-scores do not depend on the decoder's norm
    assert (z[:, 0] > 0).all() and effects["mean"].shape == (5,)


@pytest.mark.parametrize("which", ["gpt_neox layernorm", "llama rmsnorm"])
def test_logit_drop_histogram_and_mlp_hidden_effects_through_the_down_projection(tiny, which):
    from fastsae.analysis.features.logit_effects import down_projection

    model = tiny if which.startswith("gpt") else tiny_llama()
    norm = final_norm(model)
    W_U = model.get_output_embeddings().weight.detach()
    mlp = model.gpt_neox.layers[1].mlp.dense_4h_to_h if which.startswith("gpt") else model.model.layers[1].mlp.down_proj
    down = down_projection(model, "mlp_hidden.1")
    assert torch.equal(down, mlp.weight.detach())  # (d_model, d_mlp)
    hidden = torch.randn(5, down.shape[1])
    effects = direct_logit_effects(model, hidden, k=3, down=down, bins=7)
    d = hidden @ down.T  # W_down · d, then the final norm's gain (and centring) and W_U
    d = d - d.mean(1, keepdim=True) if which.startswith("gpt") else d
    logits = (d * norm.weight.detach()) @ W_U.T  # (5, V)
    torch.testing.assert_close(effects["top_values"], logits.topk(3, dim=1).values, rtol=1e-4, atol=1e-5)
    drop = -logits  # ablating the latent removes its direction: the histogram is of the logit changes
    assert effects["hist"].shape == (5, 7) and effects["hist"].sum(1).tolist() == [W_U.shape[0]] * 5
    torch.testing.assert_close(effects["hist_lo"], drop.min(1).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(effects["hist_hi"], drop.max(1).values, rtol=1e-4, atol=1e-5)
    for row in range(5):  # torch.histc over the same range counts the same (float edges: allow one move)
        expected = torch.histc(drop[row].double(), bins=7, min=float(drop[row].min()), max=float(drop[row].max()))
        assert (effects["hist"][row].double() - expected).abs().sum() <= 2
    with pytest.raises(ValueError, match="mlp_hidden"):
        down_projection(model, "resid_post.1")
    with pytest.raises(ValueError, match="down must be"):
        direct_logit_effects(model, torch.randn(3, 7), down=down)
