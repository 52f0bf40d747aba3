"""Automatic interpretation: explain, simulate and score features with a language model.

One file per part:

    scoring.py    the numbers: simulation correlation, accuracy / balanced accuracy / AUROC (no model here)
    prompts.py    how contexts are shown and the prompts of the explainer, the simulator and the judges
    backends.py   the language models behind one interface: local transformers, OpenAI-compatible HTTP
    cache.py      every request on disk (resume, free reruns)
    explain.py    the explainer (Bills et al. 2023)
    simulate.py   the simulator and its three ways of reading predictions
    judge.py      detection and fuzzing (Paulo et al. 2024)
    interpret.py  one feature through all of it; many in parallel
    sources.py    features from an examples file or the feature cache (SAE and baselines)
    report.py     summary table, plot, browser annotations
    run.py        `fastsae autointerp` as a function
"""
