"""Interventions: edit latents inside a model's forward, left-padded prompt batches, IOI and its patching
curves, concept erasure, circuits by ablation, and steering.

The front (each name imported when first used):

    intervene(model, site, dictionary, ...)  edit latents in a forward: ablate, scale, set, clamp, steer, patch
    Intervention, as_dictionary              one edit; an SAE or a basis as the dictionary edits read
    PromptBatch, IOIPrompts                  left-padded prompts; the IOI task's prompt pairs
    patching_curve, circuit, steer           patching with m directions, circuits by ablation, steering
    run_patch, run_circuit, run_steer        `fastsae patch`, `fastsae circuit`, `fastsae steer`

Concept erasure is `erasure.erasure` (the module shares the function's name, so it stays out of the front).
"""

from .. import lazy_front

__all__ = ["IOIPrompts", "Intervention", "PromptBatch", "as_dictionary", "circuit", "intervene", "patching_curve",
           "run_circuit", "run_patch", "run_steer", "steer"]
__getattr__, __dir__ = lazy_front(__name__, {
    "intervene": "latent_edits", "Intervention": "latent_edits", "as_dictionary": "latent_edits",
    "PromptBatch": "padded_prompts", "IOIPrompts": "ioi", "patching_curve": "ioi_patching",
    "circuit": "circuit_ablation", "steer": "steering_sweep", "run_patch": "ioi_patching",
    "run_circuit": "circuit_ablation", "run_steer": "steering_sweep",
})
