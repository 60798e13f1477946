"""Compute budgets for elastic inference: a tail-drop fraction solved from a kept-share or GFLOPs target.

DC-DiT's cost falls monotonically (in steps) as the tail-drop fraction ``tail_drop``
grows. A target is met by bisection on ``tail_drop`` against a *measurement*: a probe
run of the first few samples of the real run -- the same seeds, sampler
(DDPM/DDIM with eta, or a diffusers solver), precision, clipping, guidance
and, by default, every step of the real schedule, so the probe's samples follow exactly the trajectories the real run
gives them -- whose FLOPs are counted per step or whose kept-token share is
averaged. What is left between probe and real run is sampling variation: the
router keeps more tokens on some images than on others, so a probe of n of the
run's N samples misses the run's mean by about (per-image spread) / sqrt(n).
A probe that covers the whole run is exact (up to whole tokens).

Units: ``gflops`` is GFLOPs (2 FLOPs per MAC) per image per sampling step,
averaged over the steps; under guidance both halves of the batch count.
``keep_share`` is the mean share of first-stage tokens kept (conditional half).

:func:`parse_tail_drop` is the one check of a tail-drop fraction given by a user
(the CLI's options, the training config, :class:`Budget`); past it the value
travels unchecked as ``tail_drop`` to ``DCDiT.forward``, which checks what reaches the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch.nn as nn

from dcdit.diffusion import SpacedDiffusion
from dcdit.models import is_dcdit
from dcdit.sampling.sampler import sample
from dcdit.utils import unwrap

__all__ = ["BUDGET_KINDS", "Budget", "BudgetSolution", "bisect_tail_drop", "probe_diffusion", "solve_budget",
           "resolve_tail_drop", "parse_tail_drop", "parse_tail_drops"]

BUDGET_KINDS = ("tail_drop", "keep_share", "gflops")
MAX_TAIL_DROP = 0.99  # upper end of the searched tail-drop range


def parse_tail_drop(value, name: str = "tail_drop") -> float:
    """A tail-drop fraction as a user gives it (a number, or its text): a float in [0, 1).

    Raises ValueError naming ``name`` and the value (a non-number, NaN, or outside [0, 1)).
    """
    try:
        tail_drop = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= tail_drop < 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return tail_drop


def parse_tail_drops(text: str, name: str = "tail_drop") -> list[float]:
    """``"0,0.2,0.4"`` -> ``[0.0, 0.2, 0.4]``, each checked by :func:`parse_tail_drop`."""
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise ValueError(f"{name} must be comma-separated fractions in [0, 1) such as 0,0.2,0.4, got {text!r}")
    return [parse_tail_drop(v, name) for v in items]


@dataclass(frozen=True)
class Budget:
    """A compute budget: ``kind`` in BUDGET_KINDS and its ``value``; ``tolerance`` is relative."""

    kind: str
    value: float
    tolerance: float = 0.03

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}: expected one of {', '.join(BUDGET_KINDS)}")
        if self.kind == "tail_drop":
            parse_tail_drop(self.value)
        v = float(self.value)
        if self.kind == "keep_share" and not 0.0 < v <= 1.0:
            raise ValueError(f"keep share must lie in (0, 1], got {v}")
        if self.kind == "gflops" and not v > 0:
            raise ValueError(f"GFLOPs target must be positive, got {v}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"budget tolerance must lie in (0, 1), got {self.tolerance}")

    @classmethod
    def from_options(cls, tail_drop: Optional[float] = None, keep_share: Optional[float] = None,
                     gflops: Optional[float] = None) -> Optional["Budget"]:
        """At most one of the three options (CLI style); None when none is given."""
        given = [(k, v) for k, v in (("tail_drop", tail_drop), ("keep_share", keep_share), ("gflops", gflops))
                 if v is not None]
        if len(given) > 1:
            names = " and ".join("--" + k.replace("_", "-") for k, _ in given)
            raise ValueError(f"give one compute budget, not {names}")
        return cls(*given[0]) if given else None


@dataclass
class BudgetSolution:
    """The tail-drop fraction found, what the probe measured there, and every probe evaluation."""

    tail_drop: float
    measured: float
    target: float
    kind: str
    reachable: tuple[float, float] = (float("nan"), float("nan"))  # (low, high) measured at the max and at 0
    evaluations: list[tuple[float, float]] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return abs(self.measured - self.target) / abs(self.target)


_UNITS = {"gflops": "GFLOPs per image per step", "keep_share": "kept-token share"}


def bisect_tail_drop(measure: Callable[[float], float], target: float, kind: str = "gflops",
                     tolerance: float = 0.05, lo: float = 0.0, hi: float = MAX_TAIL_DROP,
                     max_evals: int = 24) -> BudgetSolution:
    """Solve ``measure(tail_drop) ~= target`` for ``tail_drop`` in [lo, hi] by bracketing; ``measure`` must be
    non-increasing.

    Bisection, sped up by interpolating inside the bracket while that halves it
    (a probe measurement is a short sampling run, so evaluations are dear).

    Stops once within ``tolerance / 4`` of the target (the real run may drift
    a little from the probe), or once the bracket is narrower than 0.001 in
    ``tail_drop`` (the cost is a step function: whole tokens). Raises ValueError with the reachable range when
    the target lies outside it, or when no fraction comes within ``tolerance``
    (the cost moves in steps of whole tokens).
    """
    unit = _UNITS.get(kind, kind)
    evals: list[tuple[float, float]] = []

    def m(tail_drop: float) -> float:
        v = float(measure(tail_drop))
        evals.append((tail_drop, v))
        return v

    top, bottom = m(lo), m(hi)
    reach = (bottom, top)
    if bottom > top:
        raise ValueError(f"{unit} rises with the tail-drop fraction ({top:.4g} at f={lo}, {bottom:.4g} at f={hi})")
    if target > top * (1 + tolerance) or target < bottom * (1 - tolerance):
        raise ValueError(
            f"{kind} target {target:.4g} is outside the reachable range {bottom:.4g} (tail drop {hi:g}) .. "
            f"{top:.4g} (tail drop {lo:g}) {unit}"
        )
    best = min(evals, key=lambda e: abs(e[1] - target))
    # Bracketed search: (a, fa) costs more than the target, (b, fb) at most the target.
    # Interpolate inside the bracket (the cost is close to linear in f); fall back to
    # the midpoint whenever an interpolation step failed to halve the bracket.
    (a, fa), (b, fb) = (lo, top), (hi, bottom)
    interpolate = True
    while abs(best[1] - target) > tolerance / 4 * abs(target) and len(evals) < max_evals and b - a > 1e-3:
        width = b - a
        if interpolate and fa > fb:
            mid = a + (fa - target) / (fa - fb) * width
            mid = min(max(mid, a + 0.02 * width), b - 0.02 * width)
        else:
            mid = 0.5 * (a + b)
        v = m(mid)
        if v > target:
            a, fa = mid, v
        else:
            b, fb = mid, v
        interpolate = (b - a) <= 0.5 * width
        if abs(v - target) < abs(best[1] - target):
            best = (mid, v)
    if abs(best[1] - target) > tolerance * abs(target):
        below = max((e for e in evals if e[1] <= target), key=lambda e: e[1], default=None)
        above = min((e for e in evals if e[1] > target), key=lambda e: e[1], default=None)
        near = ", ".join(f"{v:.4g} at f={f:.4f}" for f, v in (e for e in (above, below) if e is not None))
        raise ValueError(f"no tail-drop fraction reaches {kind} {target:.4g} within {tolerance:.0%}: "
                         f"the nearest are {near} ({unit})")
    return BudgetSolution(best[0], best[1], float(target), kind, reach, evals)


def probe_diffusion(diffusion, steps: int = 10):
    """A diffusion with ``steps`` of ``diffusion``'s steps (evenly spread, first and last kept).

    The model still sees the original timesteps. A diffusers solver setup
    (``SchedulerSampling``) gives the same solver with ``steps`` steps instead.
    """
    if hasattr(diffusion, "with_steps"):  # a diffusers scheduler: its own spacing for fewer steps
        return diffusion.with_steps(steps)
    S = diffusion.num_timesteps
    keep = sorted({int(round(v)) for v in np.linspace(0, S - 1, min(steps, S))})
    probe = SpacedDiffusion(keep, betas=diffusion.betas, model_mean_type=diffusion.model_mean_type,
                            model_var_type=diffusion.model_var_type, loss_type=diffusion.loss_type)
    parent = getattr(diffusion, "timestep_map", None)
    if parent is not None:  # compose: probe index -> parent index -> original timestep
        probe.timestep_map = parent[probe.timestep_map]
    return probe


def solve_budget(
    model: nn.Module,
    budget: Budget,
    labels: Sequence[int],
    *,
    diffusion,
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = None,
    uncond_drop: Optional[float] = None,
    probe_size: int = 4,
    probe_steps: Optional[int] = None,
    max_tail_drop: float = MAX_TAIL_DROP,
    sampler: Optional[str] = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    precision: str = "fp32",
) -> BudgetSolution:
    """The tail-drop fraction meeting ``budget`` for this model and sampling setup.

    The probe samples the first ``probe_size`` labels (with their seeds and
    ``indices``) exactly as the real run will: ``sampler`` (None: the diffusion's
    own, as :func:`~dcdit.sampling.sample`), ``eta``, ``clip_denoised``,
    ``precision`` and guidance as given, over all of ``diffusion``'s steps.
    ``probe_steps`` (fewer steps, evenly spread) makes the probe cheaper but
    its trajectories differ from the real run's, so it can miss the target by
    more. A ``tail_drop`` budget is returned as is.
    """
    if budget.kind == "tail_drop":
        return BudgetSolution(float(budget.value), float(budget.value), float(budget.value), "tail_drop")
    if not is_dcdit(model):
        raise ValueError(f"a {budget.kind} budget needs a DC-DiT model (tail dropping); "
                         f"{type(unwrap(model)).__name__} has a fixed cost")
    labels = list(np.asarray(labels).reshape(-1)[:probe_size])
    indices = list(range(len(labels))) if indices is None else list(indices)[: len(labels)]
    full = probe_steps is None or probe_steps >= diffusion.num_timesteps
    probe = diffusion if full else probe_diffusion(diffusion, probe_steps)

    def measure(tail_drop: float) -> float:
        _, stats = sample(model, probe, labels, seed=seed, indices=indices, sampler=sampler, eta=eta,
                          cfg_scale=cfg_scale, guidance_channels=guidance_channels, tail_drop=tail_drop,
                          uncond_drop=uncond_drop, clip_denoised=clip_denoised, precision=precision,
                          measure_flops=budget.kind == "gflops")
        if budget.kind == "gflops":
            return stats.gflops_per_step
        return float(stats.kept_share[:, 0].mean())

    return bisect_tail_drop(measure, float(budget.value), budget.kind, budget.tolerance, 0.0, max_tail_drop)


def resolve_tail_drop(
    model: nn.Module,
    budget: Optional[Budget],
    probe_labels: Sequence[int],
    *,
    diffusion,
    seed: int = 0,
    cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = None,
    uncond_drop: Optional[float] = None,
    probe_steps: Optional[int] = None,
    sampler: Optional[str] = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    precision: str = "fp32",
    num_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> float:
    """The tail-drop fraction a sampling run uses: 0 without a budget, a tail_drop budget's value,
    else solved once (rank 0, on ``probe_labels``: the run's first samples, sampled exactly as the
    run will be: ``sampler``, ``eta``, ``clip_denoised``, ``precision``, guidance) and shared with every rank.

    A budget that cannot be met raises the same ValueError on every rank.
    """
    if budget is None:
        return 0.0
    if budget.kind == "tail_drop":
        return float(budget.value)
    tail_drop, error = None, None
    if rank == 0:
        try:
            sol = solve_budget(model, budget, probe_labels, diffusion=diffusion, seed=seed, cfg_scale=cfg_scale,
                               guidance_channels=guidance_channels, uncond_drop=uncond_drop,
                               probe_size=len(probe_labels), probe_steps=probe_steps, sampler=sampler, eta=eta,
                               clip_denoised=clip_denoised, precision=precision)
        except ValueError as e:
            error = str(e)
        else:
            tail_drop = sol.tail_drop
            log(f"budget: {budget.kind} {budget.value:g} -> tail-drop fraction {sol.tail_drop:.4f} "
                f"(probe of {len(probe_labels)}" + (f" of {num_samples}" if num_samples else "")
                + f" samples measured {sol.measured:.4g}, {len(sol.evaluations)} probe runs)")
    if world_size > 1:  # share the tail drop (or the error, so no rank waits forever)
        import torch.distributed as dist

        box = [(tail_drop, error)]
        dist.broadcast_object_list(box, src=0)
        tail_drop, error = box[0]
    if error is not None:
        raise ValueError(error)
    return float(tail_drop)
