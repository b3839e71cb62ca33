"""Experiment configs as a library: ``common.get_config`` builds every paper row and its variants.

The user-facing files in the repository's ``configs/`` folder are a few lines each on top of this.
"""
