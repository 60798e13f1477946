"""Build any dcdit model from a plain config dict, and back.

A model config is ``{"arch": "dit" | "dcdit", **constructor_config}``; it is
what checkpoints store as JSON next to the weights.
"""
from __future__ import annotations

import inspect

import torch.nn as nn

from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT
from dcdit.utils import unwrap


def build_model(cfg: dict) -> nn.Module:
    """Model from ``{"arch": ..., **config}``; unknown keys raise ValueError naming them."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch == "dit":
        allowed = set(inspect.signature(DiT.__init__).parameters) - {"self"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown DiT config key(s): {', '.join(unknown)}")
        return DiT(**cfg)
    if arch == "dcdit":
        return DCDiT.from_config(cfg)
    raise ValueError(f"unknown model arch {arch!r}: expected 'dit' or 'dcdit'")


def is_dcdit(model: nn.Module) -> bool:
    """True for a DC-DiT (forward takes ``tail_drop`` and returns ``(prediction, routing)``), also when wrapped."""
    return isinstance(unwrap(model), DCDiT)


def model_config(model: nn.Module) -> dict:
    """The JSON-serialisable config that rebuilds ``model`` with :func:`build_model`."""
    model = unwrap(model)

    arch = "dit" if isinstance(model, DiT) else "dcdit"
    return {"arch": arch, **dict(model.config)}
