"""Feature connections across an MLP, on a synthetic pair whose answer is known: F2 is a sparse linear
function of F1 except for three nonlinear features (an AND, a clipped difference, a max)."""

import dataclasses

import pytest
import torch

from fastsae.analysis.compare.connections import (
    ConnectConfig,
    ConnectionData,
    Connector,
    evaluate,
    nonlinearity,
)
from fastsae.analysis.compare.connector_training import train_connector
from fastsae.analysis.compare.linear_connections import elbow, fit_linear, formulas, l1_sweep, refit, relative_weights
from fastsae.latents import SparseLatents

N_IN = 40
NONLINEAR = (10, 11, 12)
# output j <- {input i: weight}; inputs 0..5 fire often (they feed the nonlinear features), the rest rarely
LINEAR = {0: {6: 1.0}, 1: {7: 0.8, 8: 0.6}, 2: {9: 1.2}, 3: {10: 0.5, 11: 0.5, 12: 0.5}, 4: {13: 0.9},
          5: {14: 1.0, 15: -0.5}, 6: {16: 0.7, 17: 0.4}, 7: {18: 1.1}, 8: {19: 0.6, 20: 0.9}, 9: {21: 1.0}}


def synthetic(n=8000, seed=0):
    """F1 (n, N_IN) non-negative sparse codes and F2 (n, 13) built from them, as SparseLatents."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.full((N_IN,), 0.05)
    p[:6] = 0.35
    on = torch.rand(n, N_IN, generator=gen) < p
    on[:, 15] &= on[:, 14]  # the AND-NOT input only fires with its partner, so 1.0·x14 - 0.5·x15 >= 0.2
    x = on * (0.8 + 0.4 * torch.rand(n, N_IN, generator=gen))
    y = torch.zeros(n, 13)
    for j, terms in LINEAR.items():
        for i, w in terms.items():
            y[:, j] += w * x[:, i]
    y[:, 10] = 2 * x[:, 0] * x[:, 1]  # AND
    y[:, 11] = (x[:, 2] - x[:, 3]).relu()  # clipped difference
    y[:, 12] = torch.maximum(x[:, 4], x[:, 5])  # max (an OR that does not add up)
    assert (y >= 0).all()
    return SparseLatents.from_dense(x), SparseLatents.from_dense(y), x, y


CFG = ConnectConfig(hidden=64, lr=1e-2, batch_size=256, steps=400)


@pytest.fixture(autouse=True)
def _one_thread():
    """These steps are tiny: on a shared 2-core machine a second thread costs far more than it gives (30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    f1, f2, _, _ = synthetic()
    data = ConnectionData.from_codes(f1, f2, holdout=0.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lin, mlp = fit_linear(data), train_connector(data, "mlp", CFG)
    torch.set_num_threads(threads)
    return data, lin, mlp


def test_data_is_compacted_and_normalised_per_layer():
    f1, f2, x, y = synthetic(n=2000)
    data = ConnectionData.from_codes(f1, f2, holdout=0.25)
    assert data.n_train == 1500 and data.n_in == N_IN and data.n_out == 13
    xv, xi, yd = data.batch(torch.arange(data.n_train))
    assert yd.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)  # E||F2||² = 1 on training rows
    dense_x = torch.zeros(data.n_train, data.n_in).scatter_add_(1, xi, xv)
    torch.testing.assert_close(dense_x * data.scale_in, x[:1500])
    torch.testing.assert_close(yd * data.scale_out, y[:1500])
    only = ConnectionData.from_codes(f1, f2, holdout=0.25, outputs=[3, 11])
    assert only.out_features.tolist() == [3, 11]
    torch.testing.assert_close(only.batch(torch.arange(5))[2] * only.scale_out, y[:5, [3, 11]])


def test_connector_kinds_match_their_formulas():
    xv = torch.tensor([[0.5, 1.0, 0.0]])
    xi = torch.tensor([[2, 0, 0]])
    dense = torch.zeros(1, 5).scatter_add_(1, xi, xv)
    for kind in ("linear", "linear_relu", "mlp", "mlp_relu"):
        conn = Connector(5, 3, kind, hidden=4, bias=True, seed=1)
        with torch.no_grad():
            for p in conn.parameters():
                p.normal_()
        h = dense @ conn.W1 + conn.b1
        if kind == "linear_relu":
            h = h.relu()
        if kind.startswith("mlp"):
            h = h.relu() @ conn.W2 + conn.b2
            if kind == "mlp_relu":
                h = h.relu()
        torch.testing.assert_close(conn(xv, xi), h)
    with pytest.raises(ValueError, match="kind"):
        Connector(5, 3, "quadratic")


def _true_weights(j):
    want = torch.zeros(N_IN)
    for i, w in LINEAR[j].items():
        want[i] = w
    return want


def test_linear_connector_recovers_the_weights(trained):
    data, lin, _ = trained
    W = lin.linear_weights * data.scale_out / data.scale_in  # back to raw units: y = W^T x
    for j in LINEAR:
        torch.testing.assert_close(W[:, j], _true_weights(j), atol=1e-3, rtol=0)
    adam = train_connector(data, "linear", CFG)  # Adam gets there too, less exactly
    W = adam.linear_weights * data.scale_out / data.scale_in
    for j in LINEAR:
        torch.testing.assert_close(W[:, j], _true_weights(j), atol=0.05, rtol=0)


def test_nonlinear_features_are_flagged_exactly(trained):
    data, lin, mlp = trained
    ev_lin, ev_mlp = evaluate(lin, data), evaluate(mlp, data)
    delta = nonlinearity(ev_lin, ev_mlp)
    flagged = set((delta > 0.001).nonzero().squeeze(1).tolist())
    assert flagged == set(NONLINEAR), delta
    assert ev_mlp.fvu < ev_lin.fvu and ev_mlp.hidden_l0 > 0 and ev_lin.hidden_l0 is None


def test_sparse_sweep_finds_the_true_connections():
    f1, f2, _, _ = synthetic()
    data = ConnectionData.from_codes(f1, f2, holdout=0.2)
    linear_outputs = torch.arange(10)  # restricted to the linear features
    points = l1_sweep(data, (0.0, 1e-2, 3e-2, 1e-1, 3e-1), CFG, outputs=linear_outputs)
    l1 = [p.l1_norm for p in points]
    assert l1[-1] < 0.9 * l1[0] and points[-1].connections < points[0].connections  # smaller, fewer weights
    best = points[elbow(points)]
    assert 0 < best.l1_coefficient < 3e-1
    sparse = refit(best.connector, data, outputs=linear_outputs)  # least squares on the kept inputs
    W = sparse.linear_weights * data.scale_out / data.scale_in
    found = formulas(sparse, data, outputs=linear_outputs)
    for f in found:  # exactly the true inputs (the rare AND-NOT input 15 too), with their weights and signs
        assert {i for i, _ in f.terms} == set(LINEAR[f.output]), f.text()
        assert {i: w > 0 for i, w in f.terms} == {i: w > 0 for i, w in LINEAR[f.output].items()}
        torch.testing.assert_close(W[:, f.output], _true_weights(f.output), atol=1e-3, rtol=0)
        assert f.fvu < 1e-4
    text = next(f for f in found if f.output == 5).text()
    assert text.startswith("OF 5 ≈ ") and "− 0." in text and "IF 15" in text
    rel = relative_weights(best.connector, data, linear_outputs)
    assert rel.shape == (N_IN, 10)


def test_elbow_picks_the_knee():
    class P:
        def __init__(self, x, y):
            self.l1_norm, self.eval = x, type("E", (), {"fvu": y})()

    pts = [P(10, 0.10), P(5, 0.11), P(2, 0.13), P(1, 0.5), P(0.5, 0.9)]
    assert elbow(pts) == 2
    assert elbow(pts[:2]) == 0


def test_sae_on_sae_reports_hidden_l0(trained):
    data, _, _ = trained
    dense = evaluate(train_connector(data, "mlp", CFG), data)
    sparse = evaluate(train_connector(data, "mlp", dataclasses.replace(CFG, hidden_l1=3e-2)), data)
    assert sparse.hidden_l0 < dense.hidden_l0


def test_bad_codes_are_refused():
    f1, f2, _, _ = synthetic(n=100)
    with pytest.raises(ValueError, match="same N"):
        ConnectionData.from_codes(f1, SparseLatents(f2.values[:50], f2.indices[:50], f2.d_sae))
    with pytest.raises(ValueError, match="holdout"):
        ConnectionData.from_codes(f1, f2, holdout=1.0)
    with pytest.raises(ValueError, match="outputs"):
        ConnectionData.from_codes(f1, f2, outputs=[99])


# ---- on a tiny model: the CE-based threshold and fastsae connect ---------------------------------------

TEXT = "the cat sat on the mat; a dog ran to the log. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastsae.harvest import harvest_corpus
    from fastsae.model import load

    from helpers import tiny_causal_lm

    d = tmp_path_factory.mktemp("connect")
    tiny_causal_lm(d / "lm")
    (d / "book.txt").write_text(TEXT)
    model, tok = load(str(d / "lm"))
    harvest_corpus(model, tok, ["mlp_in.0", "mlp_out.0"], d / "book.txt", d / "store", tokens=2048,
                   context_size=32, dtype=torch.float32, model_name=str(d / "lm"), progress=False)
    return d, model, tok


def test_linear_substitution_moves_only_the_substituted_features(tiny):
    """Identity check: with F1 = F2 (both hooks on the MLP's output) an identity connector changes nothing,
    and a doubling one adds exactly the features' decoded contribution."""
    from fastsae.analysis.compare.linear_substitution import eval_windows, substitution_ce
    from fastsae.analysis.features.store_contexts import encode_store
    from fastsae.harvest import ActivationStore
    from fastsae.model import hook_site

    from conftest import make_sae

    d, model, tok = tiny
    store = ActivationStore(d / "store")
    sae = make_sae(d_in=32, d_sae=24, activation="topk", k=4)
    codes = encode_store(sae, store, "mlp_out.0")
    data = ConnectionData.from_codes(codes, codes, holdout=0.25)
    windows, keep = eval_windows(store, tok, 256)
    same = "gpt_neox.layers.0.mlp"  # the module path of mlp_out.0: both hooks see the MLP's output
    ident = Connector(data.n_in, data.n_out, "linear")
    with torch.no_grad():
        ident.W1.copy_(torch.eye(data.n_in) * data.scale_in / data.scale_out)
    everything = torch.ones(data.n_out, dtype=torch.bool)
    clean, ablated, same_ce = substitution_ce(model, same, "mlp_out.0", sae, sae, data, ident,
                                              [None, "ablate", everything], windows, keep, batch_size=3)
    assert same_ce == pytest.approx(clean, abs=1e-5) and ablated != pytest.approx(clean, abs=1e-3)
    with torch.no_grad():
        ident.W1.mul_(2)
    (doubled,) = substitution_ce(model, same, "mlp_out.0", sae, sae, data, ident, [everything], windows, keep)
    known = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    known[data.out_features] = True

    def add_features(x):
        z = sae.encode(x).to_dense() * known
        return torch.where(k[..., None], x + z @ sae.W_dec, x)

    total, count = 0.0, 0
    with hook_site(model, "mlp_out.0", add_features), torch.no_grad():
        for first in range(0, windows.shape[0], 8):
            ids, k = windows[first:first + 8], keep[first:first + 8]
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            ce = -logp.gather(-1, ids[:, 1:, None])[..., 0]
            total += float(ce[k[:, 1:]].double().sum())
            count += int(k[:, 1:].sum())
    assert doubled == pytest.approx(total / count, abs=1e-5)


def test_connect_command_writes_the_report(tiny, tmp_path, capsys):
    import json

    from fastsae.cli import main

    from conftest import make_sae

    d, _, _ = tiny
    for name, site, seed in (("in", "mlp_in.0", 1), ("out", "mlp_out.0", 2)):
        sae = make_sae(d_in=32, d_sae=24, activation="topk", k=4, seed=seed)
        sae.metadata.update(site=site, model=str(d / "lm"), store=str(d / "store"))
        sae.save(tmp_path / name)
    out = tmp_path / "report"
    assert main(["connect", "--sae-in", str(tmp_path / "in"), "--sae-out", str(tmp_path / "out"), "--store",
                 str(d / "store"), "--steps", "30", "--hidden", "16", "--l1", "0", "0.1", "1",
                 "--eval-tokens", "128", "--browser-in", str(tmp_path / "in-browser"), "--cache-out",
                 str(tmp_path / "cache"), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "connect.json").read_text())
    assert set(report["connectors"]) == {"linear", "linear_relu", "mlp", "mlp_relu"}
    assert report["linearity"]["judged"] <= report["features"]["out"]
    assert len(report["per_feature"]["nonlinearity"]) == report["features"]["out"]
    assert report["ce_threshold"]["ce_mlp_out_ablated"] != report["ce_threshold"]["ce_clean"]
    assert len(report["l1_sweep"]["points"]) == 3 and report["sae_on_sae"]["hidden_l0"] is not None
    assert report["connectors"]["linear"]["fit"]["stopped"] == "least squares (exact)"
    assert report["l1_sweep"]["elbow_refit"]["applied"]
    assert report["connectors"]["mlp"]["fit"]["skip_start"] and report["l1_sweep"]["restricted_to_linear"]
    # linear_only by default: every formula is of a feature judged linear at the seed's threshold
    judged = dict(zip(report["per_feature"]["feature"], report["per_feature"]["nonlinearity"], strict=True))
    assert report["formulas"] and all(judged[f["output"]] is not None and judged[f["output"]] <= 0.001
                                      for f in report["formulas"])
    assert len(report["formulas"]) == report["linearity"]["linear"] < report["features"]["out"]
    assert all((out / f).stat().st_size > 0 for f in ("pareto.png", "nonlinearity.png", "formulas.md"))
    table = (out / "formulas.md").read_text()
    assert "](../in-browser/feature.html#" in table
    notes = json.loads((tmp_path / "cache" / "annotations" / "connect.json").read_text())
    assert notes["features"] and all(v["text"].startswith("OF ") for v in notes["features"].values())
    capsys.readouterr()
    assert main(["connect", "--sae-in", str(tmp_path / "in"), "--sae-out", str(tmp_path / "out"), "--store",
                 str(d / "store"), "--site-out", "mlp_out.1", "--out", str(out), "--no-progress"]) == 2
    assert "harvest both sites" in capsys.readouterr().err


def _saes(d, where):
    from conftest import make_sae

    for name, site, seed in (("in", "mlp_in.0", 1), ("out", "mlp_out.0", 2)):
        sae = make_sae(d_in=32, d_sae=24, activation="topk", k=4, seed=seed)
        sae.metadata.update(site=site, model=str(d / "lm"), store=str(d / "store"))
        sae.save(where / name)


def test_connect_resumes_a_killed_run(tiny, tmp_path):
    """Killed (SIGKILL, tests/kill_at.py) just before its second commit, i.e. after the first trained connector's
    checkpoint: the rerun loads that one, trains the rest, and writes the report an uninterrupted run writes."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from fastsae.cli import main
    from fastsae.io import is_temporary

    from helpers import KILL_AT, ROOT

    d, _, _ = tiny
    _saes(d, tmp_path)
    args = ["connect", "--sae-in", str(tmp_path / "in"), "--sae-out", str(tmp_path / "out"), "--store",
            str(d / "store"), "--steps", "40", "--eval-every", "10", "--hidden", "16", "--l1", "0", "0.1",
            "--no-ce", "--no-progress", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, KILL_AT, "2", "-m", "fastsae", *args, str(tmp_path / "resumed")],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    written = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert [n for n in written if not is_temporary(n)] == ["linear_relu.pt"]
    assert not (tmp_path / "resumed" / "connect.json").exists()
    assert main([*args, str(tmp_path / "resumed")]) == 0
    assert main([*args, str(tmp_path / "whole")]) == 0
    resumed, whole = (json.loads((tmp_path / r / "connect.json").read_text()) for r in ("resumed", "whole"))
    assert resumed.pop("checkpoints")["resumed"] == ["linear_relu"] and whole.pop("checkpoints")["resumed"] == []
    assert resumed == whole
    assert not [p for p in (tmp_path / "resumed").rglob("*") if is_temporary(p.name)]  # the killed run's are gone
    assert main([*args, str(tmp_path / "whole"), "--steps", "30"]) == 0  # other settings: retrained, not loaded
    assert json.loads((tmp_path / "whole" / "connect.json").read_text())["checkpoints"]["resumed"] == []
    assert main([*args, str(tmp_path / "whole"), "--steps", "30"]) == 0  # the same settings: every one loaded
    again = json.loads((tmp_path / "whole" / "connect.json").read_text())["checkpoints"]["resumed"]
    assert "mlp" in again and "l1_sweep_0.1" in again
