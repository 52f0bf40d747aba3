"""Analysis: what researchers do with a trained dictionary, one tool per file. Nothing below this layer
imports it; submodules are imported by name (``from fastsae.analysis import features``)."""
