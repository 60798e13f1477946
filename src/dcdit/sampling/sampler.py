"""Batched sampling (DDPM, DDIM, DPM-Solver++, UniPC, Euler) with per-sample seeds, guidance, tail dropping
and statistics.

:func:`sample` is the library's one sampling loop. For ``ddpm`` / ``ddim`` each
step is the diffusion's own step function (``p_sample`` / ``ddim_sample``) fed
noise from the sample's own stream (:class:`~dcdit.sampling.seeds.SampleNoise`),
so a sample's result does not depend on its batch. The other samplers are
diffusers' schedulers (:mod:`dcdit.sampling.schedulers`, one adapter each):
deterministic solvers whose update is elementwise, so the same holds. Each step's network call can be
run under the FLOP counter, and DC-DiT routing is turned into kept-token
shares, so a run reports what it cost step by step (DC-DiT's cost changes
with t). Compute budgets are solved above this loop (:mod:`dcdit.sampling.budget`)
and arrive here as a tail-drop fraction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dcdit.diffusion import create_diffusion, space_timesteps
from dcdit.diffusion.factory import MEAN_TYPES
from dcdit.diffusion.gaussian_diffusion import split_model_output
from dcdit.diffusion.schedules import get_named_beta_schedule
from dcdit.flops import count_flops
from dcdit.models import is_dcdit
from dcdit.sampling.guidance import is_guided, make_model_fn, model_info
from dcdit.sampling.precision import autocast_for, resolve_precision
from dcdit.sampling.schedulers import SCHEDULERS, SchedulerSampling, scheduler_sampling
from dcdit.sampling.seeds import SampleNoise
from dcdit.utils import NonFiniteError, unwrap

__all__ = ["SAMPLERS", "DIFFUSION_SAMPLERS", "SampleStats", "sample", "create_sampling_diffusion",
           "sampling_diffusion_for"]

DIFFUSION_SAMPLERS = ("ddpm", "ddim")  # our diffusion's own steps
SAMPLERS = DIFFUSION_SAMPLERS + tuple(SCHEDULERS)  # + diffusers' solvers: "dpm++2m", "unipc", "euler"


def create_sampling_diffusion(sampler: str, steps: int, learn_sigma: bool = True,
                              noise_schedule: str = "linear", diffusion_steps: int = 1000,
                              prediction: str = "epsilon"):
    """What :func:`sample` steps through for ``steps`` sampling steps of ``sampler``.

    ``ddpm`` / ``ddim``: the respaced diffusion ("ddimN" spacing for DDIM when
    realisable). A diffusers sampler (``dpm++2m``, ``unipc``, ``euler``): a
    :class:`~dcdit.sampling.schedulers.SchedulerSampling` on the same betas
    (``noise_schedule``, ``diffusion_steps``), "trailing" timesteps.
    ``learn_sigma`` and ``prediction`` describe the model's output (``model_info(model)`` has both).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or not 1 <= steps <= diffusion_steps:
        raise ValueError(f"sampling steps must be an integer in 1..{diffusion_steps}, got {steps!r}")
    if sampler in SCHEDULERS:
        return scheduler_sampling(sampler, steps, get_named_beta_schedule(noise_schedule, diffusion_steps),
                                  prediction, learn_sigma)
    spacing = str(steps)
    if sampler == "ddim":
        try:
            space_timesteps(diffusion_steps, f"ddim{steps}")
            spacing = f"ddim{steps}"
        except ValueError:
            pass  # no integer stride gives exactly `steps`: use even spacing
    return create_diffusion(spacing, noise_schedule=noise_schedule, learn_sigma=learn_sigma,
                            diffusion_steps=diffusion_steps, prediction=prediction)


def sampling_diffusion_for(model: nn.Module, sampler: str, steps: int, noise_schedule: str = "linear",
                           diffusion_steps: int = 1000):
    """:func:`create_sampling_diffusion` for ``model``'s output (its ``learn_sigma`` and ``prediction``)."""
    info = model_info(model)
    return create_sampling_diffusion(sampler, steps, info["learn_sigma"], noise_schedule, diffusion_steps,
                                     prediction=info["prediction"])


