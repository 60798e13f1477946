"""DiT: the Diffusion Transformer of Peebles & Xie (2023), as a fixed-patch baseline.

Constructor keywords and parameter names match the original class, so the
released DiT-XL/2 checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn as nn

from dcdit.models.config import MODEL_SIZES, check_prediction
from dcdit.models.layers import (
    xavier_linear_init,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    guided_combine,
)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone over a fixed grid of patches."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        prediction: str = "epsilon",
    ):
        super().__init__()
        for name, v in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)) \
                or not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {class_dropout_prob!r}")
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"learn_sigma must be true or false, got {learn_sigma!r}")
        check_prediction(prediction)
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, prediction=prediction,
        )
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos positions, stored as a buffer-like frozen parameter (the checkpoints carry it).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, sin-cos positions, N(0, 0.02) embeddings, zeroed adaLN and output."""

        self.apply(xavier_linear_init)
        grid = self.x_embedder.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy input, t (B,) timesteps, y (B,) labels -> (B, C_out, H, W)."""
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t and y must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)} and {tuple(y.shape)}"
            )
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            x = block(x, c)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        return self.unpatchify(x)  # (B, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: Optional[int] = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        Only the first half of ``x`` is used (both halves share it). Guidance
        applies to all eps channels by default; ``guidance_channels=3``
        reproduces the original DiT, which guides the first three only.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guided_combine(out, cfg_scale, guidance_channels or self.in_channels)


# --------------------------------------------------------------------------- #
#                      Registry of the original configurations                #
# --------------------------------------------------------------------------- #

DIT_CONFIGS: dict[str, dict] = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, patch_size=p, num_heads=n)
    for size, (d, h, n) in MODEL_SIZES.items()
    for p in (2, 4, 8)
}


def build_dit(name: str, **kwargs) -> DiT:
    """DiT from a registry name such as "DiT-XL/2"; keywords override (input_size, num_classes, ...)."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT model {name!r}; choose one of {', '.join(DIT_CONFIGS)}")
    return DiT(**{**DIT_CONFIGS[name], **kwargs})


def registry_num_heads(hidden_size: int) -> Optional[int]:
    """The registry's head count for a DiT of this width (S/B/L/XL), None for any other width."""
    return {h: n for _, h, n in MODEL_SIZES.values()}.get(hidden_size)


# --------------------------------------------------------------------------- #
#                 Reading a DiT state dict (original parameter names)          #
# --------------------------------------------------------------------------- #

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")  # a DiT block parameter: (block index, name in it)


def describe_dit(state: dict) -> dict:
    """Shape facts of a DiT state dict: hidden, depth, num_classes, in_channels, patch_size, input_size."""
    need = ("t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "x_embedder.proj.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict: missing {', '.join(missing)}")
    blocks = {int(m.group(1)) for k in state if (m := BLOCK_KEY.match(k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError("not a DiT state dict: no contiguous blocks.{i}.* entries")
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    out = {
        "hidden_size": int(state["t_embedder.mlp.0.weight"].shape[0]),
        "depth": len(blocks),
        "in_channels": int(proj.shape[1]),
        "patch_size": int(proj.shape[-1]),
        "table_rows": int(state["y_embedder.embedding_table.weight"].shape[0]),
    }
    if "pos_embed" in state:
        out["input_size"] = int(round(math.sqrt(state["pos_embed"].shape[1]))) * out["patch_size"]
    return out
