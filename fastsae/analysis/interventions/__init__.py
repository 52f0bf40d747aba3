"""Interventions: edit latents inside a model's forward, left-padded prompt batches, IOI and its patching
curves, concept erasure, circuits by ablation, and steering."""
