"""Record what a sampling run routed, step by step (a ``callback`` for :func:`dcdit.sampling.sample`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["RoutingRecord", "RoutingRecorder"]


@dataclass
class RoutingRecord:
    """Per-step arrays of one batch (conditional half), all on the CPU.

    ``x_t`` / ``pred_xstart``: (steps, n, C, H, W) model-space tensors;
    ``boundary_prob`` / ``keep_mask``: (steps, n, h, w) first-stage maps on
    the token grid (None for models without routing); ``flops``: (steps,)
    FLOPs per image or None.
    """

    timesteps: list[int] = field(default_factory=list)
    x_t: list[torch.Tensor] = field(default_factory=list)
    pred_xstart: list[torch.Tensor] = field(default_factory=list)
    boundary_prob: list[np.ndarray] = field(default_factory=list)
    keep_mask: list[np.ndarray] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    @property
    def has_routing(self) -> bool:
        return bool(self.boundary_prob)

    def stacked(self) -> dict:
        """The record as stacked arrays (see class docstring)."""
        return {
            "timesteps": np.asarray(self.timesteps),
            "x_t": torch.stack(self.x_t) if self.x_t else None,
            "pred_xstart": torch.stack(self.pred_xstart) if self.pred_xstart else None,
            "boundary_prob": np.stack(self.boundary_prob) if self.boundary_prob else None,
            "keep_mask": np.stack(self.keep_mask) if self.keep_mask else None,
            "flops": np.asarray(self.flops) if self.flops else None,
        }

    @staticmethod
    def concat(records: list["RoutingRecord"]) -> dict:
        """Stack several single-batch records of the same schedule along the sample axis."""
        parts = [r.stacked() for r in records]
        out = {"timesteps": parts[0]["timesteps"]}
        for key in ("x_t", "pred_xstart"):
            out[key] = None if parts[0][key] is None else torch.cat([p[key] for p in parts], dim=1)
        for key in ("boundary_prob", "keep_mask"):
            out[key] = None if parts[0][key] is None else np.concatenate([p[key] for p in parts], axis=1)
        out["flops"] = None if parts[0]["flops"] is None else np.stack([p["flops"] for p in parts], axis=1)
        return out


class RoutingRecorder:
    """Callback collecting x_t, the x_0 prediction, first-stage routing maps and FLOPs at every step.

    Args:
        keep_images: also keep x_t and the prediction (memory: steps x n images).
    """

    def __init__(self, keep_images: bool = True) -> None:
        self.record = RoutingRecord()
        self.keep_images = keep_images

    def __call__(self, info: dict) -> None:
        rec = self.record
        n = info["pred_xstart"].shape[0]
        rec.timesteps.append(int(info["t"][0]))
        if self.keep_images:
            rec.x_t.append(info["x_t"][:n].detach().float().cpu())
            rec.pred_xstart.append(info["pred_xstart"].detach().float().cpu())
        routing = info.get("extras")
        if routing:
            stage = routing[0]
            grid = stage.grid
            prob = stage.boundary_prob[:n].detach().float().cpu().numpy()
            keep = stage.keep_mask[:n].detach().cpu().numpy().astype(bool)
            if grid is not None:
                prob, keep = prob.reshape(n, *grid), keep.reshape(n, *grid)
            rec.boundary_prob.append(prob)
            rec.keep_mask.append(keep)
        report = info.get("flops")
        if report is not None:
            rec.flops.append(report.total / report.batch_size)
