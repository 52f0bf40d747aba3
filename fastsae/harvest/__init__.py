"""Harvesting: activations out of Hugging Face models into a resumable store, and a shuffling loader."""

from .corpus import read_documents, token_windows
from .harvester import harvest, harvest_corpus, special_token_ids
from .loader import ShuffledLoader
from .sites import KINDS, Site, available_sites, capture, resolve
from .store import ActivationStore, CorruptShardError, StoreWriter
from .stream import StreamingActivations

__all__ = ["KINDS", "ActivationStore", "CorruptShardError", "ShuffledLoader", "Site", "StoreWriter",
           "available_sites", "capture", "harvest", "harvest_corpus", "read_documents", "resolve",
           "special_token_ids", "StreamingActivations", "token_windows"]
