"""DC-DiT: a Diffusion Transformer whose token sequence is chosen by dynamic chunking.

Forward pass (stage 0, the reference's only working stage; the encoder-to-decoder
part is :class:`DCStage`, which inner stages repeat on 1D sequences):

    x (B, C, H, W) --stem conv--> tokens (B*L, E)         L = (H/p)(W/p), E = D / factor
    c = t_emb + y_emb (B, D)
    encoder: conv ResBlocks on the grid, E -> D, RMSNorm    (B*L, D)
    residual = Linear(encoder out) in fp32
    router: p (B, L); boundary iff p > 0.5; tail dropping
    chunk: keep boundary tokens in raster order, packed    (T', D), T' = sum_i L'_i
    + 2D sin-cos positions of the kept tokens
    main network: DiT blocks (adaLN-Zero) + RMSNorm on the packed tokens only
    dechunk: smooth over kept tokens, plug back to all L   (B*L, D), fp32
    h = dechunked * STE(max(p, 1-p)) + residual
    decoder: conv ResBlocks D -> E, RMSNorm                 (B*L, E)
    final layer (adaLN, zero-init linear) -> (B, out_ch, H, W)

Every tensor inside the stages is packed: B sequences end to end with no
padding (see :class:`dcdit.chunking.PackedSeqs`); attention runs per sequence
through :mod:`dcdit.attention`, adaLN modulation is computed once per sample
and expanded per token by index.

Component names (for per-module FLOP attribution, see :meth:`DCDiT.component_names`):
``x_embedder, t_embedder, y_embedder, encoder, residual_proj, routing_module,
chunk, main_network, dechunk, decoder, final_layer``; nested stages repeat the
stage names under ``main_network.``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from dcdit.attention import BACKENDS, packed_attn_fn
from dcdit.chunking import (
    ChunkLayer,
    DeChunkLayer,
    GroupNorm,
    PackedSeqs,
    SpatialPredictabilityRouter,
    StageRouting,
    check_tail_drop,
    packed_conv1d,
    packed_group_norm,
    sample_keys,
    ste,
    ste_residual,
)
from dcdit.models.config import DCDIT_PRESETS, DCDiTConfig, StagePlan
from dcdit.models.layers import (
    xavier_linear_init,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    TimestepEmbedder,
    gelu_tanh,
    get_2d_sincos_pos_embed,
    guided_combine,
)

TailDrop = Union[float, torch.Tensor]

COMPONENTS = ("embeddings", "encoder", "routing", "chunk", "main network", "dechunk", "decoder", "final layer")


@dataclass
class TokenLayout:
    """How one stage's packed tokens are arranged, and how its blocks run them."""

    seqs: PackedSeqs
    grid: Optional[tuple[int, int]]  # (h, w) on the 2D stage, None on 1D stages
    attn_backend: str = "auto"
    bucket: int = 0  # pad the innermost block stack's packed tokens to a multiple of this (0: no padding)
    compiled_block: Optional[Callable] = None  # torch.compile'd functional_dit_block (inference only)
    sample_key: Optional[torch.Tensor] = None  # (B,) the random router's per-sample seeds (router_mode "random")


@dataclass
class RuntimeOptions:
    """How a DCDiT's forward runs, not what it computes (never saved; set through DCDiT's methods)."""

    attn_backend: str = "auto"  # see dcdit.attention.BACKENDS (set_attn_backend)
    # Inference only (no grad recorded): forward groups of samples with at most this many grid
    # tokens in total one after another (at least one sample per group), which bounds the
    # activation memory of large batches; every sample is computed independently, so results
    # are the same. 0 disables. (set_inference)
    group_tokens: int = 16384
    # Pad the main network's packed tokens to a multiple of this many (0: none), so compiled
    # graphs see a bounded set of shapes; the padding is its own attention sequence.
    kept_bucket: int = 0
    compiled_block: Optional[Callable] = None  # compile_main_network


