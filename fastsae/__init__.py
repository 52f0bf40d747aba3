"""fastsae: sparse autoencoders on language-model activations, with fused Triton kernels."""

from . import _hugepages  # noqa: F401  (first: before anything imports torch)
from .config import SAEConfig
from .ensemble import SAEEnsemble
from .latents import SparseLatents
from .model.splice import splice
from .ops import get_backend, set_backend, use_backend
from .sae import SAE, SAEOutput

__all__ = ["SAE", "SAEConfig", "SAEEnsemble", "SAEOutput", "SparseLatents", "get_backend", "set_backend", "splice",
           "use_backend"]
__version__ = "0.1.0"
