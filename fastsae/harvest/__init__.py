"""Harvesting: activations out of Hugging Face models (hook sites; the store and loader come next)."""

from .sites import KINDS, Site, available_sites, capture, resolve

__all__ = ["KINDS", "Site", "available_sites", "capture", "resolve"]
