"""Cost of sampling: FLOPs counted step by step over a real run, wall-clock timing, router calibration.

FLOPs are 2 per multiply-accumulate with attention included (the
:mod:`dcdit.flops` default); DC-DiT's cost changes with the timestep, so
every step's real forward is counted.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from dcdit.models import DCDIT_PRESETS, DIT_CONFIGS, build_dcdit, build_dit
from dcdit.sampling.guidance import model_info
from dcdit.sampling.sampler import SampleStats, sample
from dcdit.utils import round_robin_seconds, unwrap

__all__ = ["RunCost", "measure_run_cost", "Timing", "time_sampling", "time_interleaved", "calibrate_router_bias", "router_bias",
           "set_router_bias", "build_named_model"]


@dataclass
class RunCost:
    """FLOPs of one sampling run, per image: per step, over the run, per component."""

    tail_drop: float
    steps: int
    timesteps: list[int]
    gflops_per_step: float  # mean over steps
    gflops_per_image: float  # sum over steps
    gflops_by_t: list[float]  # per step, in sampling order
    kept_share: Optional[float]  # mean first-stage kept share (None for DiT)
    kept_share_by_t: Optional[list[float]]
    components_per_step: dict[str, float] = field(default_factory=dict)  # GFLOPs per image per step (mean)
    components_per_image: dict[str, float] = field(default_factory=dict)  # GFLOPs per image over the run

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stats(cls, stats: SampleStats) -> "RunCost":
        if stats.flops_per_step is None:
            raise ValueError("these statistics carry no FLOP counts (sample with measure_flops=True)")
        S = stats.num_steps
        per_t = stats.flops_per_step.mean(1) / 1e9
        kept = stats.kept_share
        return cls(
            tail_drop=stats.tail_drop, steps=S, timesteps=list(stats.timesteps),
            gflops_per_step=float(per_t.mean()), gflops_per_image=float(per_t.sum()),
            gflops_by_t=[float(v) for v in per_t],
            kept_share=None if kept is None else float(kept[:, 0].mean()),
            kept_share_by_t=None if kept is None else [float(v) for v in kept[:, 0].mean(1)],
            components_per_step={k: v / 1e9 / S for k, v in stats.flops_by_component.items()},
            components_per_image={k: v / 1e9 for k, v in stats.flops_by_component.items()},
        )


def measure_run_cost(model: nn.Module, diffusion, labels: Sequence[int], **sample_kwargs) -> RunCost:
    """Sample ``labels`` once with every step's FLOPs counted; returns the per-image cost."""
    _, stats = sample(model, diffusion, labels, measure_flops=True, **sample_kwargs)
    return RunCost.from_stats(stats)


@dataclass
class Timing:
    """Wall-clock of a sampling run of ``batch`` images: median over ``repeats`` after ``warmup`` runs."""

    batch: int
    steps: int
    repeats: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.seconds))

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median

    @property
    def ms_per_step(self) -> float:
        """Latency of one sampling step of the whole batch, in milliseconds."""
        return 1000 * self.median / self.steps

    def to_dict(self) -> dict:
        return {"batch": self.batch, "steps": self.steps, "repeats": self.repeats, "seconds": self.seconds,
                "median_seconds": self.median, "images_per_second": self.images_per_second,
                "ms_per_step": self.ms_per_step}


def time_sampling(model: nn.Module, diffusion, labels: Sequence[int], repeats: int = 3, warmup: int = 1,
                  **sample_kwargs) -> Timing:
    """Time full sampling runs (no FLOP counting): ``warmup`` untimed runs, then ``repeats`` timed ones."""
    return time_interleaved([(model, diffusion, labels, sample_kwargs)], repeats, warmup)[0]


def time_interleaved(runs: Sequence[tuple], repeats: int = 3, warmup: int = 1) -> list[Timing]:
    """Time several sampling setups fairly on a shared machine: warm all up, then round-robin the repeats.

    ``runs``: ``(model, diffusion, labels, sample_kwargs)`` tuples. Interleaving
    spreads slow drifts in machine load over every setup instead of the last one.
    """
    calls, syncs = {}, {}
    for i, (model, diffusion, labels, kw) in enumerate(runs):
        sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

        def call(m=model, d=diffusion, y=labels, k=kw, sync=sync):
            sample(m, d, y, measure_flops=False, **k)
            sync()  # the timing ends when the device is done

        calls[str(i)], syncs[str(i)] = call, sync
    with torch.inference_mode():
        times = round_robin_seconds(calls, repeats, warmup, before=lambda i: syncs[i]())
    return [Timing(len(labels), diffusion.num_timesteps, repeats, times[str(i)])
            for i, (_, diffusion, labels, _) in enumerate(runs)]


