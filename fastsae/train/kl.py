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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import kl_div
from ..model import hook_site, resolve


class SpliceKL:
    def __init__(self, model: nn.Module, site: str):
        self.site = resolve(model, site)
        self.model = model.eval()
        model.requires_grad_(False)  # the model is frozen; gradients flow only into the SAE

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
           attention_mask: Tensor | None = None) -> Tensor:
        """Mean over (unmasked) positions of KL(clean || spliced); differentiable in x_hat."""

        def splice(hidden):
            return x_hat.reshape(hidden.shape).to(hidden.dtype)

        with hook_site(self.model, self.site, splice):
            spliced = F.log_softmax(self._logits(input_ids, attention_mask), dim=-1)
        per_position = kl_div(clean_logprobs, spliced)  # (B, T)
        if attention_mask is None:
            return per_position.mean()
        mask = attention_mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1)
