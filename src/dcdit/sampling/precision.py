"""One precision setting for sampling: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``.

The network calls of a sampling run are put under ``torch.autocast`` on the
sampling device (bf16 / fp16) or left alone (fp32); the diffusion or
scheduler update between them always runs in fp32 (the network output is
cast back). DC-DiT's router and dechunk keep their own fp32 islands under
autocast (the model's ``fp32`` options), so only the transformer matmuls run
in reduced precision.

``auto`` picks bf16 where the hardware computes it natively and fp32
elsewhere:

* CUDA: ``torch.cuda.is_bf16_supported()`` (compute capability >= 8.0);
* CPU: the AVX512-BF16 or AMX-BF16 instructions (x86), BF16 (Arm). torch's
  ``get_cpu_capability()`` names AMX / BF16 when its kernels use them; else
  the CPU flags in ``/proc/cpuinfo`` decide. On CPUs without them oneDNN
  emulates bf16, which is slower than fp32, so ``auto`` stays in fp32.

fp32 is exact: ``precision="fp32"`` runs the network as before (no autocast).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager, Optional

import torch

__all__ = ["PRECISIONS", "cpu_supports_bf16", "resolve_precision", "autocast_for", "precision_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (Linux names) and Arm ("Features: ... bf16")


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 / AMX-BF16 / Arm BF16)."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except (AttributeError, RuntimeError):  # very old torch
        capability = ""
    if "AMX" in capability or "BF16" in capability:
        return True
    return bool(_cpuinfo_flags() & _CPU_BF16_FLAGS)


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def resolve_precision(precision: str, device: Optional[torch.device | str] = None) -> str:
    """``precision`` with ``auto`` resolved for ``device`` (default CPU): ``fp32``, ``bf16`` or ``fp16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"  # other backends (mps, xpu, ...): no claim about their bf16 speed


def precision_dtype(precision: str, device: Optional[torch.device | str] = None) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32)."""
    return _DTYPES[resolve_precision(precision, device)]


def autocast_for(precision: str, device: Optional[torch.device | str] = None) -> ContextManager:
    """``torch.autocast`` on ``device``'s type with ``precision``'s dtype, or a no-op for fp32."""
    device = torch.device("cpu" if device is None else device)
    dtype = precision_dtype(precision, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
