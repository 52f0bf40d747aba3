"""Comparison helpers shared by the backend and kernel tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fastsae import SAE, use_backend

TESTS = Path(__file__).resolve().parent  # the tests' root, whatever folder a test sits in
ROOT = TESTS.parent
KILL_AT = str(TESTS / "kill_at.py")

# (atol, rtol) per dtype: what PyTorch itself reaches against float64 on these sizes.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def run(sae: SAE, x: torch.Tensor, backend: str):
    """Forward + backward of the whole loss; returns output and the gradients of x and every parameter."""
    sae.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = sae(x)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.detach().clone()
    return out, grads


def float64_copy(sae: SAE) -> SAE:
    ref = copy.deepcopy(sae).double()
    return ref


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg or None)


def dense_pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """float64 relu(W_enc (x - b_dec) + b_enc) of shape (N, d_sae)."""
    x = x.reshape(-1, sae.cfg.d_in).double()
    if sae.cfg.apply_b_dec_to_input:
        x = x - sae.b_dec.double()
    return x @ sae.W_enc.double().T + sae.b_enc.double()


def assert_valid_topk(sae: SAE, x, values, indices, k, dtype, scale=1.0):
    """values/indices are a correct top-k of relu(pre) up to dtype rounding (ties may pick either latent)."""
    atol, rtol = TOL[dtype]
    pre = dense_pre_activations(sae, x).relu()  # (N, d_sae)
    values, indices = values.reshape(-1, k).double(), indices.reshape(-1, k)
    assert indices.unique(dim=None).numel() > 0
    for row in range(pre.shape[0]):
        assert indices[row].unique().numel() == k, f"row {row}: repeated latent in {indices[row]}"
    picked = pre.gather(1, indices)
    torch.testing.assert_close(values, picked, atol=atol * scale, rtol=rtol)
    rest = pre.scatter(1, indices, float("-inf"))
    slack = atol * scale + rtol * picked.abs().max()
    assert (picked.min(1).values >= rest.max(1).values - slack).all(), "a better latent was left out"


def tiny_causal_lm(path):
    """`fastsae.model.random_causal_lm()` (2 layers, d 32) saved under path, where
    `fastsae.model.load(path)` and the CLI find it. Returns (model, tokenizer)."""
    from fastsae.model import random_causal_lm

    model, tokenizer = random_causal_lm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def word_level_lm(words, hidden_size=32, num_layers=3, seed=0):
    """A random GPT-NeoX over a word-level tokenizer of words (pad 0, BOS 1, EOS 2, unk 3, then the words;
    whitespace and punctuation split words): every word is one token, as names are for Gemma."""
    import transformers as T
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                          pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = T.GPTNeoXConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=4, intermediate_size=2 * hidden_size, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, max_position_embeddings=128)
    return T.GPTNeoXForCausalLM(cfg).eval(), tokenizer


def cli_error(capsys, argv: list[str]) -> str:
    """`fastsae.cli.main(argv)` refused with exit status 2 and one line on stderr, no traceback: that line."""
    from fastsae.cli import main

    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def tiny_pythia(hidden_size=32, num_layers=2, intermediate_size=48):
    """A random GPT-NeoX (vocab 64; pad 0, BOS 1, EOS 2) seeded at 0, for the tests that harvest or evaluate."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                          intermediate_size=intermediate_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.GPTNeoXForCausalLM(cfg).eval()


def tiny_harvest(out, sites, **model_kw):
    """An ActivationStore of tiny_pythia(**model_kw)'s activations at sites: 12 windows of 8 tokens (BOS first),
    shards of 20 rows."""
    from fastsae.harvest import ActivationStore, harvest

    model = tiny_pythia(**model_kw)
    ids = torch.randint(3, 64, (12, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    harvest(model, sites, ids, out, batch_size=3, dtype=torch.float32, shard_rows=20, progress=False)
    return ActivationStore(out)
