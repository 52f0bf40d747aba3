"""`kernels/` installs as `fastsae.kernels`, from an editable install and from a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_kernels():
    import fastsae.kernels.encoder_topk

    assert [Path(p).resolve() for p in fastsae.kernels.__path__] == [ROOT / "kernels"]
    assert Path(fastsae.kernels.encoder_topk.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_built_wheel_ships_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True)
    wheel = next((tmp_path / "dist").glob("fastsae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"fastsae/kernels/encoder_topk.py", "fastsae/sae.py", "fastsae/pipeline/runs.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    code = "import fastsae.kernels.encoder_topk as k; print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().startswith(str(tmp_path / "site"))


def test_fastsae_runs_without_triton_on_cpu():
    """triton is not a hard dependency (the dev and gpu extras bring it; CUDA builds of torch bring their own):
    without it, import, training and save/load run on the torch backend, and asking for triton says why not."""
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
import fastsae
from fastsae import SAE, SAEConfig, get_backend, set_backend
from fastsae.ops import triton_available
from fastsae.train import TrainConfig, train
assert not triton_available() and get_backend(torch.device("cpu")) == "torch"
sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
train(sae, [torch.randn(16, 8) for _ in range(2)], TrainConfig.flat(progress=False))
try:
    set_backend("triton")
except ImportError as err:
    print("refused:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: backend 'triton' needs the triton package" in out.stdout
