"""DC-DiT configuration: the reference's fields in one flat dataclass, plus named presets.

Field names follow the reference (``HNetConfig`` + ``ModelConfig`` + the data
and training fields the model needs). ``arch_layout`` is H-Net's recursive
layout: ``[encoder, inner, decoder]`` per chunking stage, ``[main]`` at the
innermost stage; strings are runs of blocks, ``c``/``C`` = conv ResBlock
(2D on the outer grid, 1D on inner sequences), ``D`` = DiT block,
``d`` = attention-only DiT block. E.g. ``["c2", ["D12"], "c2"]``.

Presets (``DCDIT_PRESETS``): DC-DiT-{S,B,L,XL}-N{4,16}. B is the reference's
``configs/DCDiT-B-N4.yaml``: 2 conv ResBlocks at width D/4, 12 DiT blocks at
D = 768 with 12 heads, 2 conv ResBlocks. S/L/XL keep that scaffold (c2 / c2,
``enc_dec_dim_factor`` 4) and take width, heads and depth from DiT-S/L/XL
(384/6/12, 1024/16/24, 1152/16/28), so the main network is the matching DiT's
block stack and a DiT checkpoint upcycles into it. N = 4 and N = 16 share
the architecture; they differ only in the ratio-loss target
``downsample_factor`` (the paper compares both against the iso-parameter DiT).
DC-DiT-MNIST-N4 is the CPU-scale model of the reproduction (32x32 pixels,
patch 2, 10 blocks at width 128), which the shipped MNIST DiTs upcycle into.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from dcdit.chunking.routing import check_router_mode

_LAYOUT_RE = re.compile(r"^(?:[cCdD]\d+)+$")

# What a model's output can mean (config key ``prediction``); the sampler and the loss read it
# (``dcdit.diffusion.create_diffusion(prediction=...)``): the noise (DiT), the clean image, or
# v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0.
PREDICTIONS = ("epsilon", "x0", "v")


def check_prediction(prediction: Any) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


@dataclass
class StagePlan:
    """Derived widths of one stage (see :meth:`DCDiTConfig.stages`)."""

    index: int
    d_model: int  # DiT block width (and conditioning width of stage 0)
    num_heads: int
    enc_dim: int  # width of this stage's input/output (encoder in, decoder out)
    routing_dim: Optional[int]  # width at which routing/chunk/dechunk run (= next stage's enc_dim)
    encoder: Optional[str]  # layout strings; None at the innermost stage
    decoder: Optional[str]
    main: Optional[str]  # innermost stage only
    innermost: bool


@dataclass
class DCDiTConfig:
    # ---- data ----
    input_size: Union[int, tuple[int, int]] = 32  # latent side, or (height, width) for non-square inputs
    patch_size: int = 1  # stem stride: 1 = the reference (3x3 'same' conv, one token per latent pixel);
    #                      p > 1 = a p x p patchify conv (pixel space, large images)
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (adds a null class row)
    learn_sigma: bool = True  # predict variances too: out_channels = 2 * in_channels
    # ---- architecture (the reference's HNetConfig / ModelConfig fields) ----
    arch_layout: list = field(default_factory=lambda: ["c2", ["D12"], "c2"])
    d_model: list = field(default_factory=lambda: [768, 768])  # width per stage
    num_heads: list = field(default_factory=lambda: [12, 12])  # attention heads per stage
    enc_dec_dim_factor: Optional[list] = field(default_factory=lambda: [4, None])  # encoder/decoder width
    #                      d_model[s] // factor[s] per stage (None = no reduction; innermost must be None)
    mlp_ratio: float = 4.0
    dechunk_kernel_sigma: float = 1.0  # Gaussian smoothing sigma in grid units (2.0 at 512px)
    fp32_router_dechunk: bool = True  # router and dechunk run in fp32 with autocast off
    # ---- beyond the reference (defaults reproduce it) ----
    norm_groups: int = 32  # GroupNorm groups in the conv ResBlocks
    router_norm_groups: int = 8  # GroupNorm groups in the router's scorer
    router_bias_init: float = -1.1  # initial bias of the router's last conv (p ~ 0.25)
    router_mode: str = "learned"  # "learned": the spatial-predictability router (the reference). Controls
    #                      that isolate its contribution: "grid" keeps a regular lattice of 1 token in N,
    #                      "random" a random 1/N per sample and step (N = downsample_factor of the stage;
    #                      see dcdit.chunking.fixed_routing); the router's parameters stay, unused
    router_floor: int = 0  # learned router only: also keep, always, a fixed lattice of 1 outer-grid token in
    #                      this many (p = 1 there, like the forced first token), so the main network sees the
    #                      whole image at every step and the router spends the rest of its share; 0: none
    #                      (the reference). Must exceed the stage's N (the floor is part of the 1/N share)
    attn_qkv_bf16: bool = False  # reference quirk: its flash-attn path rounds q, k, v to bf16 even in
    #                      fp32 runs; True reproduces its numbers (set by dcdit.compat loaders)
    # ---- training target (not used by the forward pass) ----
    downsample_factor: Union[float, list] = 4.0  # ratio-loss target N (one per chunking stage, or one for all)
    prediction: str = "epsilon"  # what the first C output channels mean: "epsilon" (DiT), "x0" or "v"

    def __post_init__(self) -> None:
        if isinstance(self.input_size, list):
            self.input_size = tuple(self.input_size)
        self.stages()  # validates

    # ------------------------------------------------------------------ #
    @property
    def input_hw(self) -> tuple[int, int]:
        s = self.input_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.input_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_chunk_stages(self) -> int:
        return len(self.stages()) - 1

    def stages(self) -> list[StagePlan]:
        """Validate the layout and derive every stage's widths (raises ValueError on bad configs)."""
        s = self.input_size
        if isinstance(s, bool) or not (
            isinstance(s, int) or (isinstance(s, tuple) and len(s) == 2 and all(isinstance(v, int) for v in s))
        ):
            raise ValueError(f"input_size must be an int or (height, width), got {s!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {self.patch_size!r}")
        h, w = self.input_hw
        if h < 1 or w < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {(h, w)} must be positive and divisible by patch_size {self.patch_size}")
        for name in ("in_channels", "num_classes", "norm_groups", "router_norm_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}")
        check_prediction(self.prediction)
        check_router_mode(self.router_mode)
        if self.router_floor:
            if isinstance(self.router_floor, bool) or not isinstance(self.router_floor, int) or self.router_floor < 2:
                raise ValueError(f"router_floor must be 0 (none) or a whole number >= 2, got {self.router_floor!r}")
            if self.router_mode != "learned":
                raise ValueError(f"router_floor is for the learned router; router_mode is {self.router_mode!r}")
            if not self.router_floor > self.stage_N(0):
                raise ValueError(f"router_floor {self.router_floor} must exceed the first stage's N = "
                                 f"{self.stage_N(0):g} (the floor keeps 1 token in router_floor, inside the 1/N share)")
        if not self.mlp_ratio > 0 or not self.dechunk_kernel_sigma > 0:
            raise ValueError("mlp_ratio and dechunk_kernel_sigma must be positive")

        layouts = []  # per stage: (encoder, decoder) or (main,)
        node = self.arch_layout
        while True:
            if not isinstance(node, list) or len(node) not in (1, 3):
                raise ValueError(f"arch_layout levels must be [encoder, [...], decoder] or [main], got {node!r}")
            if len(node) == 1:
                layouts.append((node[0],))
                break
            layouts.append((node[0], node[2]))
            node = node[1]
        for parts in layouts:
            for part in parts:
                if not isinstance(part, str) or not _LAYOUT_RE.match(part):
                    raise ValueError(f"arch_layout entry {part!r} must be runs like 'c2', 'D12' (letters c, C, d, D)")
        n = len(layouts)
        for name in ("d_model", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and x > 0 for x in v):
                raise ValueError(f"{name} must list {n} positive ints (one per stage of arch_layout), got {v!r}")
        factors = self.enc_dec_dim_factor or []
        if not isinstance(factors, list) or len(factors) > n:
            raise ValueError(f"enc_dec_dim_factor must be None or a list of at most {n} entries, got {factors!r}")
        factors = list(factors) + [None] * (n - len(factors))
        for f in factors:
            if f is not None and (not isinstance(f, int) or f < 1):
                raise ValueError(f"enc_dec_dim_factor entries must be positive ints or None, got {f!r}")
        if factors[-1] not in (None, 1):
            raise ValueError("enc_dec_dim_factor of the innermost stage must be None (its blocks run at d_model)")
        n_chunk = n - 1
        ds = self.downsample_factor
        ds_list = ds if isinstance(ds, list) else [ds]
        if not all(isinstance(x, (int, float)) and x > 1 for x in ds_list) or (
            isinstance(ds, list) and len(ds) != n_chunk
        ):
            raise ValueError(f"downsample_factor must be a number > 1 or a list of {n_chunk} of them, got {ds!r}")
        if self.router_mode == "grid" and any(float(x) != int(x) for x in ds_list):
            raise ValueError(f"router_mode 'grid' keeps 1 token in N on a lattice: downsample_factor must be "
                             f"whole, got {ds!r}")

        enc = [self.d_model[i] // (factors[i] or 1) for i in range(n)]
        plans = []
        for i, parts in enumerate(layouts):
            inner = i == n - 1
            plans.append(StagePlan(
                index=i, d_model=self.d_model[i], num_heads=self.num_heads[i], enc_dim=enc[i],
                routing_dim=None if inner else enc[i + 1],
                encoder=None if inner else parts[0], decoder=None if inner else parts[1],
                main=parts[0] if inner else None, innermost=inner,
            ))
        for p in plans:
            if p.d_model % p.num_heads:
                raise ValueError(f"d_model[{p.index}] = {p.d_model} is not divisible by num_heads[{p.index}] = {p.num_heads}")
            if not p.innermost and p.routing_dim // 4 % self.router_norm_groups:
                raise ValueError(
                    f"stage {p.index} routes at width {p.routing_dim}: its quarter must be divisible by "
                    f"router_norm_groups = {self.router_norm_groups}"
                )
        if self.d_model[-1] % 4:
            raise ValueError(f"the innermost d_model {self.d_model[-1]} must be divisible by 4 (2D sin-cos positions)")
        return plans

    # ------------------------------------------------------------------ #
    def stage_N(self, stage: int) -> float:
        """The target compression N (``downsample_factor``) of chunking stage ``stage``."""
        ds = self.downsample_factor
        return float(ds[stage] if isinstance(ds, list) else ds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists); :meth:`from_dict` inverts it.

        ``router_mode`` and ``router_floor`` are written only when they are not their defaults
        ("learned", 0), so the configs of reference models read as before the keys existed.
        """
        d = dataclasses.asdict(self)
        if d["router_mode"] == "learned":
            del d["router_mode"]
        if not d["router_floor"]:
            del d["router_floor"]
        if isinstance(d["input_size"], tuple):
            d["input_size"] = list(d["input_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DCDiTConfig":
        d = dict(d)
        if d.get("arch", "dcdit") != "dcdit":
            raise ValueError(f"not a DC-DiT config: arch = {d['arch']!r}")
        d.pop("arch", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, sorted(names), n=1))
                     else k for k in unknown]
            raise ValueError(f"unknown DC-DiT config key(s): {', '.join(hints)}")
        return cls(**d)


def _preset(depth: int, width: int, heads: int, n: float) -> dict:
    return dict(
        arch_layout=["c2", [f"D{depth}"], "c2"], d_model=[width, width], num_heads=[heads, heads],
        enc_dec_dim_factor=[4, None], downsample_factor=float(n),
    )


# DiT's model sizes, name -> (depth, hidden_size, num_heads): the DiT registry (models/dit.py) and the
# main networks of the DC-DiT presets.
MODEL_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DCDIT_PRESETS: dict[str, dict] = {
    f"DC-DiT-{size}-N{n}": _preset(d, w, h, n) for size, (d, w, h) in MODEL_SIZES.items() for n in (4, 16)
}
# The CPU-scale DC-DiT of the v2 reproduction (`pretrained:mnist-repro-dcdit-n4`): a 2x2 patchify stem
# (32x32 pixels -> a 16x16 grid), one conv ResBlock each side at width 128 / 8, and a main network of
# 10 DiT blocks at width 128 with 4 heads: the block stack of `pretrained:mnist-dit4` / `mnist-dit2`,
# so those upcycle into it (`dcdit upcycle --dit pretrained:mnist-dit4 --preset DC-DiT-MNIST-N4`).
DCDIT_PRESETS["DC-DiT-MNIST-N4"] = dict(
    _preset(10, 128, 4, 4), patch_size=2, arch_layout=["c1", ["D10"], "c1"], enc_dec_dim_factor=[8, None],
    norm_groups=8)
