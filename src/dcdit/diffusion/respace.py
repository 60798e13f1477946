"""Timestep respacing: run a diffusion trained on T steps with fewer sampling steps.

A respaced diffusion keeps a subset ``S`` of the original timesteps and
redefines its betas so that its cumulative products ``abar`` match the
original ones at the kept steps. The model is always called with the
*original* timesteps (DiT uses ``rescale_timesteps=False``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]

SectionCounts = Union[str, int, Sequence[int]]


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> list[int]:
    """Choose which of ``num_timesteps`` original steps to keep.

    The original process is cut into ``len(counts)`` equal sections (the first
    ``num_timesteps % len(counts)`` sections one step longer) and section ``k``
    is strided evenly to ``counts[k]`` steps, first and last step included.

    Args:
        num_timesteps: T, the number of steps of the original process.
        section_counts: steps per section: a list of ints, an int, or a string
            such as ``"250"`` or ``"10,20,30"``; ``"ddimN"`` uses the integer
            stride of the DDIM paper giving exactly N steps ``0, s, 2s, ...``.

    Returns:
        The sorted kept original timesteps.

    Raises:
        ValueError: if the specification cannot be parsed or realised.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    spec = section_counts

    def fail(reason: str) -> ValueError:
        return ValueError(f"invalid timestep respacing {spec!r}: {reason}")

    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            desired = _parse_count(text[len("ddim"):], fail)
            strides = np.arange(1, num_timesteps + 1)
            matches = strides[-(-num_timesteps // strides) == desired]  # ceil(T / s) == N
            if matches.size == 0:
                raise fail(f"no integer stride gives exactly {desired} of {num_timesteps} steps")
            return list(range(0, num_timesteps, int(matches[0])))
        counts = [_parse_count(part, fail) for part in text.split(",")]
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        counts = [_parse_count(spec, fail)]
    elif isinstance(spec, Sequence) and len(spec) > 0:
        counts = [_parse_count(c, fail) for c in spec]
    else:
        raise fail("expected a string, an int or a non-empty list of ints")

    if len(counts) > num_timesteps:
        raise fail(f"{len(counts)} sections exceed {num_timesteps} steps")
    size_per, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count > size:
            raise fail(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index by repeated addition and round half to
        # even, exactly as the reference loop does (so the kept steps match it).
        positions = np.cumsum(np.concatenate([[0.0], np.full(count - 1, stride)]))
        steps.extend((start + np.round(positions).astype(np.int64)).tolist())
        start += size
    return sorted(set(steps))


def _parse_count(value: Any, fail) -> int:
    """A positive int from an int or a decimal string, else ``fail(...)``."""
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise fail(f"{value!r} is not a positive integer")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise fail(f"{value!r} is not a positive integer")
    return int(value)


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` that keeps only ``use_timesteps`` of a base process.

    Internally steps are indexed ``0 .. len(use_timesteps) - 1``; the model is
    called with ``timestep_map[index]``, the original timestep.

    Args:
        use_timesteps: original timesteps to keep (any iterable of ints in ``[0, T)``).
        betas: the betas of the base process (length T).
        **kwargs: ``model_mean_type``, ``model_var_type``, ``loss_type`` as for
            :class:`GaussianDiffusion`.
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas: Sequence[float] | np.ndarray, **kwargs: Any) -> None:
        base = GaussianDiffusion(betas=betas, **kwargs)
        kept = sorted({int(s) for s in use_timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be non-empty and within [0, {base.num_timesteps}), got {kept[:3]}...")
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(kept)
        # New betas reproduce the base abar at the kept steps: beta'_k = 1 - abar[s_k] / abar[s_{k-1}].
        abar = base.alphas_cumprod[kept]
        abar_prev = np.append(1.0, abar[:-1])
        super().__init__(betas=1.0 - abar / abar_prev, **kwargs)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)  # (S,)
        self._map_cache: dict[torch.device, torch.Tensor] = {}

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map respaced indices (B,) to the original timesteps (B,)."""
        table = self._map_cache.get(t.device)
        if table is None:
            table = self._map_cache[t.device] = self.timestep_map.to(t.device)
        return table[t]
