"""Models: the DiT baseline and DC-DiT."""
from dcdit.models.dit import DIT_CONFIGS, DiT, build_dit
from dcdit.models.factory import build_model, model_config

__all__ = ["DiT", "DIT_CONFIGS", "build_dit", "build_model", "model_config"]