@dataclass
class SampleStats:
    """What a sampling run did, per step and per sample.

    Attributes:
        timesteps: original timestep (0..T-1) of each step, in sampling order.
        kept_share: (steps, stages, n) share of each stage's tokens kept, per
            conditional sample (None for DiT).
        natural_share: (steps, stages, n) share the router chose before tail dropping.
        flops_per_step: (steps, n) FLOPs (2 per MAC) per image of each step's
            network call(s); samples of one batch share their batch's mean; both
            halves of a guided batch are charged to the image. None if not measured.
        flops_by_component: FLOPs per image summed over the run, per component.
        tail_drop, uncond_drop: fractions used (uncond_drop None without Lite-CFG).
    """

    timesteps: list[int]
    kept_share: Optional[np.ndarray] = None
    natural_share: Optional[np.ndarray] = None
    flops_per_step: Optional[np.ndarray] = None
    flops_by_component: dict[str, float] = field(default_factory=dict)
    tail_drop: float = 0.0
    uncond_drop: Optional[float] = None
    num_images: int = 0

    # ------------------------------------------------------------- summaries
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def gflops_per_step(self) -> Optional[float]:
        """Mean GFLOPs per image per sampling step."""
        return None if self.flops_per_step is None else float(self.flops_per_step.mean() / 1e9)

    @property
    def gflops_per_image(self) -> Optional[float]:
        """GFLOPs per image over the whole run (sum over steps)."""
        return None if self.flops_per_step is None else float(self.flops_per_step.sum(0).mean() / 1e9)

    @property
    def mean_kept_share(self) -> Optional[list[float]]:
        """Mean kept share per stage over steps and samples."""
        return None if self.kept_share is None else [float(v) for v in self.kept_share.mean(axis=(0, 2))]

    def kept_summary(self) -> dict:
        """The first stage's kept share: mean at the noisiest and at the cleanest step (and their t), mean over
        the run, per step, and the router's natural share per step. Empty for a model that does not route."""
        if self.kept_share is None:
            return {}
        ks = self.kept_share[:, 0, :]  # (steps, n)
        return {"kept_share_noisiest": float(ks[0].mean()), "kept_share_cleanest": float(ks[-1].mean()),
                "t_noisiest": int(self.timesteps[0]), "t_cleanest": int(self.timesteps[-1]),
                "kept_share_mean": float(ks.mean()), "kept_share_by_t": [float(v) for v in ks.mean(1)],
                "natural_share_by_t": [float(v) for v in self.natural_share[:, 0, :].mean(1)]}

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (means and per-step means)."""
        out: dict[str, Any] = {
            "num_images": self.num_images,
            "num_steps": self.num_steps,
            "timesteps": list(map(int, self.timesteps)),
            "tail_drop": self.tail_drop,
            "uncond_drop": self.uncond_drop,
            "gflops_per_step": self.gflops_per_step,
            "gflops_per_image": self.gflops_per_image,
            "mean_kept_share": self.mean_kept_share,
        }
        if self.flops_per_step is not None:
            out["gflops_per_step_by_t"] = [float(v) for v in self.flops_per_step.mean(1) / 1e9]
            out["gflops_per_image_by_component"] = {k: v / 1e9 for k, v in self.flops_by_component.items()}
        if self.kept_share is not None:
            out["kept_share_by_t"] = self.kept_share.mean(2).tolist()
        return out

    @staticmethod
    def merge(parts: Sequence["SampleStats"]) -> "SampleStats":
        """Combine the statistics of several batches of one run (same steps).

        Arrays are concatenated over samples; batches that did not measure
        FLOPs (or routing) are left out of that field's statistics.
        """
        parts = [p for p in parts if p is not None and p.num_images]
        if not parts:
            raise ValueError("no statistics to merge")
        first = parts[0]
        if any(p.timesteps != first.timesteps for p in parts):
            raise ValueError("cannot merge statistics of runs with different timesteps")

        def cat(name: str, axis: int) -> Optional[np.ndarray]:
            arrays = [getattr(p, name) for p in parts if getattr(p, name) is not None]
            return np.concatenate(arrays, axis=axis) if arrays else None

        measured = [p for p in parts if p.flops_per_step is not None]
        n_measured = sum(p.num_images for p in measured)
        comps: dict[str, float] = {}
        for p in measured:
            for k, v in p.flops_by_component.items():
                comps[k] = comps.get(k, 0.0) + v * p.num_images / n_measured
        return SampleStats(first.timesteps, cat("kept_share", 2), cat("natural_share", 2), cat("flops_per_step", 1),
                           comps, first.tail_drop, first.uncond_drop, sum(p.num_images for p in parts))


def component_labels(model: nn.Module) -> dict[str, str]:
    """Top-level module name -> component label, from the model's ``component_names()`` when it has one."""
    fn = getattr(unwrap(model), "component_names", None)
    if not callable(fn):
        return {}
    return {k: v for k, v in fn().items() if "." not in k}


