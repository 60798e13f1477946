"""Models: the DiT baseline and DC-DiT."""
from dcdit.models.config import DCDIT_PRESETS, MODEL_SIZES, DCDiTConfig
from dcdit.models.dcdit import DCDiT, build_dcdit
from dcdit.models.dit import DIT_CONFIGS, DiT, build_dit
from dcdit.models.factory import build_model, is_dcdit, model_config

__all__ = ["DiT", "DIT_CONFIGS", "build_dit", "DCDiT", "DCDiTConfig", "DCDIT_PRESETS", "MODEL_SIZES", "build_dcdit", "build_model", "model_config", "is_dcdit"]