# --------------------------------------------------------------------------- #
#                                   Blocks                                    #
# --------------------------------------------------------------------------- #

class ConvStem(nn.Module):
    """(B, C, H, W) -> (B, E, H/p, W/p): a 3x3 'same' conv at p = 1 (the reference), a p x p patchify conv above."""

    def __init__(self, input_hw: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.input_hw, self.patch_size, self.in_chans = input_hw, patch_size, in_chans
        if patch_size == 1:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=3, padding=1)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_hw
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"expected input of shape (B, {self.in_chans}, {h}, {w}), got {tuple(x.shape)}")
        return self.proj(x)


def _amp_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype for a floating-point ``x`` when autocast is on for its device, else x's dtype."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ConvResBlock(nn.Module):
    """Stable-Diffusion ResBlock on packed tokens: GN-SiLU-conv3 (+ cond) GN-SiLU-conv3, plus skip.

    2D (``spatial_dims=2``) on a stage whose sequences fill an (h, w) grid;
    1D on inner stages, where each packed sequence is convolved alone. Inner
    width is min(in, out); a 1x1 conv skip appears when the widths differ.
    Parameter names follow the reference (``norm1, conv1, cond_proj.1, norm2, conv2, skip_proj``).
    """

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, spatial_dims: int = 2, norm_groups: int = 32):
        super().__init__()
        inner = min(in_dim, out_dim)
        for width in (in_dim, inner):
            if width % norm_groups:
                raise ValueError(f"conv ResBlock width {width} is not divisible by norm_groups {norm_groups}")
        Conv = nn.Conv2d if spatial_dims == 2 else nn.Conv1d
        self.spatial_dims, self.in_dim, self.out_dim = spatial_dims, in_dim, out_dim
        self.norm1 = GroupNorm(norm_groups, in_dim)
        self.norm2 = GroupNorm(norm_groups, inner)
        self.act = nn.SiLU()
        self.conv1 = Conv(in_dim, inner, kernel_size=3, padding=1)
        self.conv2 = Conv(inner, out_dim, kernel_size=3, padding=1)
        self.skip_proj = Conv(in_dim, out_dim, kernel_size=1) if in_dim != out_dim else None
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, inner))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: TokenLayout, on_grid: bool = False) -> torch.Tensor:
        """x (T, in_dim), c (B, cond_dim) -> (T, out_dim).

        ``on_grid`` (2D stage): x is already (B, in_dim, gh, gw) and so is the output,
        (B, out_dim, gh, gw); :class:`BlockStack` hands consecutive blocks the grid so (in training).
        """
        seqs = layout.seqs
        if self.spatial_dims == 2:
            if on_grid:
                return self.grid_forward(x, c)
            return self.from_grid(self.grid_forward(self.to_grid(x, layout), c), layout)
        skip = x if self.skip_proj is None else packed_conv1d(x, self.skip_proj, seqs)
        h = packed_conv1d(self.act(packed_group_norm(x, self.norm1, seqs)), self.conv1, seqs)
        h = h + seqs.per_token(self.cond_proj(c))
        h = packed_conv1d(self.act(packed_group_norm(h, self.norm2, seqs)), self.conv2, seqs)
        return h + skip

    def to_grid(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """2D stage: tokens (T, in_dim) -> (B, in_dim, gh, gw)."""
        B, (gh, gw) = layout.seqs.batch, layout.grid
        h = x.reshape(B, gh, gw, x.shape[-1]).permute(0, 3, 1, 2)  # (B, C, gh, gw), a channels-last view
        if torch.is_grad_enabled():  # training: one NCHW copy makes the CPU step 1.3-1.6x faster
            # (GroupNorm and conv backward); inference is faster on the view. Under autocast an fp32
            # input (the decoder's, after the fp32 dechunk) is cast in that copy: its GroupNorm and
            # SiLU then run in the autocast dtype like every other block's (the convs cast anyway)
            h = h.to(dtype=_amp_dtype(h), memory_format=torch.contiguous_format)
        return h

    @staticmethod
    def from_grid(h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """2D stage: (B, C, gh, gw) -> tokens (T, C) in raster order."""
        return h.permute(0, 2, 3, 1).reshape(layout.seqs.total, h.shape[1])

    def grid_forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """2D stage on the grid: h (B, in_dim, gh, gw), c (B, cond_dim) -> (B, out_dim, gh, gw)."""
        skip = h if self.skip_proj is None else self.skip_proj(h)
        h = self.conv1(self.act(self.norm1(h)))
        h = h + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + skip


class BlockStack(nn.Module):
    """A run of conv ResBlocks and/or DiT blocks, then RMSNorm (the reference's ``Isotropic``).

    Runs on packed tokens. DiT blocks attend within each sequence and take
    their adaLN modulation once per sample, expanded per token by index.
    """

    def __init__(
        self,
        layout: str,
        in_dim: int,
        out_dim: int,
        plan: StagePlan,
        cond_dim: int,
        cfg: DCDiTConfig,
        transition: str = "last",
    ):
        super().__init__()
        letters = [(a, int(n)) for a, n in re.findall(r"([cCdD])(\d+)", layout)]
        kinds = [a for a, n in letters for _ in range(n)]
        layers = []
        for i, kind in enumerate(kinds):
            if in_dim == out_dim:
                a, b = in_dim, out_dim
            elif transition == "last":  # encoder: the last block widens
                a, b = (in_dim, out_dim) if i == len(kinds) - 1 else (in_dim, in_dim)
            else:  # decoder: the first block narrows
                a, b = (in_dim, out_dim) if i == 0 else (out_dim, out_dim)
            if kind in "cC":
                layers.append(ConvResBlock(a, b, cond_dim, 2 if plan.index == 0 else 1, cfg.norm_groups))
            else:
                if a != plan.d_model or b != plan.d_model:
                    raise ValueError(
                        f"a DiT block of stage {plan.index} must run at d_model {plan.d_model}, "
                        f"but layout {layout!r} places it at width {a} -> {b}"
                    )
                layers.append(DiTBlock(plan.d_model, plan.num_heads, cfg.mlp_ratio, cond_size=cond_dim, use_mlp=kind == "D"))
        self.layers = nn.ModuleList(layers)
        self.rmsnorm = RMSNorm(out_dim, eps=1e-5)
        self.attn_qkv_bf16 = cfg.attn_qkv_bf16

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        layout: TokenLayout,
        pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (T, in_dim), c (B, cond) -> (T, out_dim); ``pos`` (T, D) is added first when given."""
        if pos is not None:
            x = x + pos
        seqs, attn_fn = layout.seqs, None
        grid = None  # training: the NCHW grid handed from one 2D conv block straight to the next
        for layer in self.layers:
            if isinstance(layer, ConvResBlock):
                if layer.spatial_dims == 2 and torch.is_grad_enabled():
                    grid = layer(layer.to_grid(x, layout) if grid is None else grid, c, layout, on_grid=True)
                else:
                    x = layer(x, c, layout)
                continue
            if grid is not None:
                x, grid = ConvResBlock.from_grid(grid, layout), None
            if layout.compiled_block is not None and not torch.is_grad_enabled() and not self.attn_qkv_bf16:
                a, mlp = layer.attn, layer.mlp
                x = layout.compiled_block(
                    x, seqs.seg_ids, layer.adaLN_modulation(c), seqs.cu_seqlens, a.qkv.weight, a.qkv.bias,
                    a.proj.weight, a.proj.bias, *((mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
                                                  if mlp is not None else (None,) * 4),
                    a.num_heads, layout.attn_backend,
                )
                continue
            if attn_fn is None:
                attn_fn = packed_attn_fn(
                    seqs.cu_seqlens, seqs.max_seqlen, seqs.lengths, layout.attn_backend,
                    round_qkv=torch.bfloat16 if self.attn_qkv_bf16 else None,
                )
            x = layer(x, c, attn_fn, seqs)
        if grid is not None:
            x = ConvResBlock.from_grid(grid, layout)
        return self.rmsnorm(x)


def functional_dit_block(
    x: torch.Tensor, seg: torch.Tensor, ada: torch.Tensor, cu_seqlens: torch.Tensor,
    qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
    fc1_w: Optional[torch.Tensor], fc1_b: Optional[torch.Tensor], fc2_w: Optional[torch.Tensor],
    fc2_b: Optional[torch.Tensor], num_heads: int, backend: str,
) -> torch.Tensor:
    """:meth:`DiTBlock.forward` on packed tokens as a pure function of the block's weights: what
    :meth:`DCDiT.compile_main_network` compiles, one graph for every block (inference only;
    tests hold it equal to the module forward).

    x (T, D); seg (T,) sample of each token; ada (B, 6D) the block's adaLN output;
    attention runs per sequence through the opaque ``dcdit::varlen_attention`` op.
    """
    import torch.nn.functional as F

    T, D = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.index_select(0, seg).chunk(6, dim=-1)
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_msa) + shift_msa
    q, k, v = F.linear(h, qkv_w, qkv_b).view(T, 3, num_heads, D // num_heads).unbind(1)  # (T, H, d)
    o = torch.ops.dcdit.varlen_attention(q, k, v, cu_seqlens, backend)
    x = x + gate_msa * F.linear(o.reshape(T, D), proj_w, proj_b)
    if fc1_w is None:
        return x
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * F.linear(gelu_tanh(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


# --------------------------------------------------------------------------- #
#                                   Stages                                    #
# --------------------------------------------------------------------------- #

class DCStage(nn.Module):
    """One chunking stage, MECHANISM steps 3-12: encoder, router, chunk, main network, dechunk, decoder.

    The main network is the innermost :class:`BlockStack`, or the next (1D)
    stage. :class:`DCDiT` is itself the outer stage, so the outer stage's
    modules keep the reference's top-level names (``encoder``, ``routing_module``, ...).
    """

    def __init__(self, plans: list[StagePlan], s: int, cfg: DCDiTConfig, cond_dim: int):
        super().__init__()
        self.build_stage(plans, s, cfg, cond_dim)

    def build_stage(self, plans: list[StagePlan], s: int, cfg: DCDiTConfig, cond_dim: int) -> None:
        plan = plans[s]
        self.stage_index = s
        self.chunking = not plan.innermost  # False only for a DC-DiT without chunking stages
        if plan.innermost:
            self.main_network = BlockStack(plan.main, plan.enc_dim, plan.enc_dim, plan, cond_dim, cfg)
            return
        r = plan.routing_dim
        self.encoder = BlockStack(plan.encoder, plan.enc_dim, r, plan, cond_dim, cfg, transition="last")
        self.residual_proj = nn.Linear(r, r)
        self.routing_module = SpatialPredictabilityRouter(
            r, spatial_dims=2 if s == 0 else 1, norm_groups=cfg.router_norm_groups,
            bias_init=cfg.router_bias_init, fp32=cfg.fp32_router_dechunk,
            mode=cfg.router_mode, N=cfg.stage_N(s), salt=s, floor=cfg.router_floor if s == 0 else 0,
        )
        self.chunk = ChunkLayer()
        inner = plans[s + 1]
        if inner.innermost:
            self.main_network = BlockStack(inner.main, inner.enc_dim, inner.enc_dim, inner, cond_dim, cfg)
        else:
            self.main_network = DCStage(plans, s + 1, cfg, cond_dim)
        self.dechunk = DeChunkLayer(cfg.dechunk_kernel_sigma, fp32=cfg.fp32_router_dechunk)
        self.decoder = BlockStack(plan.decoder, r, plan.enc_dim, plan, cond_dim, cfg, transition="first")

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        layout: TokenLayout,
        gpos: torch.Tensor,
        pos_table: torch.Tensor,
        tail_drop: TailDrop,
    ) -> tuple[torch.Tensor, list[StageRouting]]:
        """Packed tokens x (T, E) -> (T, E), and the routing of this stage and of the stages inside it.

        gpos (T,): every token's raster index in the full input grid (for the
        positional embedding at the innermost stage). The caller should hold no
        other reference to ``x``: it is released once encoded.
        """
        if not self.chunking:  # no chunking stage: the main network on every token
            return self.main_network(x, c, layout, pos=pos_table.index_select(0, gpos).to(x.dtype)), []
        seqs = layout.seqs
        # 3. encoder: conv ResBlocks (2D on the grid, 1D on inner stages), E -> D, RMSNorm
        h = self.encoder(x, c, layout)  # (T, D)
        del x
        # 5-6. router: p, boundary iff p > 0.5, tail dropping (fp32)
        routing = self.routing_module(h, seqs, layout.grid, tail_drop, layout.sample_key)  # (B, M) padded
        # 7. chunk: the kept tokens in raster order, packed
        hk, kept_idx, seqs_k = self.chunk(h, routing.keep_mask, seqs)  # (T', D)
        gpos_k = gpos.index_select(0, kept_idx)
        inner = replace(layout, seqs=seqs_k, grid=None)
        # 8-9. main network on the kept tokens: the next stage, or the DiT blocks (+ positions)
        if isinstance(self.main_network, DCStage):
            hk, inner_routing = self.main_network(hk, c, inner, gpos_k, pos_table, tail_drop)
        else:
            hk, inner_routing = self._main_blocks(hk, c, inner, pos_table.index_select(0, gpos_k)), []
        # 4. residual = Linear(encoder output) in fp32; computed here rather than before the main
        # network: h is needed anyway, and holding the fp32 residual through the main network
        # would double that memory
        with torch.autocast(h.device.type, enabled=False):
            residual = self.residual_proj(h.to(self.residual_proj.weight.dtype))
        del h
        # 10. dechunk: smooth over the kept tokens, plug back onto all T positions (fp32)
        p_k = seqs.unpad(routing.boundary_prob).index_select(0, kept_idx)
        local_k = seqs.local.index_select(0, kept_idx)
        out = self.dechunk(hk, p_k, local_k, seqs_k, seqs, layout.grid)  # (T, D)
        del hk
        # 11. h = dechunked * STE(max(p, 1 - p)) + residual
        if torch.is_grad_enabled():
            out = ste_residual(out.float(), seqs.unpad(routing.selected_prob), residual)
        else:  # the STE is exactly 1 in the forward pass: the same sum without the multiply
            out = residual.add_(out) if residual.dtype == torch.float32 else out.float() + residual
        del residual
        # 12. decoder: conv ResBlocks D -> E, RMSNorm
        out = self.decoder(out, c, layout)  # (T, E)
        return out, [routing, *inner_routing]

    def _main_blocks(self, hk: torch.Tensor, c: torch.Tensor, layout: TokenLayout, pos: torch.Tensor) -> torch.Tensor:
        """The innermost DiT blocks on the kept tokens hk (T', D) plus their 2D positions pos (T', D).

        With ``layout.bucket`` the packed count is padded to a multiple of it by one
        sequence of zeros (attended only by itself, dropped after): bounded shapes
        for compiled graphs.
        """
        hk = hk.add_(pos.to(hk.dtype))  # in place: the chunk output is not used again
        T = layout.seqs.total
        pad = (-T) % layout.bucket if layout.bucket else 0
        if not pad:
            return self.main_network(hk, c, layout)
        hk = torch.cat([hk, hk.new_zeros(pad, hk.shape[1])])
        padded = replace(layout, seqs=PackedSeqs([*layout.seqs.lengths, pad], c.device), bucket=0)
        return self.main_network(hk, torch.cat([c, c.new_zeros(1, c.shape[1])]), padded)[:T]


# --------------------------------------------------------------------------- #
#                                    Model                                    #
# --------------------------------------------------------------------------- #

class DCDiT(DCStage):
    """Dynamic Chunking Diffusion Transformer.

    ``model(x, t, y, tail_drop=0.0)`` returns ``(prediction, routing)``:
    prediction (B, out_channels, H, W); routing one
    :class:`~dcdit.chunking.StageRouting` per chunking stage (boundary
    probabilities, natural and kept masks, ``kept_share()``).

    The model is its own outer chunking stage (:class:`DCStage`), wrapped in
    the stem, the t / y embeddings and the final layer (MECHANISM steps 1-2 and 13).
    How the forward runs (attention backend, inference grouping, compiled
    blocks) lives in ``self.runtime``, set through :meth:`set_attn_backend`,
    :meth:`set_inference` and :meth:`compile_main_network`.
    """

    def __init__(self, config: DCDiTConfig):
        nn.Module.__init__(self)  # the stage's modules are built below, after the embedders (init order)
        if isinstance(config, dict):
            config = DCDiTConfig.from_dict(config)
        if not isinstance(config, DCDiTConfig):
            raise ValueError(f"DCDiT expects a DCDiTConfig, got {type(config).__name__}")
        self.cfg = config
        self.config = config.to_dict()
        plans = config.stages()
        D, E = plans[0].d_model, plans[0].enc_dim
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.patch_size, self.grid = config.patch_size, config.grid
        self.num_classes = config.num_classes
        self.runtime = RuntimeOptions()

        self.x_embedder = ConvStem(config.input_hw, config.patch_size, config.in_channels, E)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        gh, gw = self.grid
        # Fixed 2D sin-cos table of the full grid at the innermost width, gathered at kept tokens.
        self.register_buffer("pos_embed", torch.zeros(1, gh * gw, plans[-1].d_model))
        self.build_stage(plans, 0, config, cond_dim=D)  # steps 3-12
        self.final_layer = FinalLayer(E, config.patch_size, self.out_channels, cond_size=D)
        self.initialize_weights()

    # ------------------------------------------------------------------ #
    @classmethod
    def from_config(cls, config: Union[dict, DCDiTConfig]) -> "DCDiT":
        """Rebuild from ``model.config`` (a plain dict) or a :class:`DCDiTConfig`."""
        return cls(DCDiTConfig.from_dict(config) if isinstance(config, dict) else config)

    def initialize_weights(self) -> None:
        """The reference's init: xavier linears, N(0, .02) embeddings, adaLN-Zero, zero output layer."""

        self.apply(xavier_linear_init)  # also overrides the residual projection (as in the reference)
        gh, gw = self.grid
        self.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], gh, gw)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, DiTBlock):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attn_backend(self, name: str) -> "DCDiT":
        """Pick the attention backend ("auto", "flash_attn", "torch_varlen", "sdpa_loop", "padded")."""
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
        self.runtime.attn_backend = name
        return self

    def set_inference(self, group_tokens: Optional[int] = None, kept_bucket: Optional[int] = None) -> "DCDiT":
        """Inference settings (see :class:`RuntimeOptions`); None leaves a setting as it is. Returns self."""
        for name, v in (("group_tokens", group_tokens), ("kept_bucket", kept_bucket)):
            if v is not None:
                if not isinstance(v, int) or v < 0:
                    raise ValueError(f"{name} must be an int >= 0, got {v!r}")
                setattr(self.runtime, name, v)
        return self

    def compile_main_network(self, bucket: int = 0, **compile_kwargs) -> "DCDiT":
        """Inference speed-up: run the main network's DiT blocks through ``torch.compile``.

        Compiles :func:`functional_dit_block` once (one graph serves every block,
        weights are inputs); attention stays an opaque per-sequence op, so the
        graph depends only on the packed token count and batch size. ``bucket``
        pads that count to a multiple of ``bucket`` (e.g. 64 or 256) so that
        static compilation (``dynamic=False``) sees a bounded set of shapes; with
        the default ``dynamic=None`` torch compiles dynamic shapes after the
        first recompile and bucketing is optional. Only used when no gradient is
        recorded (training runs the eager path). ``compile_kwargs`` go to
        ``torch.compile``. Returns self.
        """
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0, got {bucket}")
        self.runtime.kept_bucket = int(bucket)
        self.runtime.compiled_block = torch.compile(functional_dit_block, **compile_kwargs)
        return self

    # ------------------------------------------------------------------ #
    def component_names(self: Optional["DCDiT"] = None) -> dict[str, str]:
        """Module path -> component label, for per-module FLOP attribution.

        Works on the class (``DCDiT.component_names()``: the single-stage
        layout) or an instance (``model.component_names()``: includes nested
        stages, listed under ``main_network.``). Attribute every counted
        module to its longest matching path prefix (:meth:`component_of`).
        Labels are ``COMPONENTS``; the fp32 residual projection counts as
        ``dechunk`` (it is the skip the dechunked output is added to).
        """
        names = {"x_embedder": "embeddings", "t_embedder": "embeddings", "y_embedder": "embeddings",
                 "final_layer": "final layer"}
        stage = {"encoder": "encoder", "routing_module": "routing", "chunk": "chunk", "dechunk": "dechunk",
                 "residual_proj": "dechunk", "decoder": "decoder"}
        prefix, node = "", self
        while True:
            names[prefix + "main_network"] = "main network"
            if node is None or node.chunking:
                names.update({prefix + k: v for k, v in stage.items()})
            if node is None or not isinstance(node.main_network, DCStage):
                return names
            prefix, node = prefix + "main_network.", node.main_network

    def flop_components(self) -> dict[str, str]:
        """Top-level child name -> component label (what :mod:`dcdit.flops` reads).

        Nested stages live inside ``main_network`` and count as main network
        here; :meth:`component_names` resolves them.
        """
        return {k: v for k, v in self.component_names().items() if "." not in k}

    @staticmethod
    def component_of(module_path: str, names: Optional[dict[str, str]] = None) -> Optional[str]:
        """Component label of a module path such as ``"encoder.layers.0.conv1"`` (None if unlisted)."""
        names = names or DCDiT.component_names()
        parts = module_path.split(".")
        for i in range(len(parts), 0, -1):
            hit = names.get(".".join(parts[:i]))
            if hit is not None:
                return hit
        return None

    # ------------------------------------------------------------------ #
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        (gh, gw), p, c = self.grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        tail_drop: TailDrop = 0.0,
    ) -> tuple[torch.Tensor, list[StageRouting]]:
        """x (B, C, H, W), t (B,), y (B,); tail_drop a fraction in [0, 1) or one per sample (B,).

        Returns (prediction (B, out_channels, H, W), routing: one StageRouting per chunking stage).

        When no gradient is recorded and the batch holds more than
        ``self.runtime.group_tokens`` grid tokens, the batch is forwarded in
        groups of samples (every sample is computed independently, so the
        result is the same), bounding the activation memory of large batches.
        """
        B = x.shape[0]
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y must have shape ({B},) to match x, got {tuple(t.shape)} and {tuple(y.shape)}")
        tail_drop = check_tail_drop(tail_drop, B, x.device)
        gh, gw = self.grid
        group_tokens = self.runtime.group_tokens
        group = max(1, group_tokens // (gh * gw)) if group_tokens else B
        if B > group and not torch.is_grad_enabled():
            parts = [
                self._forward(x[b0 : b0 + group], t[b0 : b0 + group], y[b0 : b0 + group],
                              tail_drop[b0 : b0 + group] if torch.is_tensor(tail_drop) else tail_drop)
                for b0 in range(0, B, group)
            ]
            return torch.cat([p[0] for p in parts]), [StageRouting.cat(st) for st in zip(*(p[1] for p in parts))]
        return self._forward(x, t, y, tail_drop)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tail_drop: TailDrop):
        B = x.shape[0]
        gh, gw = self.grid
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)   2. conditioning
        rt = self.runtime
        key = sample_keys(x, t) if self.cfg.router_mode == "random" else None
        layout = TokenLayout(PackedSeqs.uniform(B, gh * gw, x.device), (gh, gw), rt.attn_backend, rt.kept_bucket,
                             rt.compiled_block, key)
        # 1. stem -> packed tokens (B*L, E), passed on as the stage's only reference (freed once encoded)
        h, routing = super().forward(self._stem_tokens(x), c, layout, layout.seqs.local, self.pos_embed[0], tail_drop)
        out = self.final_layer(h.reshape(B, gh * gw, -1), c)  # (B, L, p*p*C_out)   13. final layer
        return self.unpatchify(out), routing

    def _stem_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> packed stem tokens (B*L, E) in raster order."""
        h = self.x_embedder(x)  # (B, E, gh, gw)
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: Optional[int] = None,
        cond_tail_drop: TailDrop = 0.0,
        uncond_tail_drop: Optional[TailDrop] = None,
    ) -> tuple[torch.Tensor, list[StageRouting]]:
        """Classifier-free guidance in one batched call, with Lite-CFG budgets.

        The batch's second half carries the null label; only the first half
        of ``x`` is used. ``cond_tail_drop``/``uncond_tail_drop`` are the drop
        fractions of the two halves (None: same as cond). Guidance applies to
        all eps channels by default; ``guidance_channels=3`` reproduces the
        reference (and DiT), which guides the first three only.
        """
        if x.shape[0] % 2:
            raise ValueError(f"guided batch must have an even size (cond + uncond halves), got {x.shape[0]}")
        n = x.shape[0] // 2
        half = x[:n]
        tail_drop = guided_tail_drop(cond_tail_drop, uncond_tail_drop, n)  # checked by forward
        out, routing = self.forward(torch.cat([half, half], dim=0), t, y, tail_drop=tail_drop)
        return guided_combine(out, cfg_scale, guidance_channels or self.in_channels), routing


def guided_tail_drop(cond_tail_drop: TailDrop, uncond_tail_drop: Optional[TailDrop], n: int) -> TailDrop:
    """The tail drop of a guided [cond; uncond] batch of 2n: one number when both halves drop the same
    (None: as cond), else a (2n,) float32 tensor, built once per network call and checked by ``forward``.

    Numbers become a CPU tensor, which ``forward`` checks without a device sync before moving it.
    """
    if uncond_tail_drop is None:
        uncond_tail_drop = cond_tail_drop
    pair = (cond_tail_drop, uncond_tail_drop)
    if not any(torch.is_tensor(v) for v in pair) and cond_tail_drop == uncond_tail_drop:
        return cond_tail_drop
    device = next((v.device for v in pair if torch.is_tensor(v)), torch.device("cpu"))
    halves = [torch.as_tensor(v, dtype=torch.float32, device=device) for v in pair]
    return torch.cat([v.expand(n) if v.dim() == 0 else v for v in halves])


def build_dcdit(name: str, **overrides) -> DCDiT:
    """DC-DiT from a preset name such as "DC-DiT-B-N4"; keywords override config fields (input_size, ...)."""
    if name not in DCDIT_PRESETS:
        raise ValueError(f"unknown DC-DiT preset {name!r}; choose one of {', '.join(DCDIT_PRESETS)}")
    return DCDiT(DCDiTConfig.from_dict({**DCDIT_PRESETS[name], **overrides}))
