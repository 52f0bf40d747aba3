"""`kernels/` installs as `fastsae.kernels`, from an editable install and from a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_kernels():
    import fastsae.kernels

    assert Path(fastsae.kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_built_wheel_ships_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True)
    wheel = next((tmp_path / "dist").glob("fastsae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastsae/kernels/__init__.py" in names and "fastsae/sae.py" in names and "fastsae/pipeline/runs.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    out = subprocess.run([sys.executable, "-c", "import fastsae.kernels, fastsae; print(fastsae.kernels.__file__)"],
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().startswith(str(tmp_path / "site"))
