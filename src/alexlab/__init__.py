"""alexlab: an ablation workbench for the design choices of Krizhevsky et al. (2012)."""

__all__ = ["build_model"]


def __getattr__(name):
    # Lazy, so that the report (which reads results.json files) does not import torch.
    if name == "build_model":
        from alexlab.model import build_model
        return build_model
    raise AttributeError(name)
