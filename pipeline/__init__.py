"""SLIM active-labeling pipeline: find and remove spurious correlations with a few human labels."""

__version__ = "0.1.0"
