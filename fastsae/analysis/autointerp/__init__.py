"""Automatic interpretation: explain, simulate and score features with a language model."""
