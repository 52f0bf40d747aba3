"""Comparing dictionaries: matching decoder directions between two dictionaries, feature splitting, and the
connections between SAE features across an MLP."""