def router_bias(model: nn.Module) -> torch.Tensor:
    """The output bias of a learned DC-DiT router's last conv (the first stage's): it shifts every token's
    boundary logit alike, so it sets how many tokens an untrained router keeps."""
    m = unwrap(model)
    router = getattr(m, "routing_module", None)
    last = getattr(getattr(router, "residual_scorer", None), "__getitem__", None)
    if last is None:
        raise ValueError(f"{type(m).__name__} has no router to calibrate (expected routing_module.residual_scorer)")
    if getattr(router, "mode", "learned") != "learned":
        raise ValueError(f"the {router.mode} router keeps a fixed share (1/{router.N:g}): nothing to calibrate")
    return router.residual_scorer[-1].bias


@torch.no_grad()
def set_router_bias(model: nn.Module, value: float) -> None:
    """Set :func:`router_bias` to ``value`` (benchmarks of random-init models: e.g. 10 makes every token
    a natural boundary, so tail dropping alone sets the kept share)."""
    router_bias(model).fill_(value)


@torch.no_grad()
def calibrate_router_bias(model: nn.Module, target_share: float, batch: int = 4, seed: int = 0,
                          timesteps: Sequence[int] = (999, 750, 500, 250, 0), tol: float = 0.01,
                          share_fn: Optional[Callable[[], float]] = None) -> float:
    """Set the first router's output bias so an *untrained* DC-DiT keeps about ``target_share`` of its tokens.

    For benchmarking random-init models only (a trained router's behaviour
    is what it is): bisects the bias of the router's last conv so the mean
    natural kept share hits the target. The share is ``share_fn()`` when given
    (e.g. the kept share of the very sampling run that is then measured, so
    the reported share is the one the run shows), else the share over noise
    inputs at ``timesteps``. Returns the kept share reached.
    """
    m = unwrap(model)
    bias = router_bias(m)
    if not 0 < target_share <= 1:
        raise ValueError(f"target kept share must lie in (0, 1], got {target_share}")
    info = model_info(m)
    g = torch.Generator().manual_seed(seed)
    device = bias.device
    x = torch.randn(batch, info["in_channels"], *info["input_hw"], generator=g).to(device)
    y = (torch.arange(batch) % info["num_classes"]).to(device)

    def share(b: float) -> float:
        bias.fill_(b)
        if share_fn is not None:
            return float(share_fn())
        vals = []
        for t in timesteps:
            _, routing = m(x, torch.full((batch,), int(t), device=device), y)
            vals.append(routing[0].kept_share(natural=True).mean().item())
        return float(np.mean(vals))

    lo, hi = -20.0, 20.0
    best = (share(0.0), 0.0)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        s = share(mid)
        if abs(s - target_share) < abs(best[0] - target_share):
            best = (s, mid)
        if abs(s - target_share) <= tol:
            break
        lo, hi = (mid, hi) if s < target_share else (lo, mid)
    bias.fill_(best[1])
    return best[0]


def build_named_model(name: str, image_size: int = 256, in_channels: int = 4, num_classes: int = 1000,
                      seed: int = 0) -> nn.Module:
    """A randomly initialised registry model ("DiT-S/2", "DC-DiT-S-N4", ...) for ``image_size`` pixels.

    With 4 input channels the model works on SD-VAE latents (size / 8); otherwise on pixels.
    """
    side = image_size // 8 if in_channels == 4 else image_size
    if side < 1:
        raise ValueError(f"image size {image_size} is too small")
    torch.manual_seed(seed)
    if name in DIT_CONFIGS:
        return build_dit(name, input_size=side, in_channels=in_channels, num_classes=num_classes).eval()
    if name in DCDIT_PRESETS:
        return build_dcdit(name, input_size=side, in_channels=in_channels, num_classes=num_classes).eval()
    raise ValueError(f"unknown model {name!r}: choose a DiT ({', '.join(DIT_CONFIGS)}) or DC-DiT "
                     f"({', '.join(DCDIT_PRESETS)}) name")
