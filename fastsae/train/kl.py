"""Training on KL + reconstruction: the model's next-token distribution with the SAE spliced in.

Adding KL(clean || spliced) to the loss trains the dictionary on what the model
uses downstream, not only on what is large in the activation; the seed paper's
authors found it lowers the spliced perplexity (see also Braun et al. 2024,
end-to-end SAEs). `SpliceKL` runs the model once to get the clean logits and the
activations at the site, and again with the site's output replaced by x_hat.

The site is a module path (e.g. "gpt_neox.layers.2" for Pythia's third block
output). Its output may be a tensor or a tuple whose first element is the
hidden state, as Hugging Face blocks return.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SpliceKL:
    def __init__(self, model: nn.Module, site: str):
        try:
            self.module = model.get_submodule(site)
        except AttributeError as err:
            raise ValueError(f"site {site!r} is not a module path of {type(model).__name__}") from err
        self.model = model.eval()
        model.requires_grad_(False)  # the model is frozen; gradients flow only into the SAE

    @contextmanager
    def _hook(self, fn):
        handle = self.module.register_forward_hook(fn)
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    def _hidden(output) -> Tensor:
        return output[0] if isinstance(output, tuple) else output

    def _logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @torch.no_grad()
    def clean(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(activations at the site (B, T, d), clean next-token log-probabilities (B, T, vocab))."""
        seen = {}

        def grab(_module, _inputs, output):
            seen["acts"] = self._hidden(output).detach()

        with self._hook(grab):
            logits = self._logits(input_ids, attention_mask)
        return seen["acts"], F.log_softmax(logits, dim=-1)

    def kl(self, input_ids: Tensor, x_hat: Tensor, clean_logprobs: Tensor,
           attention_mask: Tensor | None = None) -> Tensor:
        """Mean over (unmasked) positions of KL(clean || spliced); differentiable in x_hat."""

        def splice(_module, _inputs, output):
            hidden = self._hidden(output)
            new = x_hat.reshape(hidden.shape).to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        with self._hook(splice):
            spliced = F.log_softmax(self._logits(input_ids, attention_mask), dim=-1)
        per_position = (clean_logprobs.exp() * (clean_logprobs - spliced)).sum(-1)  # (B, T)
        if attention_mask is None:
            return per_position.mean()
        mask = attention_mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1)
