"""Data-driven initialisations: the memory-bounded gradient estimator that LoRA-GA and LoRA-SB share."""

from .gradient import estimate_gradients

__all__ = ["estimate_gradients"]
