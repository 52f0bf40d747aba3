"""A hub id loads from the local Hugging Face cache, and a name not in it is refused at once, with no network."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]

NO_NETWORK = """
import socket, sys, time
def refuse(*args, **kwargs):
    raise AssertionError(f"network used: {args}")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from fastsae.model import load
start = time.perf_counter()
try:
    model, tok = load(sys.argv[1])
    print("loaded", type(model).__name__, model.config.hidden_size)
except FileNotFoundError as err:
    print("refused", f"{time.perf_counter() - start:.2f}", err)
"""


def _load(name, cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HUB_CACHE"] = str(cache)
    out = subprocess.run([sys.executable, "-c", NO_NETWORK, name], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_a_name_not_in_the_cache_is_refused_without_the_network(tmp_path):
    said = _load("no-such-owner/no-such-model", tmp_path / "hub")
    assert said.startswith("refused"), said
    assert "not in the local Hugging Face cache" in said and float(said.split()[1]) < 2.0


def test_a_hub_id_in_the_cache_loads_offline(tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-lm" / "snapshots" / "0123abcd"
    tiny_causal_lm(snapshot)
    (tmp_path / "hub" / "models--someone--tiny-lm" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-lm" / "refs" / "main").write_text("0123abcd")
    assert _load("someone/tiny-lm", tmp_path / "hub") == "loaded GPTNeoXForCausalLM 32"
