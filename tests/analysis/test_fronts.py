"""Each analysis subpackage's front: every name in its __all__ resolves (names are imported lazily, so a moved
name would otherwise fail only when first used), and importing the fronts stays light."""

import importlib
import subprocess
import sys

import pytest

FRONTS = ["fastsae.analysis.features", "fastsae.analysis.interventions", "fastsae.analysis.compare",
          "fastsae.analysis.autointerp"]


@pytest.mark.parametrize("name", FRONTS)
def test_every_name_of_a_front_resolves(name):
    front = importlib.import_module(name)
    assert front.__all__, name
    missing = [n for n in front.__all__ if getattr(front, n, None) is None]
    assert missing == []
    verb = name.rsplit(".", 1)[1]
    assert any(n.startswith("run_") for n in front.__all__), f"{name} exposes no run_<verb> ({verb})"


def test_the_fronts_import_without_transformers():
    code = ("import sys; import " + ", ".join(FRONTS) + "; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
