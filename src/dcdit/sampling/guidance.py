"""The network call of one sampling step: plain, guided, or Lite-CFG, with an optional tail-drop fraction.

A *model function* here is ``fn(x, t, y) -> tensor | (tensor, routing)`` as the
diffusion loops expect. DiT models return a tensor; DC-DiT models return
``(prediction, routing)`` and accept a tail-drop fraction.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from dcdit.models import is_dcdit
from dcdit.utils import unwrap

__all__ = ["model_info", "make_model_fn", "is_guided", "check_cfg_scale"]


def model_info(model: nn.Module) -> dict:
    """``in_channels``, ``input_hw`` (H, W), ``num_classes``, ``learn_sigma``, ``prediction`` of a dcdit model."""
    m = unwrap(model)
    cfg = dict(getattr(m, "config", {}) or {})
    info: dict = {}
    for key in ("in_channels", "input_size", "num_classes"):
        value = cfg.get(key, getattr(m, key, None))
        if value is None:
            raise ValueError(f"model {type(m).__name__} does not declare {key} (expected in model.config)")
        info[key] = value
    size = info.pop("input_size")
    info["input_hw"] = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    info["in_channels"], info["num_classes"] = int(info["in_channels"]), int(info["num_classes"])
    info["learn_sigma"] = bool(cfg.get("learn_sigma", getattr(m, "learn_sigma", True)))
    info["prediction"] = str(cfg.get("prediction", "epsilon"))  # configs written before it existed: epsilon
    return info


def check_cfg_scale(cfg_scale: Any, name: str = "cfg scale") -> float:
    """A classifier-free guidance scale: a finite number >= 0 (1: no guidance, 0: the unconditional model),
    else ValueError naming ``name`` and the value."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale) \
            or cfg_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1: no guidance), got {cfg_scale!r}")
    return float(cfg_scale)


def is_guided(cfg_scale: float) -> bool:
    """Whether a sampling run uses classifier-free guidance: a scale other than 1 (one [cond; uncond] batch per step)."""
    return cfg_scale != 1.0


def make_model_fn(
    model: nn.Module,
    cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = None,
    tail_drop: float = 0.0,
    uncond_drop: Optional[float] = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]:
    """Build ``fn(x, t, y)`` for one sampling configuration.

    Args:
        model: a DiT or DC-DiT.
        cfg_scale: classifier-free guidance scale; 1.0 means no guidance. With
            guidance, ``x`` and ``y`` carry a [cond; uncond] batch (y's second half
            is the null class) and the guided eps is returned in both halves.
        guidance_channels: guide only the first k eps channels (3 reproduces DiT);
            None guides all of them.
        tail_drop: DC-DiT tail-drop fraction (of the conditional half with guidance).
        uncond_drop: Lite-CFG: fraction for the unconditional half (None: same as ``tail_drop``).

    The fractions are not checked here: user input is checked where it enters
    (:func:`dcdit.sampling.budget.parse_tail_drop`), and ``DCDiT.forward`` checks what reaches the model.
    """
    check_cfg_scale(cfg_scale)
    if guidance_channels is not None:
        c = model_info(model)["in_channels"]
        if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int) or not 1 <= guidance_channels <= c:
            raise ValueError(f"guidance channels must lie in 1..{c} (the model's eps channels), got {guidance_channels!r}")
    routed = is_dcdit(model)
    if not routed and (tail_drop or uncond_drop):
        raise ValueError(f"tail dropping needs a DC-DiT model; {type(unwrap(model)).__name__} has a fixed token count")
    guided = is_guided(cfg_scale)
    if uncond_drop is not None and not guided:
        raise ValueError("an unconditional tail-drop fraction (Lite-CFG) needs guidance: set a cfg scale != 1")

    if not guided:
        if routed:
            return lambda x, t, y: model(x, t, y, tail_drop=tail_drop)
        return lambda x, t, y: model(x, t, y)
    if routed:
        return lambda x, t, y: model.forward_with_cfg(
            x, t, y, cfg_scale, guidance_channels=guidance_channels, cond_tail_drop=tail_drop,
            uncond_tail_drop=uncond_drop,
        )
    return lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels=guidance_channels)
