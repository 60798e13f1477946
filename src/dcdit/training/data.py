"""Deterministic data order: which samples every process reads at every step.

The training stream is the concatenation of per-epoch permutations, each
drawn from ``(seed, epoch)``. Step ``s`` consumes stream items
``[s * G, (s + 1) * G)`` (``G`` = global batch), so the position in the data is
a pure function of the step: a resumed run reads exactly what an uninterrupted
run would have, mid-epoch included, whatever the number of processes.

Inside a step the global batch is cut into ``grad_accum`` micro-steps, each
cut into ``world_size`` rank slices: global position ``p`` of a step belongs
to micro-step ``p // (world * b)`` and rank ``(p // b) % world`` (``b`` = local
micro-batch). The trainer draws noise, timesteps and label dropout per global
position the same way, so 1 process x batch 8 and 2 processes x batch 4 see
the same samples with the same noise.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepStream:
    """Dataset indices of each step's global batch, from ``(seed, epoch)`` permutations."""

    def __init__(self, dataset_len: int, global_batch: int, seed: int):
        if dataset_len <= 0:
            raise ValueError("the training data set is empty")
        self.n, self.global_batch, self.seed = int(dataset_len), int(global_batch), int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.n)
        return self._cache[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset within the epoch) at the start of ``step``."""
        k = step * self.global_batch
        return k // self.n, k % self.n

    def global_indices(self, step: int) -> np.ndarray:
        """The ``global_batch`` dataset indices of ``step``, in global-position order."""
        k = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, offsets = k // self.n, k % self.n
        out = np.empty_like(k)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def local_slice(micro: int, rank: int, world_size: int, micro_batch: int) -> slice:
    """Global positions of one rank's micro-batch within a step."""
    start = (micro * world_size + rank) * micro_batch
    return slice(start, start + micro_batch)


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices) from ``start_step`` to ``end_step``."""

    def __init__(self, stream: StepStream, start_step: int, end_step: int, rank: int, world_size: int,
                 grad_accum: int):
        self.stream, self.start_step, self.end_step = stream, int(start_step), int(end_step)
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro_batch = stream.global_batch // (world_size * grad_accum)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            idx = self.stream.global_indices(step)
            for m in range(self.grad_accum):
                yield idx[local_slice(m, self.rank, self.world_size, self.micro_batch)].tolist()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM and SIGINT.

    Schedulers (SLURM, Kubernetes, ``docker stop``) and Ctrl-C signal the whole
    process group. The training process checkpoints on them and then shuts its
    workers down; a worker killed by the signal would abort the run before that
    ("DataLoader worker ... is killed by signal") and lose the work since the
    last checkpoint.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
