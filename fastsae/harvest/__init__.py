"""Harvesting: activations out of Hugging Face models into a resumable store, and a shuffling loader."""

from .harvester import harvest, special_token_ids
from .loader import ShuffledLoader
from .sites import KINDS, Site, available_sites, capture, resolve
from .store import ActivationStore, CorruptShardError, StoreWriter

__all__ = ["KINDS", "ActivationStore", "CorruptShardError", "ShuffledLoader", "Site", "StoreWriter",
           "available_sites", "capture", "harvest", "resolve", "special_token_ids"]
