"""Feature connections across an MLP: with SAE features F1 at the MLP's input and F2 at its output on
the same tokens, learn how F2 is computed from F1 (Riggs, Mitchell & Kaufman 2023, "Finding Sparse
Linear Connections between Features in LLMs").

    data = ConnectionData.from_codes(f1, f2)           # SparseLatents (N, w1), (N, w2), token-aligned
    lin = fit_linear(data)                             # y = W x, by least squares (linear_connections.py)
    mlp = train_connector(data, "mlp")                 # y = W2 relu(W1 x)
    delta = nonlinearity(evaluate(lin, data), evaluate(mlp, data))   # per output feature, held out
    points = l1_sweep(data, (0, 1e-4, 1e-3, 1e-2))     # sparse linear connections; elbow(points)
    sparse = refit(points[elbow(points)].connector, data)   # least squares on the inputs L1 kept
    formulas(sparse, data)                             # "OF 30 ≈ 0.80·IF 2797 + 0.61·IF 259"

This module holds the data, the connectors, their training and held-out evaluation; the least-squares fit,
the L1 sweep and the formulas are in linear_connections.py.

Connectors (the seed's four): "linear" y = W x; "linear_relu" y = relu(W x); "mlp" y = W2 relu(W1 x);
"mlp_relu" y = relu(W2 relu(W1 x)); no bias by default (the seed found it did not lower the loss).
The linear connector is fitted exactly by least squares (fit_linear, for up to 8192 input features), so
its comparison with the MLP measures the data, not how far Adam got; the others train with Adam. Their
first layer takes F1 as indices and values (torch's embedding_bag), so a step costs O(B·w1·width), never
O(B·d_sae_in), and dead inputs and unused outputs are dropped from the weights.

Normalisation, per layer (the seed: "normalize all losses by their respective L2-norm/layer"): F1 and F2 are
divided by their root mean squared norm per token over the training tokens, sqrt(E||F||²), so each layer's codes
have E||F||² = 1 and the summed squared error per token is a fraction of the output layer's energy (1.0 =
predicting zero), comparable across layers. Per output feature j, held-out mse_j = E (ŷ_j - y_j)² and
energy_j = E y_j² in those units.

How linear a feature is, as the seed defines it: nonlinearity_j = mse_lin_j - mse_mlp_j in those per-layer units
(the raw loss difference divided by the layer's E||F2||², one divisor for every feature of the layer). Features
with nonlinearity below a threshold (0.001, the seed's number) are linear. relative_nonlinearity divides by each
feature's own energy instead (a diagnostic: it calls rare features nonlinear far more readily); `ce_threshold` in
linear_substitution.py offers a threshold set by the model's loss.

So that nonlinearity >= 0 by construction, the MLP connectors get a linear skip path started at the linear
connector's weights (least squares) with W2 = 0: y = Ws x + W2 relu(W1 x) begins exactly at the linear fit, and
training keeps the state with the best validation loss (a slice of the training rows, never the held-out ones).
Training stops when that loss has not improved by a relative min_improvement for `patience` evaluations, or at
the step cap; Connector.fit_info records which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...latents import SparseLatents

KINDS = ("linear", "linear_relu", "mlp", "mlp_relu")


@dataclass
class ConnectConfig:
    """How connectors are trained (one setting for every kind, so their losses compare)."""

    hidden: int = 1024  # MLP connectors' hidden width
    bias: bool = False  # the seed found a bias did not lower the loss
    lr: float = 1e-3
    batch_size: int = 1024
    steps: int = 20000  # the cap on Adam steps per connector; the stopping rule below usually ends sooner
    eval_every: int = 100  # steps between validation losses (the stopping rule's clock)
    patience: int = 5  # stop after this many evaluations without a relative improvement; 0: run `steps` steps
    min_improvement: float = 1e-4  # relative improvement of the validation loss that resets the patience
    validation: float = 0.1  # share of the training rows held back for the stopping rule (when patience > 0)
    skip: bool = True  # MLP connectors get a linear skip path started at the linear fit (given init_linear)
    weight_l1: float = 0.0  # L1 on the standardised weights (sparse linear connections; see weight_penalty)
    hidden_l1: float = 0.0  # L1 on the hidden activations (SAE on SAE)
    seed: int = 0


@dataclass
class ConnectionData:
    """Token-aligned codes, compacted to the features that occur, normalised per layer.

    x_values, x_indices (N, w1): F1 over the input features in_features (compact ids 0..n_in-1);
    y_values, y_indices (N, w2): F2 over out_features. Padding slots hold value 0 at index 0.
    Rows [0, n_train) train the connectors; the rest are held out (the store's last windows)."""

    x_values: Tensor
    x_indices: Tensor
    y_values: Tensor
    y_indices: Tensor
    in_features: Tensor  # (n_in,) original latent ids of the inputs
    out_features: Tensor  # (n_out,) original latent ids of the outputs
    scale_in: float  # sqrt(E||F1||²) over training rows (raw units): x = F1 / scale_in
    scale_out: float
    n_train: int
    in_active_mean: Tensor = field(default=None)  # (n_in,) mean normalised value of each input when active
    out_active_mean: Tensor = field(default=None)  # (n_out,)
    in_rms: Tensor = field(default=None)  # (n_in,) sqrt(E x_i²) over training rows (normalised units)
    out_rms: Tensor = field(default=None)  # (n_out,)

    @property
    def n_in(self) -> int:
        return self.in_features.shape[0]

    @property
    def n_out(self) -> int:
        return self.out_features.shape[0]

    @classmethod
    def from_codes(cls, f1: SparseLatents, f2: SparseLatents, *, holdout: float = 0.1,
                   outputs: Tensor | list[int] | None = None) -> ConnectionData:
        """f1, f2: the SAEs' codes on the same N tokens (rows in order; the last holdout share is held out).
        outputs: which F2 latents to learn (default: every one that fires on a training row)."""
        if f1.values.shape[0] != f2.values.shape[0] or f1.values.dim() != 2 or f2.values.dim() != 2:
            raise ValueError(f"f1 and f2 must be (N, w) codes of the same N tokens, got "
                             f"{tuple(f1.values.shape)} and {tuple(f2.values.shape)}")
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        n = f1.values.shape[0]
        n_train = int(round(n * (1 - holdout)))
        if n_train < 1 or n_train == n:
            raise ValueError(f"{n} tokens cannot be split into training and held-out rows (holdout {holdout})")
        seen_in = _fired(f1, n_train)
        seen_out = _fired(f2, n_train) if outputs is None else torch.as_tensor(outputs, dtype=torch.int64)
        if seen_out.numel() and (seen_out.min() < 0 or seen_out.max() >= f2.d_sae):
            raise ValueError(f"outputs must be latent ids in [0, {f2.d_sae})")
        xv, xi = _compact(f1, seen_in)
        yv, yi = _compact(f2, seen_out)
        scale_in = float(xv[:n_train].double().pow(2).sum(1).mean().sqrt())
        scale_out = float(yv[:n_train].double().pow(2).sum(1).mean().sqrt())
        if scale_in == 0 or scale_out == 0:
            raise ValueError("F1 or F2 is zero on every training token: nothing to connect")
        data = cls(xv / scale_in, xi, yv / scale_out, yi, seen_in, seen_out, scale_in, scale_out, n_train)
        data.in_active_mean, data.in_rms = _feature_stats(data.x_values[:n_train], xi[:n_train], data.n_in)
        data.out_active_mean, data.out_rms = _feature_stats(data.y_values[:n_train], yi[:n_train], data.n_out)
        return data

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x values, x indices (B, w1) and the dense target (B, n_out)."""
        y = torch.zeros(rows.shape[0], self.n_out)
        y.scatter_add_(1, self.y_indices[rows], self.y_values[rows])
        return self.x_values[rows], self.x_indices[rows], y


def _fired(codes: SparseLatents, n_train: int) -> Tensor:
    """Latent ids active on at least one training row, ascending."""
    active = codes.values[:n_train] > 0
    return codes.indices[:n_train][active].unique()


def _compact(codes: SparseLatents, keep: Tensor) -> tuple[Tensor, Tensor]:
    """codes over the latents keep only, renumbered 0..len(keep)-1; others become inert padding."""
    lookup = torch.full((codes.d_sae,), -1, dtype=torch.int64)
    lookup[keep] = torch.arange(keep.shape[0])
    idx = lookup[codes.indices]
    ok = (idx >= 0) & (codes.values > 0)
    return torch.where(ok, codes.values.float(), 0.0), torch.where(ok, idx, 0)


def _feature_stats(values: Tensor, indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(n,) mean value when active, and sqrt(E v²) over all rows, per feature."""
    active = values > 0
    v, i = values[active].double(), indices[active]
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, i, v)
    squares = torch.zeros(n, dtype=torch.float64).index_add_(0, i, v * v)
    count = torch.bincount(i, minlength=n).double()
    return (total / count.clamp_min(1)).float(), (squares / values.shape[0]).sqrt().float()


