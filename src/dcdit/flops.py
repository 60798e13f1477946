"""FLOP accounting.

Two conventions, both reported as **MACs = FLOPs / 2** ("GMACs") unless a
name says FLOPs (2 FLOPs per multiply-accumulate):

* ``attention=True`` (default, used by every dcdit report): linear layers,
  convolutions and the attention products QK^T and AV. This reproduces the
  DiT paper's table exactly (DiT-S/2 6.06, B/2 23.0, XL/2 118.6 GMACs at
  256px), whose "Gflops" are MACs.
* ``attention=False``: linear layers and convolutions only, which is what
  PyTorch's FlopCounterMode reports on CPU, where its registry has no entry
  for the CPU attention kernel (DiT-S/2 5.45, B/2 21.8, XL/2 114.4).

Norms, activations, softmax and elementwise ops are counted by neither.
DC-DiT's paper figures are FLOPs (2 per MAC) summed over 250 sampling steps.

Attention is counted per call, so a variable-length backend that attends
within each sample's real segment is charged sum_i L_i^2, not B * max(L)^2.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dcdit.models import DCDIT_PRESETS, DCDiT, DCDiTConfig

_aten = torch.ops.aten


def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode does not know."""
    return sdpa_flop_count(query, key, value)


# Attention kernels FlopCounterMode misses on some devices (counted when attention=True).
_EXTRA_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}

# Top-level child module name -> component label, for models that do not
# declare their own mapping via ``flop_components()``.
DEFAULT_COMPONENTS = {
    "x_embedder": "embeddings",
    "t_embedder": "embeddings",
    "y_embedder": "embeddings",
    "blocks": "main network",
    "final_layer": "final layer",
}


@dataclass
class FlopReport:
    """FLOPs of one counted call, total and per component (all in FLOPs = 2 x MACs)."""

    total: int
    by_component: dict[str, int] = field(default_factory=dict)
    batch_size: int = 1

    @property
    def macs(self) -> int:
        return self.total // 2

    @property
    def gmacs_per_image(self) -> float:
        return self.total / 2e9 / self.batch_size

    @property
    def gflops_per_image(self) -> float:
        return self.total / 1e9 / self.batch_size

    def __add__(self, other: "FlopReport") -> "FlopReport":
        comps = defaultdict(int, self.by_component)
        for k, v in other.by_component.items():
            comps[k] += v
        return FlopReport(self.total + other.total, dict(comps), self.batch_size)

    def table(self, unit: str = "GMACs") -> str:
        """A small per-image table, largest component first."""
        div = (2e9 if unit == "GMACs" else 1e9) * self.batch_size
        rows = sorted(self.by_component.items(), key=lambda kv: -kv[1])
        width = max([len(k) for k, _ in rows] + [9])
        lines = [f"{'component':<{width}}  {unit + '/image':>14}  share"]
        for k, v in rows:
            lines.append(f"{k:<{width}}  {v / div:>14.4f}  {100 * v / max(self.total, 1):5.1f}%")
        lines.append(f"{'total':<{width}}  {self.total / div:>14.4f}  100.0%")
        return "\n".join(lines)


def _component_map(model: nn.Module) -> dict[str, str]:
    fn = getattr(model, "flop_components", None)
    return dict(fn()) if callable(fn) else dict(DEFAULT_COMPONENTS)


def _is_attention(op) -> bool:
    return "attention" in str(op)


def count_flops(
    fn: Callable[..., Any], model: Optional[nn.Module] = None, batch_size: int = 1, attention: bool = True
) -> tuple[FlopReport, Any]:
    """Run ``fn()`` under a FLOP counter; attribute FLOPs to ``model``'s components.

    Returns ``(report, fn's output)``. ``attention`` selects the convention
    (module docstring). FLOPs of ops run directly in the model's own
    ``forward`` (outside any child module) are labelled "other".
    """
    with FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_ATTENTION) as counter, torch.no_grad():
        # (inference attention sees the counter and counts the sequences' own work, not its padded
        # buckets': dcdit.attention.backends._flop_counter_watching)
        out = fn()
    counts = counter.get_flop_counts()
    keep = lambda ops: int(sum(v for op, v in ops.items() if attention or not _is_attention(op)))
    total = keep(counts.get("Global", {}))
    by_component: dict[str, int] = defaultdict(int)
    if model is not None:
        mapping = _component_map(model)
        prefix = type(model).__name__ + "."
        # Counts are cumulative (a module includes its children). For each
        # top-level child take its shallowest entries: the child itself, or the
        # items of a ModuleList (which has no forward of its own).
        shallowest: dict[str, int] = {}
        for name in counts:
            if name.startswith(prefix):
                parts = name[len(prefix):].split(".")
                shallowest[parts[0]] = min(shallowest.get(parts[0], 99), len(parts))
        for name, ops in counts.items():
            if name.startswith(prefix):
                parts = name[len(prefix):].split(".")
                if len(parts) == shallowest[parts[0]]:
                    by_component[mapping.get(parts[0], parts[0])] += keep(ops)
        rest = total - sum(by_component.values())
        if rest:
            by_component["other"] += rest
    return FlopReport(total, dict(by_component), batch_size), out


