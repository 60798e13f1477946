"""DC-DiT: a Diffusion Transformer whose token sequence is chosen by dynamic chunking.

Forward pass (stage 0, the reference's only working stage; inner stages repeat
it on 1D sequences):

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
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from dcdit.attention import BACKENDS, packed_attn_fn
from dcdit.chunking import (
    ChunkLayer,
    DeChunkLayer,
    GroupNorm,
    PackedSeqs,
    SpatialPredictabilityRouter,
    check_tail_drop,
    packed_conv1d,
    packed_group_norm,
    ste,
)
from dcdit.models.config import DCDiTConfig, StagePlan
from dcdit.models.layers import (
    xavier_linear_init,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    guided_combine,
)

TailDrop = Union[float, torch.Tensor]

COMPONENTS = ("embeddings", "encoder", "routing", "chunk", "main network", "dechunk", "decoder", "final layer")


@dataclass
class TokenLayout:
    """How one stage's packed tokens are arranged: sequences, and the (h, w) grid on 2D stages."""

    seqs: PackedSeqs
    grid: Optional[tuple[int, int]]
    attn_backend: str = "auto"
    bucket: int = 0  # pad the innermost block stack's packed tokens to a multiple of this (0: no padding)


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

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """x (T, in_dim), c (B, cond_dim) -> (T, out_dim)."""
        seqs = layout.seqs
        if self.spatial_dims == 2:
            B, (gh, gw) = seqs.batch, layout.grid
            # One NCHW copy up front: CPU GroupNorm and mixed-layout adds are slow on channels-last views.
            h = x.reshape(B, gh, gw, self.in_dim).permute(0, 3, 1, 2).contiguous()  # (B, C, gh, gw)
            skip = h if self.skip_proj is None else self.skip_proj(h)
            h = self.conv1(self.act(self.norm1(h)))
            h = h + self.cond_proj(c)[:, :, None, None]
            h = self.conv2(self.act(self.norm2(h)))
            return (h + skip).permute(0, 2, 3, 1).reshape(seqs.total, self.out_dim)
        skip = x if self.skip_proj is None else packed_conv1d(x, self.skip_proj, seqs)
        h = packed_conv1d(self.act(packed_group_norm(x, self.norm1, seqs)), self.conv1, seqs)
        h = h + seqs.per_token(self.cond_proj(c))
        h = packed_conv1d(self.act(packed_group_norm(h, self.norm2, seqs)), self.conv2, seqs)
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
        self._compiled_block = None  # see DCDiT.compile_main_network

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
        for layer in self.layers:
            if isinstance(layer, ConvResBlock):
                x = layer(x, c, layout)
                continue
            if self._compiled_block is not None and not torch.is_grad_enabled() and not self.attn_qkv_bf16:
                a, mlp = layer.attn, layer.mlp
                x = self._compiled_block(
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
            x = packed_dit_block(layer, x, layer.modulation(c), seqs, attn_fn)
        return self.rmsnorm(x)


def functional_dit_block(
    x: torch.Tensor, seg: torch.Tensor, ada: torch.Tensor, cu_seqlens: torch.Tensor,
    qkv_w: torch.Tensor, qkv_b: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
    fc1_w: Optional[torch.Tensor], fc1_b: Optional[torch.Tensor], fc2_w: Optional[torch.Tensor],
    fc2_b: Optional[torch.Tensor], num_heads: int, backend: str,
) -> torch.Tensor:
    """A DiT block (adaLN-Zero) on packed tokens as a pure function of its weights: what
    :meth:`DCDiT.compile_main_network` compiles, one graph for every block.

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
    return x + gate_mlp * F.linear(F.gelu(F.linear(h, fc1_w, fc1_b), approximate="tanh"), fc2_w, fc2_b)


def packed_dit_block(layer: DiTBlock, x: torch.Tensor, mod: tuple, seqs: PackedSeqs, attn_fn) -> torch.Tensor:
    """``layer`` (a DiTBlock) on packed tokens x (T, D) with per-sample modulation ``mod`` (6 x (B, D)).

    The same arithmetic as ``DiTBlock.forward`` with the modulation expanded
    per token, without holding six (T, D) expansions: when every sequence
    has the same length the (B, D) rows broadcast over a (B, L, D) view;
    otherwise each is gathered per token right before its one use.
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    T, D = x.shape
    if seqs.is_uniform and seqs.batch * seqs.max_seqlen == T:
        B, L = seqs.batch, seqs.max_seqlen
        xs = x.view(B, L, D)
        tok = lambda m: m[:, None, :]  # (B, 1, D), broadcast over each sample's tokens
        attn_in = lambda h: h.reshape(1, T, D)
        attn_out = lambda a: a.view(B, L, D)
    else:
        xs = x[None]  # (1, T, D)
        tok = lambda m: seqs.per_token(m)[None]  # (1, T, D)
        attn_in = attn_out = lambda h: h
    # modulate(h, shift, scale) = h * (1 + scale) + shift, with 1 + scale formed per sample (the same
    # values) before the per-token expansion
    h = layer.norm1(xs) * tok(1 + scale_msa) + tok(shift_msa)
    xs = xs + tok(gate_msa) * attn_out(layer.attn(attn_in(h), attn_fn))
    del h
    if layer.mlp is not None:
        xs = xs + tok(gate_mlp) * layer.mlp(layer.norm2(xs) * tok(1 + scale_mlp) + tok(shift_mlp))
    return xs.reshape(T, D)


# --------------------------------------------------------------------------- #
#                                   Stages                                    #
# --------------------------------------------------------------------------- #

def _build_stage(owner: nn.Module, plans: list[StagePlan], s: int, cfg: DCDiTConfig, cond_dim: int) -> None:
    """Attach stage ``s``'s modules to ``owner`` (the DCDiT itself for stage 0, a DCStage below)."""
    plan = plans[s]
    if plan.innermost:
        owner.main_network = BlockStack(plan.main, plan.enc_dim, plan.enc_dim, plan, cond_dim, cfg)
        return
    r = plan.routing_dim
    owner.encoder = BlockStack(plan.encoder, plan.enc_dim, r, plan, cond_dim, cfg, transition="last")
    owner.residual_proj = nn.Linear(r, r)
    owner.routing_module = SpatialPredictabilityRouter(
        r, spatial_dims=2 if s == 0 else 1, norm_groups=cfg.router_norm_groups,
        bias_init=cfg.router_bias_init, fp32=cfg.fp32_router_dechunk,
    )
    owner.chunk = ChunkLayer()
    if plans[s + 1].innermost:
        _build_stage(owner, plans, s + 1, cfg, cond_dim)  # sets owner.main_network = BlockStack
    else:
        owner.main_network = DCStage(plans, s + 1, cfg, cond_dim)
    owner.dechunk = DeChunkLayer(cfg.dechunk_kernel_sigma, fp32=cfg.fp32_router_dechunk)
    owner.decoder = BlockStack(plan.decoder, r, plan.enc_dim, plan, cond_dim, cfg, transition="first")


def _pad_routing(sel, seqs: PackedSeqs, grid) -> dict:
    return {
        "boundary_prob": sel.prob,  # (B, M)
        "keep_mask": sel.keep,
        "natural_mask": sel.natural,
        "valid_mask": seqs.valid_mask(),
        "num_kept": sel.keep.sum(dim=1),
        "grid": grid,
    }


def _run_stage(
    owner: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    layout: TokenLayout,
    gpos: torch.Tensor,
    pos_table: torch.Tensor,
    tail_drop: TailDrop,
) -> tuple[torch.Tensor, list[dict]]:
    """One stage on packed tokens x (T, E): encode, route, chunk, recurse, dechunk, decode.

    gpos (T,): every token's raster index in the full input grid (for the
    positional embedding at the innermost stage). The caller should hold no
    other reference to ``x``: it is released once encoded.
    """
    if not hasattr(owner, "routing_module"):  # innermost stage at the top: a plain block stack
        return owner.main_network(x, c, layout, pos=pos_table.index_select(0, gpos).to(x.dtype)), []
    seqs = layout.seqs
    h = owner.encoder(x, c, layout)  # (T, D_r)
    del x
    sel = owner.routing_module(h, seqs, layout.grid, tail_drop)  # padded (B, M) decisions
    hk, kept_idx, seqs_k = owner.chunk(h, sel.keep, seqs)  # (T', D_r)
    inner_layout = TokenLayout(seqs_k, None, layout.attn_backend, layout.bucket)
    gpos_k = gpos.index_select(0, kept_idx)
    if isinstance(owner.main_network, BlockStack):
        # positions added in place (the chunk output is not used again), and the block stack gets
        # the only reference to its input, so it is freed after the first block
        hk = [hk.add_(pos_table.index_select(0, gpos_k).to(hk.dtype))]
        pad = (-seqs_k.total) % layout.bucket if layout.bucket else 0
        if pad:  # bounded shapes: a padding sequence of zeros, attended only by itself, dropped after
            x0 = hk.pop()
            hk = [torch.cat([x0, x0.new_zeros(pad, x0.shape[1])])]
            del x0
            padded = TokenLayout(PackedSeqs([*seqs_k.lengths, pad], c.device), None, layout.attn_backend)
            hk = owner.main_network(hk.pop(), torch.cat([c, c.new_zeros(1, c.shape[1])]), padded)[: seqs_k.total]
        else:
            hk = owner.main_network(hk.pop(), c, inner_layout)
        inner_routing = []
    else:
        hk, inner_routing = owner.main_network(hk, c, inner_layout, gpos_k, pos_table, tail_drop)
    p_k = seqs.unpad(sel.prob).index_select(0, kept_idx)
    local_k = seqs.local.index_select(0, kept_idx)
    # the residual is computed here, not before the main network: h (D_r wide, compute dtype) is
    # needed anyway, and holding the fp32 residual through the main network would double that memory
    with torch.autocast(h.device.type, enabled=False):  # residual in fp32 (as the reference intends)
        residual = owner.residual_proj(h.to(owner.residual_proj.weight.dtype))
    del h
    out = owner.dechunk(hk, p_k, local_k, seqs_k, seqs, layout.grid)  # (T, D_r)
    del hk
    if torch.is_grad_enabled():
        out = out.float() * ste(seqs.unpad(sel.selected))[:, None] + residual
    else:  # the STE is exactly 1 in the forward pass: the same sum without the multiply
        out = residual.add_(out) if residual.dtype == torch.float32 else out.float() + residual
    del residual
    out = owner.decoder(out, c, layout)  # (T, E)
    return out, [_pad_routing(sel, seqs, layout.grid), *inner_routing]


class DCStage(nn.Module):
    """A nested (1D) chunking stage: encoder, router, chunk, main network, dechunk, decoder."""

    def __init__(self, plans: list[StagePlan], s: int, cfg: DCDiTConfig, cond_dim: int):
        super().__init__()
        self.stage_index = s
        _build_stage(self, plans, s, cfg, cond_dim)

    def forward(self, x, c, layout, gpos, pos_table, tail_drop):
        return _run_stage(self, x, c, layout, gpos, pos_table, tail_drop)


# --------------------------------------------------------------------------- #
#                                    Model                                    #
# --------------------------------------------------------------------------- #

class DCDiT(nn.Module):
    """Dynamic Chunking Diffusion Transformer.

    ``model(x, t, y, tail_drop=0.0)`` returns ``(prediction, routing)``:
    prediction (B, out_channels, H, W); routing one dict per chunking stage
    with ``boundary_prob`` (B, L) float, ``keep_mask`` (B, L) bool (after tail
    dropping), ``natural_mask`` (B, L) bool (before), ``valid_mask`` (B, L)
    (False at padding of inner stages' variable-length sequences), ``num_kept``
    (B,) and ``grid`` ((h, w) on the 2D stage, None on 1D stages).
    """

    def __init__(self, config: DCDiTConfig):
        super().__init__()
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
        self.attn_backend = "auto"  # runtime choice, see dcdit.attention.BACKENDS
        # Inference only (no grad recorded): forward groups of samples with at most this many grid
        # tokens in total one after another (at least one sample per group), which bounds the
        # activation memory of large batches (every sample is computed independently, so results
        # are the same). 0 disables. See :meth:`forward`.
        self.inference_group_tokens = 16384
        # Pad the main network's packed tokens to a multiple of this many (0: none), so compiled
        # graphs see a bounded set of shapes; the padding is its own attention sequence.
        self.kept_bucket = 0

        self.x_embedder = ConvStem(config.input_hw, config.patch_size, config.in_channels, E)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        gh, gw = self.grid
        # Fixed 2D sin-cos table of the full grid at the innermost width, gathered at kept tokens.
        self.register_buffer("pos_embed", torch.zeros(1, gh * gw, plans[-1].d_model))
        _build_stage(self, plans, 0, config, cond_dim=D)
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
        self.attn_backend = name
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
        self.kept_bucket = int(bucket)
        fn = torch.compile(functional_dit_block, **compile_kwargs)
        for m in self.modules():
            if isinstance(m, BlockStack) and any(isinstance(layer, DiTBlock) for layer in m.layers):
                m._compiled_block = fn
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
            if node is None or hasattr(node, "routing_module"):
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
    ) -> tuple[torch.Tensor, list[dict]]:
        """x (B, C, H, W), t (B,), y (B,); tail_drop a fraction in [0, 1) or one per sample (B,).

        Returns (prediction (B, out_channels, H, W), routing: one dict per chunking stage).

        When no gradient is recorded and the batch holds more than
        ``self.inference_group_tokens`` grid tokens, the batch is forwarded in
        groups of samples (every sample is computed independently, so the
        result is the same), bounding the activation memory of large batches.
        """
        B = x.shape[0]
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"t and y must have shape ({B},) to match x, got {tuple(t.shape)} and {tuple(y.shape)}")
        tail_drop = check_tail_drop(tail_drop, B, x.device)
        gh, gw = self.grid
        group = max(1, self.inference_group_tokens // (gh * gw)) if self.inference_group_tokens else B
        if B > group and not torch.is_grad_enabled():
            parts = [
                self._forward(x[b0 : b0 + group], t[b0 : b0 + group], y[b0 : b0 + group],
                              tail_drop[b0 : b0 + group] if torch.is_tensor(tail_drop) else tail_drop)
                for b0 in range(0, B, group)
            ]
            return torch.cat([p[0] for p in parts]), _merge_routing([p[1] for p in parts])
        return self._forward(x, t, y, tail_drop)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tail_drop: TailDrop):
        B = x.shape[0]
        gh, gw = self.grid
        h = self.x_embedder(x)  # (B, E, gh, gw)
        tokens = [h.permute(0, 2, 3, 1).reshape(B * gh * gw, h.shape[1])]  # (B*L, E) packed
        del h  # the stage holds the only reference to its input (freed once encoded)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        layout = TokenLayout(PackedSeqs.uniform(B, gh * gw, x.device), (gh, gw), self.attn_backend, self.kept_bucket)
        h, routing = _run_stage(self, tokens.pop(), c, layout, layout.seqs.local, self.pos_embed[0], tail_drop)
        out = self.final_layer(h.reshape(B, gh * gw, -1), c)  # (B, L, p*p*C_out)
        return self.unpatchify(out), routing

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: Optional[int] = None,
        cond_tail_drop: TailDrop = 0.0,
        uncond_tail_drop: Optional[TailDrop] = None,
    ) -> tuple[torch.Tensor, list[dict]]:
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
        uncond_tail_drop = cond_tail_drop if uncond_tail_drop is None else uncond_tail_drop
        cond = check_tail_drop(cond_tail_drop, n, x.device)
        uncond = check_tail_drop(uncond_tail_drop, n, x.device)
        if torch.is_tensor(cond) or torch.is_tensor(uncond) or cond != uncond:
            frac = torch.cat([torch.as_tensor(v, dtype=torch.float32, device=x.device).expand(n) for v in (cond, uncond)])
        else:
            frac = cond
        out, routing = self.forward(torch.cat([half, half], dim=0), t, y, tail_drop=frac)
        return guided_combine(out, cfg_scale, guidance_channels or self.in_channels), routing


def _merge_routing(parts: list[list[dict]]) -> list[dict]:
    """Concatenate the routing dicts of sample groups along the batch (inner stages padded to one width)."""
    merged = []
    for stage in zip(*parts):
        d = {"grid": stage[0]["grid"]}
        for k in ("boundary_prob", "keep_mask", "natural_mask", "valid_mask"):
            M = max(r[k].shape[1] for r in stage)
            d[k] = torch.cat([torch.nn.functional.pad(r[k], (0, M - r[k].shape[1])) for r in stage])
        d["num_kept"] = torch.cat([r["num_kept"] for r in stage])
        merged.append({k: d[k] for k in stage[0]})
    return merged


def build_dcdit(name: str, **overrides) -> DCDiT:
    """DC-DiT from a preset name such as "DC-DiT-B-N4"; keywords override config fields (input_size, ...)."""
    from dcdit.models.config import DCDIT_PRESETS

    if name not in DCDIT_PRESETS:
        raise ValueError(f"unknown DC-DiT preset {name!r}; choose one of {', '.join(DCDIT_PRESETS)}")
    return DCDiT(DCDiTConfig.from_dict({**DCDIT_PRESETS[name], **overrides}))
