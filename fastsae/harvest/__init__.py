"""Harvesting: activations out of Hugging Face models into a resumable store, and a shuffling loader."""

from .corpus import read_documents, token_windows
from .harvester import harvest, harvest_corpus
from .loader import ShuffledLoader
from .store import ActivationStore, CorruptShardError, StoreWriter
from .stream import StreamingActivations

__all__ = ["ActivationStore", "CorruptShardError", "ShuffledLoader", "StoreWriter", "harvest", "harvest_corpus",
           "read_documents", "StreamingActivations", "token_windows"]
