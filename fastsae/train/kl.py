"""Training on KL + reconstruction: the model's next-token distribution with the SAE spliced in.

Adding KL(clean || spliced) to the loss trains the dictionary on what the model
uses downstream, not only on what is large in the activation; the seed paper's
authors found it lowers the spliced perplexity (see also Braun et al. 2024,
end-to-end SAEs). `SpliceKL` runs the model once to get the clean logits and the
activations at the site, and again with the site's output replaced by x_hat.

The site is a named site ("resid_post.2", "mlp_out.0", "resid_pre.1", ...; see
fastsae.model.sites) or a module path, whose output is spliced. Outputs may be
tensors or tuples whose first element is the hidden state, as Hugging Face
blocks return.

`inputs(input_ids)` is what the trainer uses: the SAE trains on the activations of the positions
evaluation scores, and only those are spliced and counted in the KL. Positions holding an excluded
token (BOS, pad, ...: `exclude_token_ids`, a store's `excluded_token_ids`) keep their clean activation,
as `fastsae.evaluation` keeps them clean, and their KL is left out of the mean. `scale` multiplies the
activations the SAE sees (a store's normalising scale, so a KL run trains at the scale an MSE run on the
same store does); x_hat is divided by it before it is spliced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import kl_div
from ..model import hook_site, keep_mask, resolve


class SpliceKL:
    def __init__(self, model: nn.Module, site: str, exclude_token_ids: list[int] | None = None, scale: float = 1.0):
        self.site = resolve(model, site)
        self.model = model.eval()
        model.requires_grad_(False)  # the model is frozen; gradients flow only into the SAE
        self.exclude_token_ids = list(exclude_token_ids or [])
        if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"SpliceKL: scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def inputs(self, input_ids: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(the kept positions' activations times scale (n, d), the KL as a function of their x_hat (n, d)):
        the trainer's input and KL term for a batch of token ids (B, T)."""
        keep = keep_mask(input_ids, self.exclude_token_ids)  # (B, T)
        if not bool(keep.any()):
            raise ValueError(f"SpliceKL: every position of the batch {tuple(input_ids.shape)} holds an excluded token "
                             f"({self.exclude_token_ids}): nothing to train on")
        acts, clean_logprobs = self.clean(input_ids)
        keep = keep.to(acts.device)

        def kl(x_hat: Tensor) -> Tensor:
            return self.kl(input_ids, x_hat / self.scale, clean_logprobs, keep=keep)

        return acts[keep] * self.scale, kl

    def _logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @torch.no_grad()
    def clean(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(activations at the site (B, T, d), clean next-token log-probabilities (B, T, vocab))."""
        seen = {}

        def grab(hidden):
            seen["acts"] = hidden.detach()

        with hook_site(self.model, self.site, grab):
            logits = self._logits(input_ids, attention_mask)
        return seen["acts"], F.log_softmax(logits, dim=-1)

    def kl(self, input_ids: Tensor, x_hat: Tensor, clean_logprobs: Tensor,
           attention_mask: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Mean over (unmasked) positions of KL(clean || spliced); differentiable in x_hat. x_hat: the site's
        (B, T, d), or with keep (B, T) bool the rows of the kept positions only (n, d): the others stay
        clean and are left out of the mean."""

        def splice(hidden):
            if keep is None:
                return x_hat.reshape(hidden.shape).to(hidden.dtype)
            return hidden.index_put((keep,), x_hat.to(hidden.dtype))  # (B, T, d), x_hat where keep

        with hook_site(self.model, self.site, splice):
            spliced = F.log_softmax(self._logits(input_ids, attention_mask), dim=-1)
        per_position = kl_div(clean_logprobs, spliced)  # (B, T)
        if attention_mask is None and keep is None:
            return per_position.mean()
        mask = torch.ones_like(per_position) if attention_mask is None else attention_mask.to(per_position.dtype)
        if keep is not None:
            mask = mask * keep.to(mask.device, mask.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1)
