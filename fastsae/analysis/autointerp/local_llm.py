"""A `transformers` causal LM on this machine as an autointerp backend (`LocalBackend`): greedy decoding, exact
log-probabilities, and a key/value cache of the prompt prefixes that one feature's prompts share."""

from __future__ import annotations

import threading
from collections import OrderedDict

from .llm_backends import Backend, Generated, Reply, SlotReply, cut_at_stop, logsumexp
from .llm_prompts import Prompt

PREFIX_MIN = 32  # tokens: a shared prompt prefix shorter than this is not worth keeping the key/value cache of
PREFIX_SLOTS = 4  # prefixes kept (the global instructions, the current feature's explanation, ...)


class LocalBackend(Backend):
    """A `transformers` causal LM on this machine: `LocalBackend("gemma-3-270m")` (a `fastsae.model.load`
    name or a local directory), or `LocalBackend(model=..., tokenizer=...)`. Greedy decoding, one request at
    a time (a lock; the forward passes already use every core)."""

    def __init__(self, name: str = "gemma-3-270m", *, model=None, tokenizer=None, device: str = "cpu"):
        self.model_name, self.device = name, device
        self.name, self.model = f"local:{name}", name
        self._lm, self._tok = model, tokenizer
        self._lock = threading.Lock()
        self._prefixes: OrderedDict[tuple, object] = OrderedDict()  # prompt prefix ids -> key/value cache
        self._last_ids: list[int] = []

    def _load(self):
        if self._lm is None:
            from ...model import load

            self._lm, self._tok = load(self.model_name, device=self.device)
        return self._lm, self._tok

    def _encode(self, text: str, first: bool):
        ids = self._tok(text, add_special_tokens=first).input_ids
        return list(ids)

    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        import torch

        with self._lock, torch.inference_mode():
            lm, tok = self._load()
            ids = torch.tensor([self._encode(prompt.text(), True)], device=self.device)
            kwargs = {"stopping_criteria": [_StopOnText(tok, ids.shape[1], stop)]} if stop else {}
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              output_logits=bool(top_logprobs), return_dict_in_generate=True, pad_token_id=pad,
                              **kwargs)
            new = out.sequences[0, ids.shape[1]:].tolist()
            text = tok.decode(new, skip_special_tokens=True)
            tokens = None
            if top_logprobs:
                tokens = []
                for i, logits in enumerate(out.logits):  # logits: (1, vocab) at step i
                    lp = logits[0].float().log_softmax(-1)
                    values, idx = lp.topk(top_logprobs)
                    top: dict[str, float] = {}
                    for v, j in zip(values.tolist(), idx.tolist(), strict=True):
                        t = tok.decode([j])
                        top[t] = logsumexp([top[t], v]) if t in top else v
                    piece = tok.decode([new[i]])
                    # where the token ends in the decoded text, less its length: right for tokenizers that
                    # decode with separators between tokens as well as for those that do not
                    offset = max(0, len(tok.decode(new[:i + 1], skip_special_tokens=True)) - len(piece))
                    tokens.append(Generated(piece, offset, top))
            cut = cut_at_stop(text, stop)
            if tokens is not None:
                tokens = [g for g in tokens if g.offset < len(cut)]
            return Reply(cut, tokens, ids.shape[1], len(new))

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply:
        import torch

        if any(b < a for a, b in zip(slots, slots[1:], strict=False)) or (slots and not 0 < slots[0] <= slots[-1]
                                                                             <= len(text)):
            raise ValueError(f"slots must be increasing offsets in (0, {len(text)}], got {slots[:5]}…")
        with self._lock, torch.inference_mode():
            lm, tok = self._load()
            # Tokenise the text piece by piece at the slots so that every slot falls on a token boundary;
            # the model's prediction for a slot is the logits at the last token before it.
            ids, positions, prev = [], [], 0
            for s in slots:
                ids += self._encode(text[prev:s], prev == 0)
                positions.append(len(ids) - 1)
                prev = s
            ids += self._encode(text[prev:], prev == 0)
            single = {}
            for c in candidates:
                cid = self._encode(c, False)
                if len(cid) == 1:  # a candidate that is not one token ("10" where digits split) is left out
                    single[c] = cid[0]
            logits = self._logits_at(ids, positions)  # (slots, vocab)
            lp = logits.float().log_softmax(-1)[:, list(single.values())].tolist()  # (slots, candidates)
            return SlotReply([dict(zip(single, row, strict=True)) for row in lp], len(ids))

    def _logits_at(self, ids: list[int], positions: list[int]):
        """The model's logits at positions of ids, computed only there (Gemma's 262k vocabulary at every
        position would take GBs), reusing the key/value cache of a prefix shared with earlier prompts: the
        prompts of one feature share their instructions, worked example and explanation (about 3/4 of each
        simulation or judge prompt), so reusing them cuts the tokens run through the model by about 4x."""
        import copy

        import torch

        lm = self._lm
        prefix = self._prefix(ids, limit=positions[0])
        x = torch.tensor([ids], device=self.device)
        if prefix is None:
            return lm(input_ids=x, logits_to_keep=torch.tensor(positions, device=self.device), use_cache=False
                      ).logits[0]
        n, cache = prefix
        keep = torch.tensor([p - n for p in positions], device=self.device)
        return lm(input_ids=x[:, n:], past_key_values=copy.deepcopy(cache), use_cache=True,
                  logits_to_keep=keep).logits[0]

    def _prefix(self, ids: list[int], limit: int):
        """(n, key/value cache of ids[:n]) for the longest stored prefix of ids with n <= limit; failing that,
        the prefix ids shares with the previous prompt is run, stored and returned (when long enough)."""
        best = None
        for key in list(self._prefixes):
            n = len(key)
            if n <= limit and (best is None or n > best[0]) and tuple(ids[:n]) == key:
                best = (n, self._prefixes[key])
                self._prefixes.move_to_end(key)
        last, self._last_ids = self._last_ids, ids
        shared = 0
        for a, b in zip(last, ids, strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, limit)
        if shared < PREFIX_MIN or (best is not None and best[0] >= shared - PREFIX_MIN):
            return best
        import torch

        out = self._lm(input_ids=torch.tensor([ids[:shared]], device=self.device), use_cache=True, logits_to_keep=1)
        self._prefixes[tuple(ids[:shared])] = out.past_key_values
        while len(self._prefixes) > PREFIX_SLOTS:
            self._prefixes.popitem(last=False)
        return shared, out.past_key_values


class _StopOnText:
    """Stop generating once the decoded continuation holds a stop string (transformers' StopStringCriteria
    needs a tokenizer that round-trips single tokens, which not every tokenizer does)."""

    def __init__(self, tokenizer, prompt_length: int, stop: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
        done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

