"""Per-connector checkpoints of `fastsae connect`, so that a killed run resumes: every connector it trains (the
four kinds, each point of the L1 sweep, each point of the SAE-on-SAE sweep) is written to
<out>/checkpoints/<name>.pt as soon as it is trained, with a signature of everything that determines it (the
SAEs, the store, the data's shape and normalisation, the training settings). A rerun into the same directory
loads each connector whose signature matches instead of training it again; training is seeded, so the resumed
report equals an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ... import io
from .connections import Connector


class ConnectorCheckpoints:
    """checkpoints.fit(name, settings, train) -> a Connector: loaded from <directory>/<name>.pt when its
    signature (base + settings) matches, else train() and written there. resumed: the names loaded."""

    def __init__(self, directory: str | Path, base: dict, *, enabled: bool = True):
        self.directory, self.base, self.enabled = Path(directory), base, enabled
        self.resumed: list[str] = []
        if enabled and self.directory.is_dir():  # a killed run's half-written checkpoint
            io.remove_stale_temporaries(self.directory)

    def _signature(self, settings: dict) -> str:
        text = json.dumps({**self.base, **settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def fit(self, name: str, settings: dict, train: Callable[[], Connector]) -> Connector:
        path = self.directory / f"{name}.pt"
        signature = self._signature(settings)
        if self.enabled and path.is_file():
            conn = self._load(path, signature)
            if conn is not None:
                self.resumed.append(name)
                return conn
        conn = train()
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            blob = {"signature": signature, "kind": conn.kind, "shape": list(conn.W1.shape),
                    "hidden": conn.W2.shape[0] if conn.kind.startswith("mlp") else None,
                    "bias": conn.b1 is not None, "skip": conn.Ws is not None, "fit_info": conn.fit_info,
                    "state": conn.state_dict()}
            io.atomic_write(path, lambda tmp: torch.save(blob, tmp))
        return conn

    @staticmethod
    def _load(path: Path, signature: str) -> Connector | None:
        """The checkpointed connector, or None when it was trained with other settings (then it is retrained)."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("signature") != signature:
            return None
        n_in = blob["shape"][0]
        n_out = blob["state"]["W2"].shape[1] if blob["kind"].startswith("mlp") else blob["shape"][1]
        conn = Connector(n_in, n_out, blob["kind"], blob["hidden"] or 1, blob["bias"], skip=blob["skip"])
        conn.load_state_dict(blob["state"])
        conn.fit_info = blob["fit_info"]
        return conn.eval()
