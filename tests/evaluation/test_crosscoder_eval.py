"""Evaluating crosscoders: every site replaced at once by its reconstruction from the clean forward, against a
computation by raw torch hooks on a tiny model; an exact crosscoder recovers everything; `fastsae eval` on one
trained by `fastsae train --kind crosscoder`."""

import json

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.evaluation import evaluate
from fastsae.model import splice_crosscoder

from helpers import tiny_causal_lm, tiny_pythia

T = pytest.importorskip("transformers")
SITES = ["resid_post.0", "resid_post.1"]


def windows(n=6, t=10):
    ids = torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    return ids


def crosscoder(activation="topk", k=6, d_sae=48):
    cc = SAE(SAEConfig(d_in=64, d_sae=d_sae, activation=activation, k=k, kind="crosscoder", n_sites=2), seed=0)
    cc.metadata["sites"] = SITES
    return cc


@torch.no_grad()
def manual_eval(model, ids, cc):
    """Per-site FVU, l0 and CE (clean, both layers' outputs replaced, both zeroed) by raw hooks on the layers."""
    keep = ids != 1
    layers = [model.gpt_neox.layers[i] for i in range(2)]

    def run(replace):
        seen, handles = {}, []
        for i, layer in enumerate(layers):
            def post(_m, _args, out, i=i):
                seen[i] = out[0] if isinstance(out, tuple) else out
                if replace is None:
                    return None
                new = torch.where(keep[..., None], replace[i], seen[i])
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(layer.register_forward_hook(post))
        try:
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        finally:
            for h in handles:
                h.remove()
        return float(-logp.gather(-1, ids[:, 1:, None])[..., 0][keep[:, :-1]].mean()), seen

    clean, seen = run(None)
    x = torch.cat([seen[0], seen[1]], dim=-1)  # (B, T, 64)
    out = cc(x)
    with_cc, _ = run(out.x_hat.split(32, dim=-1))
    zero, _ = run([torch.zeros_like(seen[0])] * 2)
    xk, xk_hat = x[keep].double(), out.x_hat[keep].double()
    fvus = [float((a - b).square().sum() / (a - a.mean(0)).square().sum())
            for a, b in zip(xk.split(32, dim=-1), xk_hat.split(32, dim=-1), strict=True)]
    l0 = float((out.latents.values[keep] != 0).sum(-1).double().mean())
    return {"site_fvu": fvus, "l0": l0, "ce_loss_with_sae": with_cc, "ce_loss_with_ablation": zero,
            "ce_loss_recovered": (zero - with_cc) / (zero - clean)}, clean


def test_a_crosscoder_is_measured_with_all_its_sites_replaced_against_raw_hooks():
    model, ids, cc = tiny_pythia(), windows(), crosscoder()
    with torch.no_grad():
        cc.b_dec.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    r = evaluate(model, "resid_post.0", ids, {"cc": cc}, batch_size=4, progress=False)
    expected, clean = manual_eval(model, ids, cc)
    assert r["model"]["ce_loss_without_sae"] == pytest.approx(clean, rel=1e-5)
    for key, value in expected.items():
        assert r["cc"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert r["cc"]["sites"] == SITES and len(set(r["cc"]["site_fvu"])) == 2
    assert r["cc"]["ce_loss_with_sae_and_error"] == pytest.approx(clean, abs=1e-5)  # the splice's self-check
    assert abs(r["cc"]["ce_loss_recovered"] - 1.0) > 0.01  # a random crosscoder: not the exact one's 1


def test_an_exact_crosscoder_recovers_everything_beside_an_sae():
    """W_enc = W_dec = [I; -I] over the sites side by side: x̂ = relu(x) - relu(-x) = x at every site."""
    model, ids = tiny_pythia(), windows()
    cc = crosscoder("relu", None, d_sae=128)
    eye = torch.eye(64)
    with torch.no_grad():
        cc.W_enc.copy_(torch.cat([eye, -eye]))
        cc.W_dec.copy_(torch.cat([eye, -eye]))
    sae = SAE(SAEConfig(d_in=32, d_sae=64, activation="topk", k=4), seed=0)
    r = evaluate(model, "resid_post.0", ids, {"sae": sae, "cc": cc}, batch_size=4, progress=False)
    assert r["cc"]["site_fvu"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert r["cc"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert abs(r["sae"]["ce_loss_recovered"] - 1.0) > 0.01 and "site_fvu" not in r["sae"]  # at its site, as ever
    # the crosscoder's own ablation: both sites zeroed, which is not the SAE's one-site ablation
    assert r["cc"]["ce_loss_with_ablation"] != pytest.approx(r["model"]["ce_loss_with_ablation"])


def test_splice_crosscoder_refuses_what_it_cannot_splice():
    model, ids = tiny_pythia(), windows()
    with pytest.raises(ValueError, match="one site per n_sites"):
        with splice_crosscoder(model, SITES[:1], crosscoder(), input_ids=ids):
            pass
    cc = crosscoder()
    cc.metadata.pop("sites")
    with pytest.raises(ValueError, match="metadata records sites None"):
        evaluate(model, "resid_post.0", ids, {"cc": cc}, batch_size=4, progress=False)


def test_cli_evaluates_a_crosscoder_it_trained(tmp_path, capsys):
    from fastsae.cli import main

    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text("It is a truth universally acknowledged, that a single man.\n" * 30)
    assert main(["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
                 *SITES, "--tokens", "512", "--context-size", "32", "--dtype", "float32", "--out",
                 str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train", "--data", str(tmp_path / "store"), "--kind", "crosscoder", "--sites", *SITES,
                 "--activation", "topk", "--k", "4", "--d-sae", "64", "--steps", "3", "--batch-size", "32",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["eval", "--sae", str(tmp_path / "run" / "sae"), "--tokens", "256", "--out", str(tmp_path / "eval"),
                 "--no-progress"]) == 0
    assert "baselines (pca, ica, neurons, random) are not defined for crosscoders" in capsys.readouterr().out
    (result,) = [v for k, v in json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"].items()
                 if k != "model"]
    assert result["sites"] == SITES and len(result["site_fvu"]) == 2 and 0 < result["l0"] <= 4
    assert "ce_loss_recovered" in result