def check_finite_samples(x: torch.Tensor, indices: Sequence[int]) -> None:
    """Raise :class:`NonFiniteError` when samples ``x`` (n, ...) hold NaN or inf (one reduction, one sync)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
    raise NonFiniteError(f"the model's output is not finite (NaN or inf) in {len(bad)} of {len(indices)} samples "
                         f"(first: sample {indices[bad[0]]}): its weights are broken, e.g. from a diverged run; "
                         "sample an earlier checkpoint")


@torch.no_grad()
def sample(
    model: nn.Module,
    diffusion,
    labels: Sequence[int] | torch.Tensor,
    *,
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    sampler: Optional[str] = None,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    guidance_channels: Optional[int] = None,
    tail_drop: float = 0.0,
    uncond_drop: Optional[float] = None,
    clip_denoised: bool = False,
    measure_flops: bool = True,
    precision: str = "fp32",
    callback: Optional[Callable[[dict], None]] = None,
    progress: bool = False,
    device: Optional[torch.device | str] = None,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, SampleStats]:
    """Sample one batch; returns ``(samples (n, C, H, W) in model space, stats)``.

    Args:
        model: DiT or DC-DiT (eval mode).
        diffusion: what to step through, from :func:`create_sampling_diffusion` /
            :func:`sampling_diffusion_for`: a respaced diffusion (ddpm, ddim) or a
            diffusers scheduler setup (dpm++2m, unipc, euler).
        labels: (n,) class labels.
        seed, indices: global seed and the samples' global indices (default 0..n-1);
            they fix each sample's noise independently of the batch.
        sampler: one of SAMPLERS; None: the diffusers sampler ``diffusion`` was built
            for, else "ddim". "ddpm" is ancestral, "ddim" takes ``eta`` (0: deterministic);
            the diffusers samplers are deterministic ODE solvers (``eta`` must be 0).
        cfg_scale, guidance_channels: classifier-free guidance (1.0: none).
        tail_drop: DC-DiT tail-drop fraction (conditional half under guidance); a kept-share or
            GFLOPs budget is turned into one by :func:`dcdit.sampling.budget.solve_budget`.
        uncond_drop: Lite-CFG fraction for the unconditional half.
        clip_denoised: clamp predicted x_0 to [-1, 1] (pixel models; latents: False).
        measure_flops: count each step's FLOPs (a dispatch mode sees every op: on CPU, sampling the
            shipped MNIST models takes ~1.3-1.6x as long; ``benchmarks/bench_flop_counting.py``).
            Pass False where only the images or the kept shares are wanted.
        precision: "fp32" (exact, the default), "bf16", "fp16", or "auto" (bf16 where the
            device computes it natively, else fp32; see :mod:`dcdit.sampling.precision`).
            Only the network calls run in reduced precision; the updates stay fp32.
        callback: called after every step with a dict: "i" (step index, counting
            down), "step" (0-based), "num_steps", "t" (original timesteps, (n,)),
            "x_t" (the step's noisy network input), "sample" (the next x; Euler keeps it
            scaled by 1/sqrt(abar)), "pred_xstart" (conditional half, (n, C, H, W)),
            "extras" (routing or None) and "flops" (FlopReport or None).
        progress: show a per-step tqdm bar.
        device: where to sample (default: the model's device).
        allow_nonfinite: return samples holding NaN or inf instead of raising
            :class:`~dcdit.utils.NonFiniteError` (checked once, on the final samples: a
            NaN or inf anywhere in the loop reaches them, so no per-step check is needed).
    """
    scheduled, sampler = check_sampler(diffusion, sampler, eta)
    info, labels, indices = check_inputs(model, diffusion, labels, indices)
    n = labels.numel()
    device = torch.device(next(model.parameters()).device if device is None else device)
    precision = resolve_precision(precision, device)
    guided = is_guided(cfg_scale)
    y = labels.to(device)
    if guided:  # the [cond; uncond] batch: the second half carries the null class
        y = torch.cat([y, torch.full_like(y, info["num_classes"])])
    network = NetworkCall(model, make_model_fn(model, cfg_scale, guidance_channels, tail_drop, uncond_drop), y, n,
                          precision, device, measure_flops)
    recorder = StatsRecorder(model, n, measure_flops)
    noise = SampleNoise(seed, indices, (info["in_channels"], *info["input_hw"]))
    x = noise.draw(device)
    if scheduled:
        step_fn = SchedulerStep(diffusion, network, n, guided, clip_denoised)
        x = step_fn.start(x)
    else:
        step_fn = DiffusionStep(diffusion, network, sampler, eta, noise, n, guided, clip_denoised, device)

    steps = list(range(diffusion.num_timesteps - 1, -1, -1))
    for step, i in enumerate(tqdm(steps, desc=sampler.upper(), leave=False) if progress else steps):
        network.report = None
        out = step_fn(x, step, i)  # "sample", "x_t", "pred_xstart" (conditional half), "extras", "t"
        recorder.add(out["t"], out["extras"], network.report)
        if callback is not None:
            callback({
                "i": i, "step": step, "num_steps": len(steps), "t": torch.full((n,), out["t"]), "x_t": out["x_t"],
                "sample": out["sample"], "pred_xstart": out["pred_xstart"], "extras": out["extras"],
                "flops": network.report,
            })
        x = out["sample"]
    if not allow_nonfinite:
        check_finite_samples(x, indices)
    return x, recorder.stats(tail_drop, uncond_drop)


def check_sampler(diffusion, sampler: Optional[str], eta: float) -> tuple[bool, str]:
    """(whether ``diffusion`` is a diffusers solver setup, the sampler name) after checking they fit."""
    scheduled = isinstance(diffusion, SchedulerSampling)
    if sampler is None:
        sampler = diffusion.sampler if scheduled else "ddim"
    if sampler not in SAMPLERS and not (scheduled and sampler == diffusion.sampler):
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if scheduled != (sampler not in DIFFUSION_SAMPLERS) or (scheduled and sampler != diffusion.sampler):
        built = diffusion.sampler if scheduled else "ddpm/ddim"
        raise ValueError(f"sampler {sampler!r} cannot run on a diffusion built for {built}: "
                         f"build it with sampling_diffusion_for(model, {sampler!r}, steps)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if scheduled and eta != 0:
        raise ValueError(f"eta applies to ddim only; {sampler} is deterministic (give eta=0)")
    return scheduled, sampler


def check_inputs(model: nn.Module, diffusion, labels, indices) -> tuple[dict, torch.Tensor, list[int]]:
    """(model_info, labels (n,) long, indices) after checking the diffusion reads the model's output as it is
    meant and the labels are classes of the model."""
    info = model_info(model)
    reads = getattr(diffusion, "model_mean_type", None)
    if reads is not None and reads != MEAN_TYPES[info["prediction"]]:
        raise ValueError(f"the model predicts {info['prediction']} but the diffusion reads its output as "
                         f"{reads.value}: build it with sampling_diffusion_for(model, sampler, steps) "
                         "(diffusion_for_checkpoint(ckpt, model, sampler, steps) for a loaded checkpoint)")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    n = labels.numel()
    if n == 0:
        raise ValueError("no labels: nothing to sample")
    if int(labels.min()) < 0 or int(labels.max()) >= info["num_classes"]:
        raise ValueError(f"class labels must lie in 0..{info['num_classes'] - 1}, got {labels.tolist()[:8]}")
    indices = list(range(n)) if indices is None else [int(k) for k in indices]
    if len(indices) != n:
        raise ValueError(f"got {len(indices)} indices for {n} labels")
    return info, labels, indices


def doubled(v: torch.Tensor, guided: bool) -> torch.Tensor:
    """``v`` for both halves of a guided batch ([v; v]), else ``v``."""
    return torch.cat([v, v]) if guided else v


class NetworkCall:
    """The (guided) network of a sampling run, ``(x, t) -> output``: in the run's precision (the prediction
    comes back in fp32), under the FLOP counter when measuring; ``report`` holds the last call's FLOPs."""

    def __init__(self, model: nn.Module, fn: Callable, y: torch.Tensor, n: int, precision: str,
                 device: torch.device, measure_flops: bool):
        self.model, self.fn, self.y, self.n, self.precision, self.device = model, fn, y, n, precision, device
        self.measure_flops, self.report = measure_flops, None

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        with autocast_for(self.precision, self.device):
            out = self.fn(x, t, self.y)
        if self.precision == "fp32":
            return out
        pred, extras = split_model_output(out)
        return pred.float() if extras is None else (pred.float(), extras)

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        if not self.measure_flops:
            return self.forward(x, t)
        self.report, result = count_flops(lambda: self.forward(x, t), self.model, batch_size=self.n)
        return result


