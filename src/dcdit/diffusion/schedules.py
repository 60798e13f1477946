"""Beta (noise) schedules for discrete-time Gaussian diffusion.

Schedules are returned as float64 numpy arrays: every derived quantity of the
diffusion (cumulative products, posterior coefficients, ...) is computed in
float64 and only cast to the working dtype when looked up per timestep, as in
ADM / DiT.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["linear_beta_schedule", "cosine_beta_schedule", "betas_for_alpha_bar", "get_named_beta_schedule"]


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Linear schedule of Ho et al. (2020), as in ADM / DiT.

    Betas go linearly from ``1e-4 * s`` to ``0.02 * s`` with ``s = 1000 / num_timesteps``
    so that the schedule has the same shape for any number of steps.

    Returns:
        float64 array of shape ``(num_timesteps,)``.
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[np.ndarray], np.ndarray], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(s)``, ``s`` in [0, 1], into betas.

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``.

    Args:
        num_timesteps: T, the number of betas.
        alpha_bar: vectorised function giving the cumulative product of ``1 - beta``.
        max_beta: upper clip, below 1 to avoid a singularity at the end.

    Returns:
        float64 array of shape ``(T,)``.
    """
    _check_num_timesteps(num_timesteps)
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # (T + 1,)
    ab = alpha_bar(s)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def cosine_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021) ("squaredcos_cap_v2")."""
    return betas_for_alpha_bar(
        num_timesteps, lambda s: np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    )


_SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "squaredcos_cap_v2": cosine_beta_schedule,
}


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the named schedule: ``"linear"`` or ``"cosine"`` (alias ``"squaredcos_cap_v2"``)."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
    return _SCHEDULES[name](num_timesteps)


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
