"""One training step's objective: the diffusion loss, plus the ratio loss on a DC-DiT's routing.

    loss, stats = train_step(model, diffusion, x, y, t, noise, tail_drop=0.2,
                             ratio_weight=0.03, ratio_N=4.0, ratio_group=16)
    loss.backward()

The step runs the forward and the losses only; backward, gradient clipping,
the optimizer and EMA belong to the caller (the trainer, the benchmarks,
tests). DiT and DC-DiT are told apart once, by :func:`dcdit.models.is_dcdit`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from dcdit.chunking.ratio import TargetN, ratio_loss
from dcdit.models import is_dcdit


def train_step(
    model: nn.Module,
    diffusion,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    tail_drop: Union[float, torch.Tensor] = 0.0,
    ratio_weight: float = 0.0,
    ratio_N: Optional[TargetN] = None,
    ratio_group: Optional[int] = None,
    bf16: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one (micro-)batch and detached statistics for logging.

    Args:
        model: DiT or DC-DiT (possibly DDP- or compile-wrapped), in train mode.
        diffusion: the training diffusion (``training_losses``).
        x (B, C, H, W) clean data; y (B,) labels (label dropout already applied);
        t (B,) timesteps; noise (B, C, H, W).
        tail_drop: DC-DiT tail-drop fraction (multi-budget training), one or one per sample.
        ratio_weight, ratio_N, ratio_group: the ratio loss (DC-DiT only): its weight
            (0: off), target N (one, or one per stage) and samples per group (None: the batch).
        bf16: run the forward under bf16 autocast (the losses are computed in fp32).

    Returns:
        ``(loss, stats)``: the scalar loss to backpropagate; ``stats`` holds
        ``loss``, ``loss_diffusion``, ``mse``, ``vb`` (learned sigma), and for
        DC-DiT ``keep_natural_{i}`` / ``keep_effective_{i}`` (kept share per stage
        before / after tail dropping) and ``loss_ratio`` (when weighted).
    """
    routed = is_dcdit(model)
    kwargs = {"y": y, **({"tail_drop": tail_drop} if routed else {})}

    def forward(x_t, t, **kw):
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x_t, t, **kw)
        return (out[0].float(), out[1]) if routed else out.float()

    terms = diffusion.training_losses(forward, x, t, kwargs, noise=noise)
    loss = terms["loss"].mean()
    stats = {"loss_diffusion": loss.detach(), "mse": terms["mse"].mean().detach()}
    if "vb" in terms:
        stats["vb"] = terms["vb"].mean().detach()
    routing = terms["extras"] if routed else None
    for i, stage in enumerate(routing or []):
        stats[f"keep_natural_{i}"] = stage.kept_share(natural=True).mean().detach()
        stats[f"keep_effective_{i}"] = stage.kept_share().mean().detach()
    if routing and ratio_weight > 0:
        if ratio_N is None:
            raise ValueError("the ratio loss needs its target N (ratio_N)")
        r_loss = ratio_loss(routing, ratio_N, group_size=ratio_group)
        loss = loss + ratio_weight * r_loss
        stats["loss_ratio"] = r_loss.detach()
    stats["loss"] = loss.detach()
    return loss, stats
