"""What every diffusers scheduler adapter shares: the scheduler built on our diffusion's betas, and one step.

A :class:`SchedulerAdapter` names a diffusers scheduler class and the options
that make it the solver we mean (e.g. DPM-Solver++ of order 2). A
:class:`SchedulerSampling` is that scheduler configured for one model and one
number of steps: it takes the place of the respaced diffusion in
:func:`dcdit.sampling.sample` (same ``num_timesteps`` = sampling steps,
``model_mean_type``, ``timesteps``), and :meth:`SchedulerSampling.step` runs
one network call and one scheduler update.

Correspondence with our diffusion (``dcdit.diffusion``):

* betas: the base process's betas (linear or cosine, ``diffusion_steps`` long)
  are passed as ``trained_betas``, so the scheduler's ``alphas_cumprod`` are
  ours (up to the float32 cumulative product diffusers computes);
* prediction: epsilon -> ``"epsilon"``, v -> ``"v_prediction"`` (same
  definition, ``v = sqrt(abar) eps - sqrt(1 - abar) x0``), x0 -> ``"sample"``;
  a learned-sigma model's extra C variance channels are dropped (the solvers
  are deterministic ODE solvers; they do not use a variance);
* the model sees the scheduler's timesteps (original, 0..T-1) and its
  variance-preserving input (``scheduler.scale_model_input``: Euler keeps its
  sample in the sigma parameterisation and scales it back for the network);
* timestep spacing ``"trailing"`` (Lin et al. 2023, "Common Diffusion Noise
  Schedules and Sample Steps are Flawed", table 2): the first network call is
  at t = T-1, where the starting noise N(0, I) is the marginal the model was
  trained on, and the steps are spread evenly down to T/steps - 1, the last
  update jumping to sigma = 0 (the data). ``"leading"`` with DiT's offset 0
  would start at T - T/steps (t = 900 of 1000 at 10 steps), feeding pure
  noise to a timestep that expects some signal; at 5-10 steps that costs
  quality. (Our DDIM keeps DiT's "ddimN" spacing: 0, s, 2s, ...)
* clipping (``clip_denoised``): the predicted x0 is clamped to [-1, 1] and the
  output re-expressed in the model's parameterisation at that x0, as our DDIM
  does (it re-derives eps from the clamped x0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from dcdit.diffusion.factory import MEAN_TYPES

__all__ = ["SchedulerAdapter", "SchedulerSampling", "import_diffusers", "PREDICTION_TYPES", "DIFFUSERS_VERSION"]

DIFFUSERS_VERSION = "0.42.1"  # the version tested (pyproject's `samplers` extra pins it)
# our model config's ``prediction`` -> diffusers' ``prediction_type``
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def import_diffusers():
    """The ``diffusers`` module, or ImportError with one line saying how to install it."""
    try:
        import diffusers  # optional dependency: only the diffusers samplers need it
    except ImportError:
        raise ImportError(f"the diffusers samplers need the diffusers package: "
                          f"pip install 'diffusers=={DIFFUSERS_VERSION}' (or the dcdit[samplers] extra)") from None
    return diffusers


@dataclass(frozen=True)
class SchedulerAdapter:
    """A diffusers scheduler class and the options that make it one named solver.

    Attributes:
        name: the sampler name (``dcdit sample --sampler NAME``).
        class_name: the scheduler class in ``diffusers``.
        options: constructor options (solver order, algorithm, ...); ``timestep_spacing``
            defaults to ``"trailing"`` (see the module doc).
        predictions: our prediction types the scheduler reads (subset of PREDICTION_TYPES).
        description: one line for help texts.
    """

    name: str
    class_name: str
    options: dict = field(default_factory=dict)
    predictions: tuple[str, ...] = ("epsilon", "v", "x0")
    description: str = ""

    def build(self, betas: np.ndarray, prediction: str, steps: int):
        """A fresh scheduler on ``betas`` for a ``prediction`` model, with ``set_timesteps(steps)`` done."""
        if prediction not in self.predictions:
            raise ValueError(f"sampler {self.name} cannot read a model that predicts {prediction} "
                             f"(it reads {', '.join(self.predictions)})")
        cls = getattr(import_diffusers(), self.class_name)
        options = {"timestep_spacing": "trailing", **self.options}
        scheduler = cls(num_train_timesteps=len(betas), trained_betas=[float(b) for b in betas],
                        prediction_type=PREDICTION_TYPES[prediction], **options)
        scheduler.set_timesteps(steps)
        return scheduler


class SchedulerSampling:
    """A diffusers scheduler set up for ``steps`` sampling steps of a model; used like a respaced diffusion.

    Args:
        adapter: which solver.
        steps: network calls per sample.
        betas: the base process's betas (length T, float64), e.g. ``create_diffusion("").betas``.
        prediction: what the model predicts (``"epsilon"``, ``"v"``, ``"x0"``).
        learn_sigma: the model outputs 2C channels (the first C are used).
    """

    def __init__(self, adapter: SchedulerAdapter, steps: int, betas: np.ndarray, prediction: str = "epsilon",
                 learn_sigma: bool = True) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if prediction not in MEAN_TYPES:
            raise ValueError(f"prediction must be one of {', '.join(MEAN_TYPES)}, got {prediction!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= len(betas):
            raise ValueError(f"sampling steps must be an integer in 1..{len(betas)}, got {steps!r}")
        self.adapter, self.sampler, self.steps = adapter, adapter.name, steps
        self.betas, self.prediction, self.learn_sigma = betas, prediction, bool(learn_sigma)
        self.model_mean_type = MEAN_TYPES[prediction]  # what sample() checks against the model
        self.original_num_steps = len(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)  # float64, as our diffusion
        self._sqrt_ab = torch.as_tensor(np.sqrt(alphas_cumprod), dtype=torch.float32)
        self._sqrt_1m_ab = torch.as_tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32)
        first = self.make()  # also checks the configuration once
        self.timesteps = [_as_int_timestep(t) for t in first.timesteps]  # original timesteps, sampling order
        if len(self.timesteps) != steps:
            raise ValueError(f"{self.sampler}: the scheduler made {len(self.timesteps)} timesteps for {steps} steps")

    @property
    def num_timesteps(self) -> int:
        """Network calls per sample (as a respaced diffusion's ``num_timesteps``)."""
        return self.steps

    def make(self):
        """A fresh scheduler (multistep solvers keep state: one per sampling run)."""
        return self.adapter.build(self.betas, self.prediction, self.steps)

    def with_steps(self, steps: int) -> "SchedulerSampling":
        """The same solver with another number of steps (the budget probe's cheaper schedule)."""
        return SchedulerSampling(self.adapter, min(int(steps), self.steps), self.betas, self.prediction,
                                 self.learn_sigma)

    def __repr__(self) -> str:
        return (f"SchedulerSampling({self.sampler}: {self.adapter.class_name}, {self.steps} steps, "
                f"prediction {self.prediction}, T={self.original_num_steps})")

    # ----------------------------------------------------------------- one step
    def _coef(self, table: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        return table[t].to(device=x.device, dtype=x.dtype)

    def pred_xstart(self, out: torch.Tensor, x_vp: torch.Tensor, t: int) -> torch.Tensor:
        """x0 implied by the model output ``out`` (C channels) at the variance-preserving input ``x_vp``."""
        a, s = self._coef(self._sqrt_ab, t, x_vp), self._coef(self._sqrt_1m_ab, t, x_vp)
        if self.prediction == "epsilon":
            return (x_vp - s * out) / a
        if self.prediction == "v":
            return a * x_vp - s * out
        return out

    def from_xstart(self, x0: torch.Tensor, x_vp: torch.Tensor, t: int) -> torch.Tensor:
        """The model output (in its own parameterisation) that implies ``x0`` at ``x_vp``."""
        if self.prediction == "x0":
            return x0
        a, s = self._coef(self._sqrt_ab, t, x_vp), self._coef(self._sqrt_1m_ab, t, x_vp)
        eps = (x_vp - a * x0) / s
        return eps if self.prediction == "epsilon" else a * eps - s * x0

    def step(self, scheduler, net: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]],
             x: torch.Tensor, k: int, clip_denoised: bool = False) -> dict[str, Any]:
        """Step ``k`` (0-based) of ``scheduler``: one network call, one update.

        ``net(x_vp, t) -> (output (n, C or 2C, H, W), extras)`` is the (guided) network
        on the variance-preserving input at original timesteps ``t`` (n,).

        Returns a dict: ``"sample"`` (the next x, in the scheduler's space), ``"x_t"``
        (the network's input), ``"pred_xstart"``, ``"extras"``, ``"t"`` (int).
        """
        t_sched = scheduler.timesteps[k]
        t = self.timesteps[k]
        x_vp = scheduler.scale_model_input(x, t_sched)
        out, extras = net(x_vp, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        C = x.shape[1]
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"model output has {out.shape[1]} channels, expected {C} or {2 * C}")
        out = out[:, :C].float()  # learned sigma: the variance channels are not used by the ODE solvers
        x0 = self.pred_xstart(out, x_vp, t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            out = self.from_xstart(x0, x_vp, t)
        x_next = scheduler.step(out, t_sched, x).prev_sample
        return {"sample": x_next, "x_t": x_vp, "pred_xstart": x0, "extras": extras, "t": t}


def _as_int_timestep(t) -> int:
    """A scheduler timestep (int or integral float) as an int; the models are trained on integer t."""
    v = float(t)
    if abs(v - round(v)) > 1e-4:
        raise ValueError(f"the scheduler produced a fractional timestep {v}: the models need integer timesteps")
    return int(round(v))
