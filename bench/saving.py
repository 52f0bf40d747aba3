"""Where benchmark results go, and how: a JSON of the numbers and a markdown table beside it."""

from __future__ import annotations

import datetime as dt
import platform
import sys
from pathlib import Path

import torch

from fastsae import io

# The root of the results; each benchmark writes into its topic's folder (training/, harvest/, evaluation/,
# main-job/, features/, analysis/, kernels/), indexed in results/README.md.
RESULTS = Path(__file__).resolve().parent / "results"


def save_report(out: str | Path, stem: str, payload: dict, table: str) -> Path:
    """Print the table, and write <out>/<stem>.json (payload) and <out>/<stem>.md (table), each atomically;
    returns the stem path."""
    print(table)
    path = Path(out) / stem
    io.write_json(path.with_suffix(".json"), payload)
    text = table if table.endswith("\n") else table + "\n"
    io.atomic_write(path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(f"saved {path}.json and .md", file=sys.stderr)
    return path


def run_environment(device: str, **extra) -> dict:
    """What a result was measured on: device name, torch, python, threads, date, plus extra."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": dt.date.today().isoformat(), **extra}
