"""Harvesting: activations out of Hugging Face models into a resumable store, and a shuffling loader."""

from .corpus import held_out_windows, read_documents, token_windows, window_record
from .harvester import check_harvest, harvest, harvest_corpus, harvest_parallel, harvested_windows
from .loader import ShuffledLoader
from .store import ActivationStore, CorruptShardError, StoreWriter, is_store
from .stream import StreamingActivations

__all__ = ["ActivationStore", "CorruptShardError", "ShuffledLoader", "StoreWriter", "check_harvest", "harvest",
           "harvest_corpus", "harvest_parallel", "harvested_windows", "held_out_windows", "is_store", "read_documents",
           "StreamingActivations", "token_windows", "window_record"]
