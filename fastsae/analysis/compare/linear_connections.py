"""Linear connections between SAE features across an MLP: the linear connector fitted exactly by least squares,
and sparse linear connections (Riggs, Mitchell & Kaufman 2023) — linear connectors with L1 on their weights
over a sweep of coefficients, the sweep's elbow, the relaxed lasso on the inputs L1 kept, and each output
feature as a readable formula ("OF 30 ≈ 0.80·IF 2797 + 0.61·IF 259"). The data, the connectors and their
held-out evaluation: connections.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .connections import ConnectConfig, ConnectionData, Connector, ConnectorEval, evaluate
from .connector_training import train_connector

# Formulas keep inputs whose relative weight (below) is >= 5% of the output's typical activation: smaller
# terms change the prediction by less than the spread of the output's own values on its top contexts.
TERM_MIN = 0.05
# fit_linear's XᵀX in float64: 8192² · 8 B = 512 MiB. Wider inputs train the linear connector with Adam.
LSTSQ_MAX_INPUTS = 8192
RIDGE = 1e-6  # ρ relative to XᵀX's mean diagonal: moves no input firing over a millionth as often as the average


@torch.no_grad()
def normal_equations(data: ConnectionData, *, outputs: Tensor | None = None, bias: bool = False,
                     chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """XᵀX (n, n) and XᵀY (n, m) over the training rows in float64, n = n_in (+1: a constant input standing for
    the bias), m = the outputs (default all). Summed from the sparse codes pair by pair (N·w1² and N·w1·w2
    products), never from dense rows."""
    n_in = data.n_in + (1 if bias else 0)
    if n_in > LSTSQ_MAX_INPUTS:
        raise ValueError(f"{n_in} input features exceed {LSTSQ_MAX_INPUTS} (XᵀX would not fit in memory); "
                         f"train the linear connector with train_connector instead")
    out_cols = outputs if outputs is not None else torch.arange(data.n_out)
    lookup = torch.full((data.n_out,), -1, dtype=torch.int64)
    lookup[out_cols] = torch.arange(out_cols.shape[0])
    m = out_cols.shape[0]
    gram = torch.zeros(n_in * n_in, dtype=torch.float64)
    cross = torch.zeros(n_in * m, dtype=torch.float64)
    for start in range(0, data.n_train, chunk):
        stop = min(start + chunk, data.n_train)
        xv, xi = data.x_values[start:stop].double(), data.x_indices[start:stop]
        if bias:
            xv = torch.cat([xv, torch.ones(xv.shape[0], 1, dtype=xv.dtype)], 1)
            xi = torch.cat([xi, torch.full((xi.shape[0], 1), n_in - 1)], 1)
        yi = lookup[data.y_indices[start:stop]]
        yv = torch.where(yi >= 0, data.y_values[start:stop].double(), 0.0)
        yi = yi.clamp_min(0)
        gram.index_add_(0, (xi[:, :, None] * n_in + xi[:, None, :]).reshape(-1),
                        (xv[:, :, None] * xv[:, None, :]).reshape(-1))
        cross.index_add_(0, (xi[:, :, None] * m + yi[:, None, :]).reshape(-1),
                         (xv[:, :, None] * yv[:, None, :]).reshape(-1))
    return gram.view(n_in, n_in), cross.view(n_in, m)


def _ridge(gram: Tensor, ridge: float) -> Tensor:
    return ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)


@torch.no_grad()
def fit_linear(data: ConnectionData, cfg: ConnectConfig | None = None, *, outputs: Tensor | None = None,
               ridge: float = RIDGE, equations: tuple[Tensor, Tensor] | None = None) -> Connector:
    """The linear connector by least squares on the training rows, W = (XᵀX + ρI)⁻¹ XᵀY: exact, so that the
    linear-vs-MLP comparison measures the data and not how far Adam got. ρ = ridge · mean(diag XᵀX) keeps
    features that always fire together solvable. equations: normal_equations(...) when already computed."""
    cfg = cfg or ConnectConfig()
    gram, cross = equations or normal_equations(data, outputs=outputs, bias=cfg.bias)
    W = torch.linalg.solve(gram + _ridge(gram, ridge), cross)  # (n, m)
    conn = Connector(data.n_in, cross.shape[1], "linear", bias=cfg.bias)
    conn.W1.copy_(W[:data.n_in].float())
    if cfg.bias:
        conn.b1.copy_(W[data.n_in].float())
    return conn.eval()


@torch.no_grad()
def refit(conn: Connector, data: ConnectionData, *, outputs: Tensor | None = None, term_min: float = TERM_MIN,
          ridge: float = RIDGE, equations: tuple[Tensor, Tensor] | None = None) -> Connector:
    """The relaxed lasso (Meinshausen 2007): L1 picks each output's inputs (|relative weight| >= term_min),
    then least squares on those inputs alone undoes the L1 shrinkage of their weights."""
    bias = conn.b1 is not None
    gram, cross = equations or normal_equations(data, outputs=outputs, bias=bias)
    rel = relative_weights(conn, data, outputs)  # (n_in, m)
    W = torch.zeros(gram.shape[0], cross.shape[1], dtype=torch.float64)
    for j in range(cross.shape[1]):
        support = (rel[:, j].abs() >= term_min).nonzero().squeeze(1)
        if bias:
            support = torch.cat([support, torch.tensor([data.n_in])])
        if support.numel():
            g = gram[support][:, support]
            W[support, j] = torch.linalg.solve(g + _ridge(g, ridge), cross[support, j])
    fitted = Connector(data.n_in, cross.shape[1], "linear", bias=bias)
    fitted.W1.copy_(W[:data.n_in].float())
    if bias:
        fitted.b1.copy_(W[data.n_in].float())
    return fitted.eval()


# ---- sparse linear connections --------------------------------------------------------------------

@dataclass
class SweepPoint:
    l1_coefficient: float
    connector: Connector
    eval: ConnectorEval
    l1_norm: float  # Σ_i |w_ij| σ_i / σ_j per output feature j: the L1 norm of its standardised weights
    connections: float  # mean number of formula terms per output feature (|relative weight| >= TERM_MIN)


def relative_weights(conn: Connector, data: ConnectionData, outputs: Tensor | None = None) -> Tensor:
    """(n_in, m) the linear weights in units of the features' typical activations: w_ij · m_i / m_j, with m the
    mean value of a feature when active. 0.8 reads: at its typical activation input i supplies 80% of output
    j's typical activation."""
    out_mean = data.out_active_mean if outputs is None else data.out_active_mean[outputs]
    return conn.linear_weights * data.in_active_mean[:, None] / out_mean.clamp_min(1e-12)[None, :]


