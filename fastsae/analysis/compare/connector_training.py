"""The connectors' training (train_connector) and its stopping rule: the validation rows held back
from the training rows, the objective measured on them, and Stopper, which decides when training has converged
and keeps the best state."""

from __future__ import annotations

import torch
from torch import Tensor

from .connections import ConnectConfig, ConnectionData, Connector, evaluate, weight_penalty


def split_rows(data: ConnectionData, cfg: ConnectConfig) -> tuple[int, Tensor | None]:
    """(rows Adam trains on: [0, n_fit), the validation rows of the stopping rule or None)."""
    if cfg.patience <= 0:
        return data.n_train, None
    if cfg.eval_every < 1 or not 0 < cfg.validation < 1:
        raise ValueError(f"the stopping rule needs eval_every >= 1 and validation in (0, 1), got "
                         f"{cfg.eval_every} and {cfg.validation}")
    n_val = max(1, int(round(data.n_train * cfg.validation)))
    if n_val >= data.n_train:
        raise ValueError(f"{data.n_train} training rows leave none to train on after {n_val} validation rows")
    return data.n_train - n_val, torch.arange(data.n_train - n_val, data.n_train)


@torch.no_grad()
def objective(conn: Connector, data: ConnectionData, cfg: ConnectConfig, outputs: Tensor | None,
               rows: Tensor) -> float:
    """The training loss, penalties included, on the validation rows: with an L1 penalty the rule must follow
    what training minimises, or it would keep a dense early state of an SAE on SAE for its lower error."""
    ev = evaluate(conn, data, outputs=outputs, rows=rows)
    value = float(ev.mse.sum())
    if cfg.weight_l1:
        value += cfg.weight_l1 * float(weight_penalty(conn, data, outputs))
    if cfg.hidden_l1 and ev.hidden_l1 is not None:
        value += cfg.hidden_l1 * ev.hidden_l1
    return value


class Stopper:
    """The stopping rule: the validation loss every eval_every steps; stop after `patience` evaluations without
    a relative improvement of min_improvement over the best; keep the best state (the start included)."""

    def __init__(self, cfg: ConnectConfig, conn: Connector, loss):
        self.cfg, self.conn, self.loss = cfg, conn, loss
        self.start = self.best = loss()
        self.best_step, self.since, self.state = 0, 0, copy_state(conn)
        self.reason, self.last = None, 0

    def converged(self, step: int) -> bool:
        self.last = step
        value = self.loss()
        if value < self.best * (1 - self.cfg.min_improvement):
            self.best, self.best_step, self.since, self.state = value, step, 0, copy_state(self.conn)
        else:
            self.since += 1
        if self.since >= self.cfg.patience:
            self.reason = (f"converged: no relative improvement of {self.cfg.min_improvement:g} in "
                           f"{self.cfg.patience} evaluations ({self.cfg.patience * self.cfg.eval_every} steps)")
        return self.reason is not None

    def finish(self, step: int) -> dict:
        if self.last != step:  # the steps since the last evaluation count too (and a run shorter than eval_every)
            self.converged(step)
        self.conn.load_state_dict(self.state)
        return {"stopped": self.reason or f"step cap ({self.cfg.steps}) before convergence", "steps": step,
                "best_step": self.best_step, "validation_loss_start": self.start, "validation_loss_best": self.best}


def copy_state(conn: Connector) -> dict:
    return {k: v.detach().clone() for k, v in conn.state_dict().items()}


def train_connector(data: ConnectionData, kind: str = "linear", cfg: ConnectConfig | None = None, *,
                    outputs: Tensor | None = None, progress: bool = False,
                    init_linear: Connector | None = None) -> Connector:
    """Adam: loss = E_tokens Σ_j (ŷ_j - y_j)² + weight_l1 · weight_penalty + hidden_l1 E Σ_h h.
    outputs (m,) compact output ids: learn only those (the rest of the target is ignored). init_linear: the
    linear connector of the same outputs, where MLP kinds start (skip path; cfg.skip). With cfg.patience > 0
    the last cfg.validation of the training rows are held back and the stopping rule applies (module
    docstring); the returned connector is the state with the best validation loss, conn.fit_info says why
    training stopped."""
    from tqdm.auto import tqdm

    cfg = cfg or ConnectConfig()
    n_out = data.n_out if outputs is None else outputs.shape[0]
    skip = cfg.skip and init_linear is not None and kind.startswith("mlp")
    conn = Connector(data.n_in, n_out, kind, cfg.hidden, cfg.bias, cfg.seed, skip=skip)
    if skip:
        conn.start_at(init_linear)
    n_fit, val_rows = split_rows(data, cfg)
    stop = Stopper(cfg, conn, lambda: objective(conn, data, cfg, outputs, val_rows)) if val_rows is not None \
        else None
    opt = torch.optim.Adam(conn.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    perm, pos, step = torch.randperm(n_fit, generator=gen), 0, 0
    for step in tqdm(range(1, cfg.steps + 1), disable=not progress, desc=f"connector {kind}", leave=False):
        if pos + cfg.batch_size > n_fit:  # a fresh permutation each epoch
            perm, pos = torch.randperm(n_fit, generator=gen), 0
        rows = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        xv, xi, y = data.batch(rows)
        if outputs is not None:
            y = y[:, outputs]
        pred, hidden = conn(xv, xi, return_hidden=True)
        loss = (pred - y).pow(2).sum(1).mean()
        if cfg.weight_l1:
            loss = loss + cfg.weight_l1 * weight_penalty(conn, data, outputs)
        if cfg.hidden_l1 and hidden is not None:
            loss = loss + cfg.hidden_l1 * hidden.sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stop is not None and step % cfg.eval_every == 0 and stop.converged(step):
            break
    conn.fit_info = stop.finish(step) if stop is not None else {"stopped": "fixed steps", "steps": step}
    conn.fit_info["skip_start"] = skip
    return conn.eval()
