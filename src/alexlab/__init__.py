"""alexlab: an ablation workbench for the design choices of Krizhevsky et al. (2012)."""
from alexlab.model import build_model

__all__ = ["build_model"]
