"""Which backend runs the ops: set_backend / use_backend, $FASTSAE_BACKEND, else Triton on CUDA and PyTorch
elsewhere. Its own module so that both the package face and ops/custom_ops.py (which runs the backend in force
under torch.compile) can ask without importing each other."""

import contextlib
import importlib
import os
from types import ModuleType

import torch

_PACKAGE = __name__.rsplit(".", 1)[0]  # fastsae.ops
BACKENDS = ("reference", "torch", "triton")
_ENV = "FASTSAE_BACKEND"
_chosen: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Pick the backend for every SAE in this process; None goes back to the default."""
    global _chosen
    if name is not None:
        _check_name(name, "backend")
        backend_module(name)  # fail now, not at the first forward, if it cannot be imported
    _chosen = name


def get_backend(device: torch.device | None = None) -> str:
    """The backend in force: set_backend(), else $FASTSAE_BACKEND, else triton on CUDA and torch elsewhere."""
    if _chosen is not None:
        return _chosen
    env = os.environ.get(_ENV)
    if env:
        return _check_name(env, f"${_ENV}")
    if device is not None and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch backend: `with use_backend("reference"): ...`."""
    global _chosen
    previous = _chosen
    set_backend(name)
    try:
        yield
    finally:
        _chosen = previous


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_module(name: str) -> ModuleType:
    if name == "triton" and not triton_available():
        raise ImportError("backend 'triton' needs the triton package (Linux): pip install triton")
    return importlib.import_module(f"{_PACKAGE}.{name}_backend" if name != "reference" else f"{_PACKAGE}.reference")
