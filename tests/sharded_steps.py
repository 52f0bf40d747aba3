"""One training step on two gloo ranks against one process, as the latent-sharding tests check it: the step (forward
with AuxK where the activation has it, backward, one optimizer step), what a rank records of it, and the checks of
those records against the single-process step."""

from __future__ import annotations

import torch

from fastsae.train import SAEAdam
from fastsae.train.sharded import gather_rows

from helpers import assert_close

TERMS = ("loss", "mse", "l1", "l0", "auxk", "prefix_mse")


def one_step(model, x, dead, k_aux: int, *, y=None, adam: bool | None = None):
    """Forward, backward and one optimizer step: torch.optim.Adam for float64 inputs (or adam=True), else SAEAdam,
    the trainer's. Returns (the output, every parameter's gradient)."""
    auxk = model.cfg.activation in ("topk", "batchtopk")
    out = model(x, **({} if y is None else {"target": y}), dead_mask=dead if auxk else None, k_aux=k_aux)
    (out.loss + (out.auxk if out.auxk is not None else 0)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    use_adam = x.dtype == torch.float64 if adam is None else adam
    (torch.optim.Adam(model.parameters(), lr=1e-2) if use_adam else SAEAdam(model, lr=1e-2)).step()
    return out, grads


def step_terms(out) -> dict:
    return {t: getattr(out, t) for t in TERMS if getattr(out, t) is not None}


def record_sharded_step(results: dict, name: str, model, out, grads) -> None:
    """What a rank keeps of its sharded step: every gradient and parameter with the shards' rows gathered, the loss
    terms, x_hat and the dense latents (each rank's output is the whole batch's)."""
    s = model.shard
    for n, g in grads.items():
        results[f"{name}.grad.{n}"] = gather_rows(g, s) if n in model.row_tensors else g
    for n, t in model.state_dict().items():  # gather_sae builds an SAE of cfg.dtype: not for float64 copies
        results[f"{name}.after.{n}"] = gather_rows(t.detach(), s) if n in model.row_tensors else t.detach()
    for t, v in step_terms(out).items():
        results[f"{name}.{t}"] = v.detach()
    results[f"{name}.x_hat"] = out.x_hat.detach()
    results[f"{name}.dense"] = out.latents.detach().to_dense()


def assert_step_matches(got: dict, name: str, sae, out, grads, tol) -> None:
    """The records of the sharded step against the single-process one: the same terms, x_hat and latents, every
    gradient (each non-zero, so that the check can fail) and every parameter after the optimizer step."""
    terms = step_terms(out)
    assert set(terms) == {t for t in TERMS if f"{name}.{t}" in got}
    for t, v in terms.items():
        assert_close(got[f"{name}.{t}"], v.detach(), tol, msg=t)
    assert_close(got[f"{name}.x_hat"], out.x_hat.detach(), tol)
    assert_close(got[f"{name}.dense"], out.latents.detach().to_dense(), tol)
    assert_grads_and_step_match(got, name, sae, grads, tol)


def assert_grads_and_step_match(got: dict, name: str, sae, grads, tol) -> None:
    """Every gradient (each non-zero, so that the check can fail) and every parameter after the optimizer step."""
    assert set(grads) == {n.split(".grad.")[1] for n in got if n.startswith(f"{name}.grad.")}
    for n, g in grads.items():
        assert g.abs().max() > 0, f"{n}: the test needs a non-zero gradient"
        assert_close(got[f"{name}.grad.{n}"], g, tol, msg=f"grad of {n}")
    for n, t in sae.state_dict().items():
        assert_close(got[f"{name}.after.{n}"], t, tol, msg=f"{n} after the optimizer step")
