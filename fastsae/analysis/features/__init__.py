"""Reading features: the feature pass and its cache on disk, per-latent top contexts, measured effects on the
model, context attribution, ranking, and the static HTML browser with its assets."""