def count_model_flops(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, attention: bool = True, **kwargs
) -> tuple[FlopReport, Any]:
    """FLOPs of ``model(x, t, y, **kwargs)`` per component (batch = len(x))."""
    return count_flops(lambda: model(x, t, y, **kwargs), model, batch_size=x.shape[0], attention=attention)


# --------------------------------------------------------------------------- #
#                       Analytic counts (MACs), for checking                  #
# --------------------------------------------------------------------------- #

def dit_block_macs(tokens: int, hidden: int, mlp_ratio: float = 4.0, attention: bool = True) -> int:
    """MACs of one DiT block on one sequence of ``tokens`` tokens (adaLN included)."""
    D, T, H = hidden, tokens, int(hidden * mlp_ratio)
    ada = D * 6 * D
    qkv = T * D * 3 * D
    attn = 2 * T * T * D if attention else 0  # QK^T and AV
    proj = T * D * D
    mlp = 2 * T * D * H
    return ada + qkv + attn + proj + mlp


def dit_macs(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
             mlp_ratio: float = 4.0, learn_sigma: bool = True, freq_dim: int = 256, attention: bool = True,
             **_: Any) -> int:
    """Analytic MACs of one DiT forward on one image."""
    T = (input_size // patch_size) ** 2
    D = hidden_size
    out_ch = in_channels * (2 if learn_sigma else 1)
    embed = T * D * in_channels * patch_size**2 + freq_dim * D + D * D
    blocks = depth * dit_block_macs(T, D, mlp_ratio, attention)
    final = D * 2 * D + T * D * patch_size**2 * out_ch
    return embed + blocks + final


def nominal_dcdit_report(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> dict:
    """Params and MACs of a DC-DiT preset when its main network sees exactly L/N tokens.

    A DC-DiT's cost depends on what its router keeps, so a registry listing
    needs a nominal figure. The scaffold (stem, encoder, routing, chunk,
    dechunk, decoder, final layer) is counted on a real forward of the preset
    with a one-block main network (its cost does not depend on depth; the
    dechunk's share is taken at the untrained router's choice, about L/4);
    the main network is counted analytically at K = L/N tokens per image.
    Single-stage layouts only. Returns params, kept K, L and MACs per image.
    """

    preset = dict(DCDIT_PRESETS[name])
    layout = preset["arch_layout"]
    if len(layout) != 3 or len(layout[1]) != 1 or not re.fullmatch(r"D\d+", str(layout[1][0])):
        raise ValueError(f"{name}: nominal FLOPs are defined for single-stage layouts, got {layout}")
    depth = int(layout[1][0][1:])
    common = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    with torch.device("meta"):
        params = sum(p.numel() for p in DCDiT(DCDiTConfig(**preset, **common)).parameters())
    shallow = DCDiT(DCDiTConfig(**{**preset, "arch_layout": [layout[0], ["D1"], layout[2]]}, **common)).eval()
    x = torch.randn(1, in_channels, input_size, input_size)
    report, _ = count_model_flops(shallow, x, torch.tensor([500]), torch.tensor([0]))
    scaffold = {k: v // 2 for k, v in report.by_component.items() if k != "main network"}
    L = (input_size // shallow.config.get("patch_size", 1)) ** 2
    N = preset.get("downsample_factor", 4.0)
    N = N[0] if isinstance(N, (list, tuple)) else N
    K = max(2, round(L / float(N)))
    D = preset["d_model"][-1]
    main = depth * dit_block_macs(K, D)
    return dict(params=params, kept=K, L=L, scaffold_macs=sum(scaffold.values()), main_macs=main,
                macs=sum(scaffold.values()) + main, by_component={**scaffold, "main network": main})
