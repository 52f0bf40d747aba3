"""The language-model side: loading models, named sites, the one site hook, capture, splice, and the
special-token keep-mask. Everything that touches a `transformers` model goes through here."""

from .hooks import capture, hook_site, hook_sites
from .loading import cache_dir, load, random_causal_lm, with_cpu_gemm
from .sites import KINDS, Site, available_sites, n_layers, resolve
from .splice import CrosscoderSplice, Splice, TranscoderSplice, splice, splice_crosscoder, splice_transcoder
from .tokens import keep_mask, special_token_ids
from .upper import Lower, lm_head_logits, run_from_site, run_to_site, supports_site_runs

__all__ = ["CrosscoderSplice", "KINDS", "Lower", "Site", "Splice", "TranscoderSplice", "available_sites", "cache_dir",
           "capture", "hook_site", "hook_sites", "keep_mask", "lm_head_logits", "load", "n_layers", "random_causal_lm",
           "resolve", "run_from_site", "run_to_site", "special_token_ids", "splice", "splice_crosscoder",
           "splice_transcoder", "supports_site_runs", "with_cpu_gemm"]
