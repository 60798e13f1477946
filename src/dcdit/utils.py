"""Small helpers every layer may use: atomic file writes, JSON, unwrapping model wrappers, finiteness,
interleaved wall-clock timing.

This module imports nothing from dcdit, so data, viz, training config and the
checkpoint code can share it without depending on the models.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["NonFiniteError", "atomic_write", "first_nonfinite", "round_robin_seconds", "save_json", "unwrap"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600: give the usual new-file mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class NonFiniteError(ValueError):
    """Weights, a loss or model outputs hold NaN or inf (a ValueError: the CLI prints one line)."""


@torch.no_grad()
def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the first floating-point tensor holding a NaN or inf (in ``tensors``' order), else None.

    One host sync per device, however many tensors: each tensor's ``isfinite().all()``
    stays on its device and the flags are read back together.
    """
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]
    if not names:
        return None
    flags = [torch.isfinite(tensors[k]).all() for k in names]
    devices = {f.device for f in flags}
    if len(devices) == 1:
        ok = torch.stack(flags).tolist()
    else:
        ok = [bool(f) for f in flags]
    return next((k for k, good in zip(names, ok) if not good), None)


def round_robin_seconds(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        before: Optional[Callable[[str], None]] = None,
                        after: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Wall-clock seconds of every callable: ``warmup`` untimed rounds, then ``repeats`` round-robin rounds.

    Interleaving spreads slow drifts in machine load over every setup instead of the last one.
    ``before(name)`` / ``after(name)`` run around each timed call, outside the timing (e.g. a CUDA sync).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(warmup):
        for f in calls.values():
            f()
    for _ in range(repeats):
        for k, f in calls.items():
            if before:
                before(k)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            if after:
                after(k)
    return times
