"""Models: the DiT baseline and DC-DiT."""
from dcdit.models.dit import DIT_CONFIGS, DiT, build_dit

__all__ = ["DiT", "DIT_CONFIGS", "build_dit"]
