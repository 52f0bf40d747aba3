"""fastsae: sparse autoencoders on language-model activations, with fused Triton kernels."""

# first: _hugepages before anything imports torch; _kernel_package before .ops imports fastsae.kernels
from . import _hugepages, _kernel_package  # noqa: F401
from .config import SAEConfig
from .ensemble import SAEEnsemble
from .latents import SparseLatents
from .ops import get_backend, set_backend, use_backend
from .sae import SAE, SAEOutput

__all__ = ["SAE", "SAEConfig", "SAEEnsemble", "SAEOutput", "SparseLatents", "get_backend", "set_backend", "splice",
           "use_backend"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # splice lives in the model layer, below this one (DESIGN.md): imported on first use, so that
    # `import fastsae` does not load the model layer and the layers' imports stay one-way.
    if name == "splice":
        from .model.splice import splice

        return splice
    raise AttributeError(f"module 'fastsae' has no attribute {name!r}")