def l1_sweep(data: ConnectionData, coefficients, cfg: ConnectConfig | None = None, *,
             outputs: Tensor | None = None, progress: bool = False, checkpoints=None) -> list[SweepPoint]:
    """Linear connectors with L1 on the weights, one per coefficient (ascending), each from scratch.
    checkpoints: a connect_checkpoint.ConnectorCheckpoints that keeps (and resumes) each point's connector."""
    cfg = cfg or ConnectConfig()
    points = []
    for lam in sorted(coefficients):
        point_cfg = dataclasses.replace(cfg, weight_l1=lam)

        def train(point_cfg=point_cfg):
            return train_connector(data, "linear", point_cfg, outputs=outputs, progress=progress)

        settings = {"kind": "linear", "cfg": dataclasses.asdict(point_cfg),
                    "outputs": None if outputs is None else outputs.tolist()}
        conn = checkpoints.fit(f"l1_sweep_{lam:g}", settings, train) if checkpoints is not None else train()
        ev = evaluate(conn, data, outputs=outputs)
        rel = relative_weights(conn, data, outputs)
        s_out = data.out_rms if outputs is None else data.out_rms[outputs]
        standardised = conn.linear_weights.abs() * data.in_rms[:, None] / s_out.clamp_min(1e-12)[None, :]
        points.append(SweepPoint(lam, conn, ev, float(standardised.sum(0).mean()),
                                 float((rel.abs() >= TERM_MIN).sum(0).double().mean())))
    return points


def elbow(points: list[SweepPoint]) -> int:
    """The index of the knee of held-out FVU against the L1 norm (Satopää et al. 2011, "Kneedle"): with both
    axes scaled to [0, 1] over the sweep, the point farthest below the chord between the two ends."""
    if not points:
        raise ValueError("elbow needs at least one sweep point")
    if len(points) < 3:
        return 0
    xs = torch.tensor([p.l1_norm for p in points], dtype=torch.float64)
    ys = torch.tensor([p.eval.fvu for p in points], dtype=torch.float64)
    order = torch.argsort(xs)
    x, y = xs[order], ys[order]
    x = (x - x[0]) / (x[-1] - x[0]).clamp_min(1e-30)
    y = (y - y.min()) / (y.max() - y.min()).clamp_min(1e-30)
    chord = y[0] + (y[-1] - y[0]) * x  # the straight line between the sparsest and the densest point
    return int(order[int(torch.argmax(chord - y))])


@dataclass
class Formula:
    output: int  # the output latent id
    terms: list[tuple[int, float]]  # (input latent id, relative weight), largest |weight| first
    fvu: float  # held-out mse / energy of this output under the connector

    def text(self, max_terms: int = 6) -> str:
        """'OF 30 ≈ 0.80·IF 2797 + 0.61·IF 259 − 0.20·IF 946': + terms are OR-like (any of them drives the
        output), − terms AND-NOT-like (the output fires unless they do)."""
        if not self.terms:
            return f"OF {self.output} ≈ 0"
        parts = []
        for n, (i, w) in enumerate(self.terms[:max_terms]):
            sign = ("− " if n else "−") if w < 0 else ("+ " if n else "")
            parts.append(f"{sign}{abs(w):.2f}·IF {i}")
        more = f" + … ({len(self.terms) - max_terms} more)" if len(self.terms) > max_terms else ""
        return f"OF {self.output} ≈ " + " ".join(parts) + more


def formulas(conn: Connector, data: ConnectionData, ev: ConnectorEval | None = None, *,
             outputs: Tensor | None = None, term_min: float = TERM_MIN) -> list[Formula]:
    """Each output feature's inputs with |relative weight| >= term_min, as a Formula (original latent ids)."""
    ev = ev or evaluate(conn, data, outputs=outputs)
    rel = relative_weights(conn, data, outputs)  # (n_in, m)
    out_ids = data.out_features if outputs is None else data.out_features[outputs]
    result = []
    for j in range(rel.shape[1]):
        col = rel[:, j]
        keep = (col.abs() >= term_min).nonzero().squeeze(1)
        keep = keep[torch.argsort(col[keep].abs(), descending=True)]
        terms = [(int(data.in_features[i]), round(float(col[i]), 4)) for i in keep]
        fvu = float(ev.mse[j] / ev.energy[j]) if ev.energy[j] > 0 else math.nan
        result.append(Formula(int(out_ids[j]), terms, fvu))
    return result
