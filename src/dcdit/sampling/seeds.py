"""Per-sample seeds and class labels derived from a global sample index.

Every sample ``k`` of a run owns a random stream seeded from ``(seed, k)``:
its starting noise and every per-step noise draw come from that stream, and
its class label is a function of ``k``. A sample is therefore the same
whatever batch or rank it lands in (up to floating-point reduction order in
the network), so results are reproducible across batch sizes and world sizes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["derive_seed", "SampleNoise", "labels_for_indices", "parse_classes", "shard_indices"]


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (well mixed, collision-free in practice)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleNoise:
    """One ``torch.Generator`` per sample: initial noise and per-step noise, batch-invariant.

    Args:
        seed: the run's global seed.
        indices: global indices of the samples in this batch.
        shape: (C, H, W) of one sample.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, int(k))) for k in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, C, H, W) standard normal noise, the next draw of every sample's stream."""
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(device=device or "cpu", dtype=dtype)


def parse_classes(text: Optional[str], num_classes: int) -> Optional[list[int]]:
    """``"1,2,3"`` -> [1, 2, 3] (checked against ``num_classes``); None or "" -> None (all classes)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        classes = [int(c) for c in str(text).split(",") if c.strip() != ""]
    except ValueError:
        raise ValueError(f"--classes: expected comma-separated integers such as 1,2,3, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: label(s) {bad} outside the model's range 0..{num_classes - 1}")
    if not classes:
        raise ValueError(f"--classes: no labels in {text!r}")
    return classes


def labels_for_indices(indices: Sequence[int], num_classes: int, classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Class label of each global index: ``classes`` cycled, or all classes 0..num_classes-1 cycled."""
    idx = np.asarray(indices, dtype=np.int64)
    table = np.arange(num_classes, dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
    if table.size == 0:
        raise ValueError("no classes to sample from")
    return table[idx % table.size]


def shard_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Global indices this rank produces: ``rank, rank + world_size, ...`` (disjoint, covering 0..N-1)."""
    if num_samples < 1:
        raise ValueError(f"number of samples must be positive, got {num_samples}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return np.arange(rank, num_samples, world_size, dtype=np.int64)