class Connector(nn.Module):
    """F1 (as indices and values) -> predicted F2 (B, n_out). kind: one of KINDS."""

    def __init__(self, n_in: int, n_out: int, kind: str = "linear", hidden: int = 1024, bias: bool = False,
                 seed: int = 0, skip: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if n_in < 1 or n_out < 1 or hidden < 1:
            raise ValueError(f"n_in, n_out and hidden must be >= 1, got {n_in}, {n_out}, {hidden}")
        self.kind = kind
        gen = torch.Generator().manual_seed(seed)
        first = n_out if kind.startswith("linear") else hidden
        # W1 (n_in, first): row i is what input feature i adds. Small init: a sparse input's few rows sum.
        self.W1 = nn.Parameter(torch.randn(n_in, first, generator=gen) * 0.01)
        self.b1 = nn.Parameter(torch.zeros(first)) if bias else None
        if kind.startswith("mlp"):
            self.W2 = nn.Parameter(torch.randn(hidden, n_out, generator=gen) / math.sqrt(hidden))
            self.b2 = nn.Parameter(torch.zeros(n_out)) if bias else None
        # Ws (n_in, n_out): the MLP connectors' linear skip path (start_at puts the linear fit there)
        self.Ws = nn.Parameter(torch.zeros(n_in, n_out)) if skip and kind.startswith("mlp") else None
        self.fit_info: dict = {}

    @torch.no_grad()
    def start_at(self, linear: Connector) -> None:
        """Skip path = the linear connector, W2 = 0 (b2 = its bias): this connector's output starts equal to
        linear's, so its loss starts at the linear loss."""
        if self.Ws is None:
            raise ValueError(f"start_at needs an MLP connector with a skip path, this one is {self.kind!r}")
        if linear.kind != "linear" or linear.W1.shape != self.Ws.shape:
            raise ValueError(f"linear must be a linear connector of shape {tuple(self.Ws.shape)}, got "
                             f"{linear.kind!r} {tuple(linear.W1.shape)}")
        self.Ws.copy_(linear.W1)
        self.W2.zero_()
        if self.b2 is not None:
            self.b2.copy_(linear.b1 if linear.b1 is not None else torch.zeros_like(self.b2))

    def first(self, values: Tensor, indices: Tensor) -> Tensor:
        """(B, w) -> (B, width): Σ_slots value · W1[index] (+ b1)."""
        h = F.embedding_bag(indices, self.W1, per_sample_weights=values, mode="sum")
        return h + self.b1 if self.b1 is not None else h

    def forward(self, values: Tensor, indices: Tensor, *, return_hidden: bool = False):
        h = self.first(values, indices)
        hidden = None
        if self.kind == "linear_relu":
            h = h.relu()
        elif self.kind.startswith("mlp"):
            hidden = h.relu()
            h = hidden @ self.W2
            if self.b2 is not None:
                h = h + self.b2
            if self.Ws is not None:
                h = h + F.embedding_bag(indices, self.Ws, per_sample_weights=values, mode="sum")
            if self.kind == "mlp_relu":
                h = h.relu()
        return (h, hidden) if return_hidden else h

    @property
    def linear_weights(self) -> Tensor:
        """(n_in, n_out): the linear connector's W (raw connection weights in normalised units)."""
        if self.kind != "linear":
            raise ValueError(f"only a linear connector has one weight matrix, this one is {self.kind!r}")
        return self.W1.detach()



def weight_penalty(conn: Connector, data: ConnectionData, outputs: Tensor | None = None) -> Tensor:
    """L1 of the weights in standardised units, Σ_ij |w_ij| σ_i σ_j (σ: a feature's root mean square): the
    squared error of output j scales with σ_j², so this is λ Σ |w_ij σ_i / σ_j| per output after dividing by
    it, the lasso on standardised features. A plain Σ|w| would penalise rare features (small σ: most SAE
    latents fire on < 1% of tokens) far more than common ones, and drop their connections first.
    MLP connectors: Σ |W1_ih| σ_i + Σ |W2_hj| σ_j."""
    s_in = data.in_rms
    s_out = data.out_rms if outputs is None else data.out_rms[outputs]
    if conn.kind.startswith("linear"):
        return (conn.W1.abs() * s_in[:, None] * s_out[None, :]).sum()
    mlp = (conn.W1.abs() * s_in[:, None]).sum() + (conn.W2.abs() * s_out[None, :]).sum()
    return mlp if conn.Ws is None else mlp + (conn.Ws.abs() * s_in[:, None] * s_out[None, :]).sum()


@dataclass
class ConnectorEval:
    """Held-out error of a connector, per output feature and in total (normalised units)."""

    mse: Tensor  # (n_out,) E (ŷ_j - y_j)² over held-out tokens
    energy: Tensor  # (n_out,) E y_j²
    firings: Tensor  # (n_out,) held-out tokens on which feature j is active
    hidden_l0: float | None = None  # mean active hidden units per token (MLP connectors)
    hidden_l1: float | None = None  # mean Σ_h h per token (MLP connectors): the SAE-on-SAE penalty's term

    @property
    def fvu(self) -> float:
        """Σ_j mse_j / Σ_j energy_j: the share of the output layer's held-out energy left unexplained."""
        return float(self.mse.sum() / self.energy.sum().clamp_min(1e-30))


@torch.no_grad()
def evaluate(conn: Connector, data: ConnectionData, *, outputs: Tensor | None = None, batch_size: int = 4096,
             rows: Tensor | None = None) -> ConnectorEval:
    """Per-feature squared error of conn on the held-out rows (or rows)."""
    rows = torch.arange(data.n_train, data.x_values.shape[0]) if rows is None else rows
    n_out = data.n_out if outputs is None else outputs.shape[0]
    sq, energy, fired = torch.zeros(n_out, dtype=torch.float64), torch.zeros(n_out, dtype=torch.float64), \
        torch.zeros(n_out, dtype=torch.int64)
    l0, l1 = 0.0, 0.0
    for start in range(0, rows.shape[0], batch_size):
        r = rows[start:start + batch_size]
        xv, xi, y = data.batch(r)
        if outputs is not None:
            y = y[:, outputs]
        pred, hidden = conn(xv, xi, return_hidden=True)
        sq += (pred - y).double().pow(2).sum(0)
        energy += y.double().pow(2).sum(0)
        fired += (y > 0).sum(0)
        if hidden is not None:
            l0 += float((hidden > 0).sum())
            l1 += float(hidden.double().sum())
    n = max(1, rows.shape[0])
    mlp = conn.kind.startswith("mlp")
    return ConnectorEval(sq / n, energy / n, fired, l0 / n if mlp else None, l1 / n if mlp else None)


def nonlinearity(linear: ConnectorEval, mlp: ConnectorEval) -> Tensor:
    """(n_out,) mse_lin - mse_mlp per output feature in per-layer units (the seed's measure: the layer's codes are
    normalised to E||F2||² = 1, one divisor for all its features); NaN where the feature is silent held out."""
    return torch.where(linear.energy > 0, linear.mse - mlp.mse, math.nan)


def relative_nonlinearity(linear: ConnectorEval, mlp: ConnectorEval) -> Tensor:
    """(n_out,) (mse_lin - mse_mlp) / energy_j, each feature by its own energy (a diagnostic, not the seed's)."""
    return torch.where(linear.energy > 0, (linear.mse - mlp.mse) / linear.energy.clamp_min(1e-30), math.nan)

