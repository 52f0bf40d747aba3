"""Connections by the seed's definitions (issue 28, item 4), on the synthetic pair of test_connect.py: the MLP
connector's skip start at least squares, the stopping rule, the per-layer nonlinearity against a hand computation,
and the SAE-on-SAE sweep down to hidden L0 <= 30."""

import dataclasses

import pytest
import torch
from test_connect import NONLINEAR, synthetic

from fastsae.analysis.compare.connections import (
    ConnectConfig,
    ConnectionData,
    Connector,
    evaluate,
    nonlinearity,
    relative_nonlinearity,
)
from fastsae.analysis.compare.connector_training import train_connector
from fastsae.analysis.compare.linear_connections import fit_linear

CFG = ConnectConfig(hidden=64, lr=1e-2, batch_size=256, steps=600, eval_every=25, patience=4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    f1, f2, x, y = synthetic(n=4000)
    data = ConnectionData.from_codes(f1, f2, holdout=0.2)
    return data, fit_linear(data), x, y


def test_the_skip_start_is_the_least_squares_fit(pair):
    """Before any step the MLP connector predicts exactly what least squares does: nonlinearity 0 for every
    feature (>= 0 by construction), and its loss is the linear loss."""
    data, lin, _, _ = pair
    start = train_connector(data, "mlp", dataclasses.replace(CFG, steps=0), init_linear=lin)
    assert start.fit_info["skip_start"] and start.fit_info["steps"] == 0
    rows = torch.arange(data.x_values.shape[0])
    xv, xi, _ = data.batch(rows)
    torch.testing.assert_close(start(xv, xi), lin(xv, xi))
    ev_lin, ev_start = evaluate(lin, data), evaluate(start, data)
    delta = nonlinearity(ev_lin, ev_start)
    judged = ~torch.isnan(delta)
    assert judged.sum() == data.n_out and delta[judged].abs().max() < 1e-9
    with pytest.raises(ValueError, match="skip path"):
        Connector(data.n_in, data.n_out, "linear").start_at(lin)


def test_trained_from_the_skip_start_it_finds_the_nonlinear_features(pair):
    data, lin, _, _ = pair
    mlp = train_connector(data, "mlp", CFG, init_linear=lin)
    ev_lin, ev_mlp = evaluate(lin, data), evaluate(mlp, data)
    delta = nonlinearity(ev_lin, ev_mlp)
    assert ev_mlp.fvu < ev_lin.fvu
    assert set((delta > 0.001).nonzero().squeeze(1).tolist()) == set(NONLINEAR), delta
    assert delta.min() > -1e-3  # the linear features stay where least squares put them, within noise
    assert mlp.fit_info["validation_loss_best"] <= mlp.fit_info["validation_loss_start"]


def test_the_stopping_rule_stops_and_says_why(pair):
    data, lin, _, _ = pair
    cfg = dataclasses.replace(CFG, steps=100_000, eval_every=10, patience=2, min_improvement=0.5)
    stopped = train_connector(data, "linear_relu", cfg)
    assert stopped.fit_info["stopped"].startswith("converged") and stopped.fit_info["steps"] < 100
    capped = train_connector(data, "linear_relu", dataclasses.replace(CFG, steps=30, eval_every=10))
    assert capped.fit_info["stopped"].startswith("step cap") and capped.fit_info["steps"] == 30
    fixed = train_connector(data, "linear_relu", dataclasses.replace(CFG, steps=30, patience=0))
    assert fixed.fit_info == {"stopped": "fixed steps", "steps": 30, "skip_start": False}
    with pytest.raises(ValueError, match="validation"):
        train_connector(data, "linear_relu", dataclasses.replace(CFG, validation=1.0))


def test_nonlinearity_is_normalised_per_layer_as_the_seed(pair):
    """By hand in raw units: (mse_lin_j - mse_mlp_j) / E_train ||F2||², one divisor for the layer."""
    data, lin, x, y = pair
    mlp = train_connector(data, "mlp", dataclasses.replace(CFG, steps=50, patience=0))
    held = torch.arange(data.n_train, x.shape[0])
    dense_x = x[held]
    xv, xi = dense_x, torch.arange(x.shape[1]).expand(len(held), -1)  # every input as a slot, in raw units
    raw = {}
    for name, conn in (("lin", lin), ("mlp", mlp)):
        pred = conn(xv / data.scale_in, xi) * data.scale_out
        raw[name] = (pred.double() - y[held].double()).pow(2).mean(0)
    layer_energy = y[:data.n_train].double().pow(2).sum(1).mean()
    want = (raw["lin"] - raw["mlp"]) / layer_energy
    got = nonlinearity(evaluate(lin, data), evaluate(mlp, data))
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    per_feature = relative_nonlinearity(evaluate(lin, data), evaluate(mlp, data))
    energy_j = y[held].double().pow(2).mean(0)
    torch.testing.assert_close(per_feature, (raw["lin"] - raw["mlp"]) / energy_j, atol=1e-6, rtol=1e-3)


def test_sae_on_sae_sweep_reaches_hidden_l0_30(pair, tmp_path):
    from fastsae.analysis.compare.connect_checkpoint import ConnectorCheckpoints
    from fastsae.analysis.compare.connect_run import _sae_on_sae

    data, _, _, _ = pair
    cfg = dataclasses.replace(CFG, hidden=128, steps=200)
    dense = evaluate(train_connector(data, "mlp", cfg), data)
    assert dense.hidden_l0 > 30  # the sweep has work to do
    ck = ConnectorCheckpoints(tmp_path, {"data": "synthetic"})
    result = _sae_on_sae(data, cfg, 1e-3, 0.0, 30, {"mlp": dense}, lambda *a: None, False, ck)
    sweep = result["sweep"]
    assert result["reached"] and result["hidden_l0"] <= 30 and len(sweep) >= 2
    assert sweep[0]["hidden_l0"] > 30 and [p["hidden_l1"] for p in sweep] == pytest.approx(
        [1e-3 * 3 ** i for i in range(len(sweep))])
    assert result["heldout_fvu"] == sweep[-1]["heldout_fvu"] < 1.0
    again = ConnectorCheckpoints(tmp_path, {"data": "synthetic"})  # a rerun loads every point
    assert _sae_on_sae(data, cfg, 1e-3, 0.0, 30, {"mlp": dense}, lambda *a: None, False, again) == result
    assert len(again.resumed) == len(sweep)
