"""Discrete-time Gaussian diffusion as used by DiT (the ADM / IDDPM formulation).

Written to reproduce DiT's numbers: every schedule array is computed in float64
and cast to the working dtype (float32, or float64 for float64 inputs) at
lookup time, and each formula keeps the reference order of operations.

Models may return either a tensor or a tuple ``(tensor, extras)`` (DC-DiT
returns its per-stage routing as ``extras``). The tensor is used for the
diffusion maths; the extras are handed back untouched under the key
``"extras"`` so that a trainer can add a routing loss, or a sampler can record
routing statistics, without a second forward pass.
"""

from __future__ import annotations

import enum
import math
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = ["ModelMeanType", "ModelVarType", "LossType", "GaussianDiffusion", "split_model_output"]

ModelFn = Callable[..., Any]
Callback = Callable[[dict], None]


class ModelMeanType(str, enum.Enum):
    """What the model's first ``C`` output channels predict."""

    EPSILON = "epsilon"  # the noise added to x_0
    START_X = "start_x"  # x_0 itself
    VELOCITY = "v"  # v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0 (Salimans & Ho 2022)


class ModelVarType(str, enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = "learned"  # extra C channels are the log-variance
    LEARNED_RANGE = "learned_range"  # extra C channels v in [-1, 1] interpolate log(beta~_t)..log(beta_t)
    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (with beta~_1 at t = 0)


class LossType(str, enum.Enum):
    """Training objective."""

    MSE = "mse"  # MSE on the mean prediction (+ VB term when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # as MSE, VB term scaled by num_timesteps / 1000
    KL = "kl"  # the variational bound only
    RESCALED_KL = "rescaled_kl"  # VB term scaled by num_timesteps (estimates the full bound)

    @property
    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _coerce_enum(enum_cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        choices = [m.value for m in enum_cls]
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}") from None


def split_model_output(output: Any) -> tuple[torch.Tensor, Any]:
    """Split a model's return value into ``(prediction, extras)``.

    A tensor gives ``(tensor, None)``; a tuple / list ``(tensor, extras)`` gives
    both parts. Anything else raises ``ValueError``.
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor):
        return output[0], output[1]
    raise ValueError(
        f"model must return a tensor or a (tensor, extras) tuple, got {type(output).__name__}"
        + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
    )


class GaussianDiffusion:
    """Utilities to train and sample a discrete-time Gaussian diffusion model.

    Timesteps ``t`` are integer tensors of shape ``(B,)`` with values in
    ``[0, num_timesteps)``; ``t = 0`` is the first noising step.

    Args:
        betas: 1-D array of ``num_timesteps`` betas in (0, 1].
        model_mean_type: what the model predicts (``ModelMeanType`` or its string value).
        model_var_type: how the variance is obtained (``ModelVarType`` or its string value).
        loss_type: the training objective (``LossType`` or its string value).
    """

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
        model_var_type: ModelVarType | str = ModelVarType.LEARNED_RANGE,
        loss_type: LossType | str = LossType.MSE,
        min_snr_gamma: Optional[float] = None,
        min_snr_floor: Optional[float] = None,
    ) -> None:
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
        if min_snr_floor is not None and not (min_snr_gamma is not None and 0 < min_snr_floor <= min_snr_gamma):
            raise ValueError(f"min_snr_floor must lie in (0, min_snr_gamma], got {min_snr_floor} "
                             f"(min_snr_gamma {min_snr_gamma})")
        # Min-SNR-gamma loss weighting (Hang et al. 2023); None: DiT's unweighted MSE.
        self.min_snr_gamma = min_snr_gamma
        # Lower clamp of that weight (on the x0 error), so the noisiest steps keep a share of the loss.
        self.min_snr_floor = min_snr_floor
        self._mse_weights: Optional[torch.Tensor] = None  # mse_weight's (T,) table, built on first use
        self.model_mean_type = _coerce_enum(ModelMeanType, model_mean_type, "model_mean_type")
        self.model_var_type = _coerce_enum(ModelVarType, model_var_type, "model_var_type")
        self.loss_type = _coerce_enum(LossType, loss_type, "loss_type")

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # All schedule arrays: float64, shape (T,).
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip its log to the value at t = 1.
        # (With a single step there is no t = 1; log(beta_0) stands in.)
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Variance choices of p(x_{t-1} | x_t).
        self.log_betas = np.log(betas)
        large = np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas.copy()
        self.fixed_large_variance = large
        self.fixed_large_log_variance = np.log(large)

        self._lookup_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ lookups

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Look up schedule array ``name`` at timesteps ``t``: (B,) -> (B, 1, ..., 1) broadcastable to ``x``.

        The float64 array is cast to float32 (float64 if ``x`` is float64) before
        indexing, as ADM does; cast copies are cached per device and dtype.
        """
        dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
        key = (name, t.device, dtype)
        table = self._lookup_cache.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=t.device, dtype=dtype)
            self._lookup_cache[key] = table
        return table[t].view(-1, *([1] * (x.ndim - 1)))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got {shape}")

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is called with (identity here; respacing maps them)."""
        return t

    def _call_model(
        self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict]
    ) -> tuple[torch.Tensor, Any]:
        return split_model_output(model(x, self._model_timesteps(t), **(model_kwargs or {})))

    # ---------------------------------------------------------- forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of ``q(x_t | x_0)``, each of ``x_start``'s shape."""
        self._check_t(t, x_start)
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = (1.0 - self._extract("alphas_cumprod", t, x_start)).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``.

        Args:
            x_start: (B, C, ...) clean data.
            t: (B,) timesteps.
            noise: optional standard normal noise of ``x_start``'s shape.
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior ``q(x_{t-1} | x_t, x_0)``.

        All three have ``x_t``'s shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} differs from x_t shape {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) * eps``."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v``."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def velocity(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0``."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`predict_xstart_from_eps`."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ---------------------------------------------------------- reverse process

    def _p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``p(x_{t-1} | x_t)`` from a raw model output ``(B, C or 2C, ...)``."""
        B, C = x.shape[:2]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        expected = (B, 2 * C if learned else C, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} != expected {expected} "
                f"({self.model_var_type.value} variance)"
            )

        if learned:
            model_output, var_values = torch.split(model_output, C, dim=1)  # 2 x (B, C, ...)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                # var_values in [-1, 1] interpolates between log(beta~_t) and log(beta_t).
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (var_values + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x).expand_as(x)
            log_variance = self._extract("fixed_large_log_variance", t, x).expand_as(x)
        else:
            variance = self._extract("posterior_variance", t, x).expand_as(x)
            log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = self.predict_xstart_from_v(x, t, model_output)
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Any]:
        """Apply the model to get ``p(x_{t-1} | x_t)`` and its prediction of ``x_0``.

        Args:
            model: callable ``model(x, t, **model_kwargs)`` returning a tensor or ``(tensor, extras)``.
            x: (B, C, ...) noisy input at time ``t``.
            t: (B,) timesteps.
            clip_denoised: clamp the predicted ``x_0`` to [-1, 1].
            denoised_fn: applied to the predicted ``x_0`` before clipping.
            model_kwargs: extra keyword arguments for the model (e.g. class labels ``y``).

        Returns:
            dict with ``"mean"``, ``"variance"``, ``"log_variance"``, ``"pred_xstart"``
            (each of ``x``'s shape) and ``"extras"`` (the model's extras or None).
        """
        self._check_t(t, x)
        model_output, extras = self._call_model(model, x, t, model_kwargs)
        out: dict[str, Any] = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        out["extras"] = extras
        return out

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]:
        """One ancestral (DDPM) step: sample ``x_{t-1} ~ p(x_{t-1} | x_t)``.

        ``noise`` (x's shape) is used instead of a fresh draw when given.

        Returns:
            dict with ``"sample"``, ``"pred_xstart"`` and ``"extras"``.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x.shape, x, generator) if noise is None else noise
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "extras": out["extras"]}

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]:
        """One DDIM step (Song et al. 2021, eq. 12); ``eta = 0`` is deterministic, ``eta = 1`` ~ DDPM.

        ``noise`` (x's shape) is used instead of a fresh draw when given.

        Returns:
            dict with ``"sample"``, ``"pred_xstart"`` and ``"extras"``.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from x_0 so that x_0-predicting models work too.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        # Noise is drawn even for eta = 0 so the random stream matches DiT's sampler.
        noise = _randn(x.shape, x, generator) if noise is None else noise
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        sample = mean_pred + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "extras": out["extras"]}

    # ------------------------------------------------------------ sample loops

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device | str] = None,
        progress: bool = True,
        callback: Optional[Callback] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Ancestral sampling from ``x_T`` down to ``x_0``; returns the final sample of ``shape``.

        Args:
            model: callable ``model(x, t, **model_kwargs)`` (e.g. ``model.forward_with_cfg``).
            shape: (B, C, ...) of the samples.
            noise: optional starting ``x_T`` of ``shape`` (else drawn from N(0, I)).
            clip_denoised: clamp predicted ``x_0`` to [-1, 1] (DiT samples latents with False).
            denoised_fn: applied to predicted ``x_0`` before clipping.
            model_kwargs: extra model keyword arguments.
            device: where to create samples (default: ``noise``'s or the model's device).
            progress: show a tqdm bar (never shown when stderr is not a TTY).
            callback: called after every step with the dict described in
                :meth:`p_sample_loop_progressive`.
            generator: optional ``torch.Generator`` for all random draws.
        """
        final = None
        for info in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
        ):
            if callback is not None:
                callback(info)
            final = info
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device | str] = None,
        progress: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[dict[str, Any]]:
        """Like :meth:`p_sample_loop` but yields after every step a dict with:

        - ``"i"``: the diffusion's step index, counting down from ``num_timesteps - 1`` to 0;
        - ``"step"``: the 0-based position in the loop; ``"num_steps"``: the loop length;
        - ``"t"``: (B,) the original timesteps the model saw at this step;
        - ``"sample"``: the new sample ``x_{t-1}``; ``"pred_xstart"``: the model's ``x_0``;
        - ``"extras"``: the model's extras (e.g. DC-DiT routing) or None.
        """
        yield from self._loop(
            self.p_sample, model, shape, noise, device, progress, "DDPM",
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, generator=generator),
            generator,
        )

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device | str] = None,
        progress: bool = True,
        eta: float = 0.0,
        callback: Optional[Callback] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """DDIM sampling from ``x_T`` to ``x_0``; same arguments as :meth:`p_sample_loop` plus ``eta``."""
        final = None
        for info in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
        ):
            if callback is not None:
                callback(info)
            final = info
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device | str] = None,
        progress: bool = True,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[dict[str, Any]]:
        """Like :meth:`ddim_sample_loop`, yielding per step the dict of :meth:`p_sample_loop_progressive`."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        yield from self._loop(
            self.ddim_sample, model, shape, noise, device, progress, "DDIM",
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                 eta=eta, generator=generator),
            generator,
        )

    def _loop(
        self,
        step_fn: Callable[..., dict],
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor],
        device: Optional[torch.device | str],
        progress: bool,
        desc: str,
        step_kwargs: dict,
        generator: Optional[torch.Generator],
    ) -> Iterator[dict[str, Any]]:
        """Shared reverse-time loop for the DDPM and DDIM samplers."""
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2:
            raise ValueError(f"shape must be a (B, C, ...) tuple, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from shape {shape}")
            device = noise.device if device is None else torch.device(device)
            img = noise.to(device)
        else:
            device = _resolve_device(model) if device is None else torch.device(device)
            img = torch.randn(shape, device=device, generator=generator)

        indices = range(self.num_timesteps - 1, -1, -1)
        for step, i in enumerate(_progress(indices, progress, desc)):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step_fn(model, img, t, **step_kwargs)
            img = out["sample"]
            yield {
                "i": i,
                "step": step,
                "num_steps": self.num_timesteps,
                "t": self._model_timesteps(t),
                "sample": img,
                "pred_xstart": out["pred_xstart"],
                "extras": out["extras"],
            }

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per-sample variational-bound term in bits per dimension, shape (B,).

        ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the
        discretised decoder NLL ``-log p(x_0 | x_1)`` at t == 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def mse_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) Min-SNR-gamma weights of the MSE term at timesteps ``t``.

        With SNR(t) = abar / (1 - abar): the x0 loss ``min(SNR, gamma) * |x0 - x0_hat|^2``
        rewritten in the model's target: ``min(SNR, gamma) / SNR`` for epsilon,
        ``min(SNR, gamma) / (SNR + 1)`` for v, ``min(SNR, gamma)`` for x0. Noisy
        steps keep weight 1 under epsilon prediction; the nearly clean steps,
        whose epsilon is hard to predict and worth little, are turned down.
        With ``min_snr_floor`` the x0 weight is ``clip(SNR, floor, gamma)``: under v
        the noisiest steps then weigh ``floor / (SNR + 1)`` ~ floor instead of ~SNR ~ 1e-4.
        """
        if self._mse_weights is None:  # (T,), built once
            snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
            w = np.clip(snr, self.min_snr_floor or 0.0, self.min_snr_gamma)
            w = {ModelMeanType.EPSILON: w / snr, ModelMeanType.VELOCITY: w / (snr + 1)}.get(self.model_mean_type, w)
            self._mse_weights = torch.as_tensor(w, dtype=torch.float32)
        if self._mse_weights.device != t.device:
            self._mse_weights = self._mse_weights.to(t.device)
        return self._mse_weights[t]  # indexed on t's device: no host sync

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]:
        """Per-sample training losses at timesteps ``t`` with one forward pass.

        With a learned variance and an MSE loss this is IDDPM's hybrid objective:
        ``loss = mse + vb`` where the VB term sees the mean prediction through a
        stop-gradient (it only trains the variance channels), scaled by
        ``num_timesteps / 1000`` for ``RESCALED_MSE``.

        Args:
            model: callable ``model(x_t, t, **model_kwargs)`` returning a tensor or ``(tensor, extras)``.
            x_start: (B, C, ...) clean data.
            t: (B,) timesteps.
            model_kwargs: extra model keyword arguments.
            noise: optional noise of ``x_start``'s shape (else drawn).

        Returns:
            dict with ``"loss"`` (B,), ``"mse"`` (B,) for MSE losses, ``"vb"`` (B,)
            whenever a VB term is computed, and ``"extras"`` (model extras or None).
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output, extras = self._call_model(model, x_t, t, model_kwargs)
        terms: dict[str, Any] = {}

        if self.loss_type.is_vb:
            out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False, denoised_fn=None)
            terms["vb"] = self._vb_terms_bpd(x_start, x_t, t, out)
            terms["loss"] = terms["vb"] * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else terms["vb"]
        else:
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                C = x_t.shape[1]
                if model_output.shape[1] != 2 * C:
                    raise ValueError(f"model output has {model_output.shape[1]} channels, expected {2 * C}")
                mean_output, var_values = torch.split(model_output, C, dim=1)
                # The VB term trains the variance only: stop the gradient into the mean.
                frozen = torch.cat([mean_output.detach(), var_values], dim=1)
                out = self._p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False, denoised_fn=None)
                vb = self._vb_terms_bpd(x_start, x_t, t, out)
                if self.loss_type == LossType.RESCALED_MSE:
                    vb = vb * (self.num_timesteps / 1000.0)
                terms["vb"] = vb
                model_output = mean_output
            if self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                target = self.velocity(x_start, t, noise)
            else:
                target = noise
            if model_output.shape != target.shape:
                raise ValueError(f"model output shape {tuple(model_output.shape)} != target {tuple(target.shape)}")
            terms["mse"] = mean_flat((target - model_output) ** 2)
            mse_term = terms["mse"] * self.mse_weight(t) if self.min_snr_gamma is not None else terms["mse"]
            terms["loss"] = mse_term + terms["vb"] if "vb" in terms else mse_term

        terms["extras"] = extras
        return terms


# ---------------------------------------------------------------------- helpers


def _randn(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Contiguous standard normal noise of ``shape`` with ``like``'s dtype and device.

    Always drawn contiguous, so the random stream does not depend on the memory
    layout of ``like`` (for contiguous tensors this equals ``randn_like``).
    """
    return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


def _resolve_device(model: ModelFn) -> torch.device:
    """The device of the model's first parameter (also for bound methods such as ``forward_with_cfg``)."""
    for owner in (model, getattr(model, "__self__", None)):
        params = getattr(owner, "parameters", None)
        if callable(params):
            try:
                return next(iter(params())).device
            except StopIteration:
                break
    return torch.device("cpu")


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    """Wrap in a tqdm bar when ``enabled`` and stderr is a terminal."""
    stderr = sys.stderr
    if not enabled or stderr is None or not getattr(stderr, "isatty", lambda: False)():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=len(iterable))