class DiffusionStep:
    """One DDPM / DDIM step of our diffusion on the (doubled, when guided) batch; noise from each sample's stream."""

    def __init__(self, diffusion, network: NetworkCall, sampler: str, eta: float, noise: SampleNoise, n: int,
                 guided: bool, clip_denoised: bool, device: torch.device):
        self.diffusion, self.network, self.sampler, self.eta, self.noise = diffusion, network, sampler, eta, noise
        self.n, self.guided, self.clip_denoised, self.device = n, guided, clip_denoised, device
        self.tmap = getattr(diffusion, "timestep_map", None)  # respaced index -> original timestep

    def __call__(self, x: torch.Tensor, step: int, i: int) -> dict:
        t = torch.full((self.n,), i, device=self.device, dtype=torch.long)
        # the step's noise from each sample's own stream (none needed at t = 0 or by deterministic DDIM)
        stochastic = i != 0 and (self.sampler == "ddpm" or self.eta > 0)
        z = self.noise.draw(self.device, x.dtype) if stochastic else torch.zeros_like(x)
        xin, tin, zin = (doubled(v, self.guided) for v in (x, t, z))
        if self.sampler == "ddpm":
            out = self.diffusion.p_sample(self.network, xin, tin, clip_denoised=self.clip_denoised, noise=zin)
        else:
            out = self.diffusion.ddim_sample(self.network, xin, tin, clip_denoised=self.clip_denoised, eta=self.eta,
                                             noise=zin)
        return {"sample": out["sample"][:self.n], "x_t": x, "pred_xstart": out["pred_xstart"][:self.n],
                "extras": out["extras"], "t": int(self.tmap[i]) if self.tmap is not None else i}


