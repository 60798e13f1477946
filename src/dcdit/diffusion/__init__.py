"""Gaussian diffusion (DiT / ADM formulation): schedules, training losses, DDPM and DDIM sampling."""

from .factory import create_diffusion
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, split_model_output
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import betas_for_alpha_bar, cosine_beta_schedule, get_named_beta_schedule, linear_beta_schedule

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "split_model_output",
    "get_named_beta_schedule",
    "linear_beta_schedule",
    "cosine_beta_schedule",
    "betas_for_alpha_bar",
    "mean_flat",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]
