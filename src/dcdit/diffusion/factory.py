"""``create_diffusion``: DiT's diffusion factory."""

from __future__ import annotations

from typing import Optional

from .gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from .respace import SectionCounts, SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule

__all__ = ["create_diffusion"]

# What a model's output can mean (the model config's ``prediction``) -> the diffusion's mean type.
MEAN_TYPES = {"epsilon": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}


def create_diffusion(
    timestep_respacing: Optional[SectionCounts],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    min_snr_gamma: Optional[float] = None,
    min_snr_floor: Optional[float] = None,
    prediction: Optional[str] = None,
) -> SpacedDiffusion:
    """Build the Gaussian diffusion with DiT's defaults.

    Args:
        timestep_respacing: steps to keep (see :func:`space_timesteps`), e.g. ``"250"``
            or ``"ddim50"``; ``None`` or ``""`` keeps all ``diffusion_steps``.
        noise_schedule: ``"linear"`` or ``"cosine"``.
        use_kl: train on the (rescaled) variational bound only.
        sigma_small: with a fixed variance, use the posterior variance instead of beta.
        predict_xstart: the model predicts x_0 instead of the noise.
        learn_sigma: the model outputs 2C channels, the extra C interpolating the log-variance.
        rescale_learned_sigmas: scale the VB term by ``diffusion_steps / 1000`` (RESCALED_MSE).
        diffusion_steps: T of the training process.
        min_snr_gamma: weight the MSE term by Min-SNR-gamma (e.g. 5.0); ``None`` (DiT) leaves it unweighted.
        min_snr_floor: clamp that weight (on the x0 error) from below, e.g. 1.0; ``None``: Min-SNR as published.
        prediction: what the model's output means: ``"epsilon"`` (DiT), ``"x0"`` or ``"v"``;
            ``None`` follows ``predict_xstart``.
    """
    if prediction is None:
        prediction = "x0" if predict_xstart else "epsilon"
    if prediction not in MEAN_TYPES:
        raise ValueError(f"prediction must be one of {', '.join(MEAN_TYPES)}, got {prediction!r}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=MEAN_TYPES[prediction],
        model_var_type=var_type,
        loss_type=loss_type,
        min_snr_gamma=min_snr_gamma,
        min_snr_floor=min_snr_floor,
    )