class SchedulerStep:
    """One step of a diffusers solver (fresh solver state per run); the network sees the doubled batch."""

    def __init__(self, diffusion, network: NetworkCall, n: int, guided: bool, clip_denoised: bool):
        self.diffusion, self.network, self.n, self.guided = diffusion, network, n, guided
        self.clip_denoised = clip_denoised
        self.scheduler = diffusion.make()

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scheduler.init_noise_sigma

    def net(self, x: torch.Tensor, t: torch.Tensor):
        """(n, ...) in, the conditional half's (output, extras) out."""
        pred, extras = split_model_output(self.network(doubled(x, self.guided), doubled(t, self.guided)))
        return pred[:self.n], extras

    def __call__(self, x: torch.Tensor, step: int, i: int) -> dict:
        return self.diffusion.step(self.scheduler, self.net, x, step, clip_denoised=self.clip_denoised)


class StatsRecorder:
    """Collects a run's per-step statistics (timesteps, kept shares of the conditional half, FLOPs)."""

    def __init__(self, model: nn.Module, n: int, measure_flops: bool):
        self.n, self.routed = n, is_dcdit(model)
        self.relabel = component_labels(model) if measure_flops else {}
        self.timesteps: list[int] = []
        self.kept: list[np.ndarray] = []
        self.natural: list[np.ndarray] = []
        self.flops: list[np.ndarray] = []
        self.comps: dict[str, float] = {}

    def add(self, t: int, extras, report) -> None:
        n = self.n
        self.timesteps.append(t)
        if self.routed and extras is not None:  # shares of the conditional half, per stage: (stages, n)
            self.kept.append(np.stack([st.kept_share()[:n].cpu().numpy() for st in extras]))
            self.natural.append(np.stack([st.kept_share(natural=True)[:n].cpu().numpy() for st in extras]))
        if report is not None:
            self.flops.append(np.full(n, report.total / n, dtype=np.float64))
            for k, v in report.by_component.items():
                k = self.relabel.get(k, k)
                self.comps[k] = self.comps.get(k, 0.0) + v / n

    def stats(self, tail_drop: float, uncond_drop: Optional[float]) -> SampleStats:
        return SampleStats(
            timesteps=self.timesteps,
            kept_share=np.stack(self.kept) if self.kept else None,
            natural_share=np.stack(self.natural) if self.natural else None,
            flops_per_step=np.stack(self.flops) if self.flops else None,
            flops_by_component=self.comps,
            tail_drop=float(tail_drop),
            uncond_drop=None if uncond_drop is None else float(uncond_drop),
            num_images=self.n,
        )
