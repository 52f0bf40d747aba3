"""Hook sites on tiny randomly initialised models of every supported architecture."""

import pytest
import torch

from fastsae.model import available_sites, capture, resolve

T = pytest.importorskip("transformers")

ARCHS = {
    "pythia": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                             num_attention_heads=4, intermediate_size=48)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_inner=48,
                                                   bos_token_id=0, eos_token_id=0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=48)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                             num_attention_heads=4, num_key_value_heads=2,
                                                             intermediate_size=48, head_dim=8)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=48)),
}


def _model(arch):
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def _inputs():
    return {"input_ids": torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_sites_match_output_hidden_states(arch):
    model = _model(arch)
    with torch.no_grad():
        hidden = model(**_inputs(), output_hidden_states=True).hidden_states  # (embeddings, block 0, ...)
    acts = capture(model, [f"{k}.{layer}" for layer in range(3) for k in ("resid_pre", "resid_post")],
                   stop_early=False, **_inputs())
    for layer in range(3):
        torch.testing.assert_close(acts[f"resid_pre.{layer}"], hidden[layer])
        if layer < 2:  # the last hidden state may have the final norm applied
            torch.testing.assert_close(acts[f"resid_post.{layer}"], hidden[layer + 1])


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "bert"])
def test_branches_add_up_to_the_residual_stream(arch):
    model = _model(arch)
    sites = [f"{k}.1" for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden")]
    acts = capture(model, sites, **_inputs())
    total = acts["resid_pre.1"] + acts["attn_out.1"] + acts["mlp_out.1"]
    torch.testing.assert_close(acts["resid_post.1"], total, atol=1e-5, rtol=1e-5)
    if getattr(model.config, "use_parallel_residual", False):  # Pythia: the MLP reads resid_pre
        torch.testing.assert_close(acts["resid_mid.1"], acts["resid_pre.1"])
    else:
        torch.testing.assert_close(acts["resid_mid.1"], acts["resid_pre.1"] + acts["attn_out.1"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts["resid_post.1"], acts["resid_mid.1"] + acts["mlp_out.1"] if not getattr(
        model.config, "use_parallel_residual", False) else total, atol=1e-5, rtol=1e-5)
    assert acts["mlp_hidden.1"].shape == (2, 7, 48)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_gives_the_same_activations_and_skips_the_head(arch):
    model = _model(arch)
    head_calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        early = capture(model, ["mlp_hidden.0", "resid_post.1"], **_inputs())
        assert head_calls == []  # stopped after block 1: no later blocks, no logits
        full = capture(model, ["mlp_hidden.0", "resid_post.1"], stop_early=False, **_inputs())
        assert head_calls == [1]
    finally:
        handle.remove()
    for name in early:
        assert torch.equal(early[name], full[name])


def test_unknown_sites_are_refused_with_the_list_and_module_paths_work():
    model = _model("pythia")
    with pytest.raises(ValueError, match=r"resid_post\.2"):
        resolve(model, "resid_post.3")
    with pytest.raises(ValueError, match="unknown site"):
        resolve(model, "mlp_neurons.1")
    assert len(available_sites(model)) == 3 * 7
    acts = capture(model, ["gpt_neox.layers.0.mlp"], **_inputs())
    torch.testing.assert_close(acts["gpt_neox.layers.0.mlp"], capture(model, ["mlp_out.0"], **_inputs())["mlp_out.0"])
    with pytest.raises(ValueError, match="at least one site"):
        capture(model, [], **_inputs())


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_in_is_what_the_mlp_computes_from(arch):
    """mlp_in is the MLP's input: running the MLP module on it gives mlp_out (before Gemma's post-norm)."""
    model = _model(arch)
    acts = capture(model, ["mlp_in.1", "resid_mid.1", "mlp_hidden.1"], **_inputs())
    assert acts["mlp_in.1"].shape == (2, 7, 32)
    if arch == "bert":  # post-norm: the intermediate layer reads the attention block's output directly
        torch.testing.assert_close(acts["mlp_in.1"], acts["resid_mid.1"])
        return
    mlp = {"pythia": "gpt_neox.layers.1.mlp", "gpt2": "transformer.h.1.mlp"}.get(arch, "model.layers.1.mlp")
    with torch.no_grad():
        out = model.get_submodule(mlp)(acts["mlp_in.1"])
    direct = capture(model, [mlp], **_inputs())[mlp]
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)


def test_hook_site_replaces_and_restores():
    from fastsae.model import hook_site

    model = _model("llama")
    with torch.no_grad():
        clean = model(**_inputs()).logits
        with hook_site(model, "resid_mid.0", lambda x: None):  # observing only: nothing changes
            same = model(**_inputs()).logits
        with hook_site(model, "mlp_in.1", lambda x: torch.zeros_like(x)):
            edited = model(**_inputs()).logits
        after = model(**_inputs()).logits
    assert torch.equal(clean, same) and torch.equal(clean, after)
    assert not torch.allclose(clean, edited)
