"""Variable-length self-attention behind one interface.

Every backend computes exact softmax(QK^T / sqrt(d)) V independently for each
sequence of a packed batch: ``q, k, v`` are (T, H, d) with the sequences laid
end to end and ``cu_seqlens`` (B+1,) marking their starts. Nothing attends
across sequences and no padding is attended to, so the attention work is
sum_i L_i^2, not B * max(L)^2 (except for the ``padded`` reference backend).

Backends (``resolve_backend("auto", ...)`` picks the first that applies):

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, when
  the flash-attn package is installed; compute capability >= 8.0).
- ``torch_varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn``
  (CUDA, fp16/bf16; PyTorch >= 2.9; compute capability >= 8.0).
- ``sdpa_loop``: one ``F.scaled_dot_product_attention`` call per sequence (runs
  of equal lengths are batched into one call). The fastest exact path on CPU
  and the fallback for fp32 on CUDA. When training in half precision on CPU
  (``CPU_TRAIN_ATTENTION``), a packed batch whose lengths are similar instead
  attends as one padded batch of matmuls with a key-padding mask; when
  sampling in half precision on CPU (``INFER_BUCKETS``), the sequences are
  grouped by their length rounded up to 32 and each group is one masked call.
- ``padded``: pad to (B, H, max L, d) and mask the keys. Costs B * max(L)^2;
  kept as an independent reference for equivalence tests.

Every CUDA path checks what it needs and falls back with a warning (once per
cause) instead of failing: an older GPU generation skips the varlen kernels;
fp32 on CUDA (no varlen kernel takes fp32) uses ``sdpa_loop``; a ``varlen_attn``
without the ``scale`` keyword (its signature changed across releases) gets q
pre-scaled instead; a kernel that raises at run time (a flash-attn build for
another GPU or torch) is dropped for the rest of the process and the call is
redone with ``sdpa_loop``. None of these paths has run on a GPU in this
project's CI (no GPU there); the selection logic is tested on CPU with fakes.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from collections import Counter
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa_loop", "padded")
MIN_CAPABILITY = (8, 0)  # flash-attn 2 and PyTorch's varlen kernel: Ampere or newer
_BROKEN: set[str] = set()  # backends that raised at run time in this process
_WARNED: set[str] = set()

# Half-precision attention on CPU that autograd records (training under bf16 autocast). PyTorch's
# CPU kernels are slow to train through at these sizes (64-256 tokens, head dim 32-64): the bf16
# flash backward is ~6-8x slower than the fp32 one, and the fp32 kernel plus its casts is still ~2x
# slower than plain batched matmuls. How such attention is computed:
#   "math" (default): softmax(q k^T / sqrt(d)) v with half-precision matmuls and softmax (both
#       accumulate in fp32); variable-length packed batches attend as one padded batch with a
#       key-padding mask (when the padding stays small), not one call per sequence length;
#   "fp32": PyTorch's kernel on fp32 copies, cast back (the previous path);
#   "native": PyTorch's kernel in half precision (what F.scaled_dot_product_attention does).
# The difference is rounding: "math" rounds the scores and the probabilities to bf16 (relative error
# ~6e-3 against exact attention vs ~2e-3 for "fp32", whose output is rounded to bf16 too). fp32
# tensors and inference (no autograd) never take these paths.
CPU_TRAIN_ATTENTION = "math"
CPU_TRAIN_ATTENTION_MODES = ("math", "fp32", "native")
# "math" on a packed batch: one padded call (rows rounded up to PAD_MULTIPLE) when the work it adds,
# B * M^2 - sum(L_i^2) token pairs, costs less than the calls it saves; else one call per run of equal
# lengths. Each further call of that loop costs about PAD_CALL_COST token pairs of attention work
# (forward + backward; measured on the 2-core dev CPU at 4 heads x 32, benchmarks/bench_pad_rule.py),
# so padding wins far beyond "twice the real work" when the sequences are short and many.
PAD_MULTIPLE = 32
PAD_CALL_COST = 30_000
# Half-precision CPU attention without autograd (sampling) groups the packed sequences by their length
# rounded up to PAD_MULTIPLE, one key-masked call per group (_bucketed_infer), instead of one call per
# run of equal lengths: ~3x faster attention at DC-DiT's 40-100 kept tokens (benchmarks/bench_infer_attention.py).
# False restores the per-length loop. fp32 never takes it (the fixtures' exact path).
INFER_BUCKETS = True
# The rule itself: PAD_RULE, at the end of this module (pad_pays).


def _cpu_half(q: torch.Tensor) -> bool:
    """Half-precision CPU attention that autograd records: there PyTorch's half kernels are slow.

    Without a backward (sampling) the bf16 forward kernel is the faster one (~1.6-2.2x at 64-256
    tokens), so inference keeps it.
    """
    if CPU_TRAIN_ATTENTION not in CPU_TRAIN_ATTENTION_MODES:
        raise ValueError(f"CPU_TRAIN_ATTENTION must be one of {CPU_TRAIN_ATTENTION_MODES}, got {CPU_TRAIN_ATTENTION!r}")
    return (CPU_TRAIN_ATTENTION != "native" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and q.requires_grad)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (..., T, d): batched matmuls and softmax in q's dtype (both
    accumulate in fp32 on CPU).

    ``attn_mask`` as in ``F.scaled_dot_product_attention`` (bool: True takes part; float: added to
    the scores), broadcastable to (..., T, S). A query whose keys are all masked gets the mean of v
    over its row instead of NaN (such rows are padding, which callers drop).
    """
    *lead, T, d = q.shape
    S = k.shape[-2]
    q3, k3, v3 = q.reshape(-1, T, d), k.reshape(-1, S, d), v.reshape(-1, S, v.shape[-1])
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, torch.finfo(q.dtype).min)
        else:
            bias = attn_mask.to(q.dtype)
        rows = bias.shape[-2] if bias.dim() >= 2 else 1
        bias = bias.expand(*lead, rows, S).reshape(-1, rows, S)
    return _attend(q3, k3, v3, bias, scale).view(*lead, T, v.shape[-1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            scale: Optional[float]) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v on (N, T, d) batches; bias (N, 1 or T, S) or None.

    One ``baddbmm`` forms the scaled, masked scores. The softmax runs in the scores' dtype: PyTorch's
    CPU kernel accumulates half-precision input in fp32 and is vectorised, where
    ``softmax(..., dtype=torch.float32)`` on bf16 input is ~6x slower.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bias is None:
        s = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=scale)
    else:
        s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(s, dim=-1), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
         scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on (..., T, d); for half-precision CPU tensors that autograd
    records, :func:`math_attention` or fp32 math (``CPU_TRAIN_ATTENTION``).

    The output has q's dtype either way, so callers (and autocast regions) see no difference.
    """
    if _cpu_half(q):
        if CPU_TRAIN_ATTENTION == "math":
            return math_attention(q, k, v, attn_mask, scale)
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of ``device`` (a function of its own so tests can fake a GPU)."""
    return tuple(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends usable for tensors of this device and dtype, in ``auto`` preference order.

    On CUDA this checks the dtype (fp16/bf16), the GPU generation and whether
    the kernel is installed, and warns once about each reason a varlen kernel
    is skipped.
    """
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        have = {"flash_attn": _flash_attn_varlen() is not None, "torch_varlen": _torch_varlen() is not None}
        if any(have.values()) and dtype not in (torch.float16, torch.bfloat16):
            _warn_once(f"dtype-{dtype}", f"attention: no variable-length CUDA kernel takes {dtype}; using one SDPA "
                       "call per sequence length (sdpa_loop). Run in bf16 (train.precision=bf16) for the varlen kernels")
        elif any(have.values()):
            cap = _capability(device)
            if cap < MIN_CAPABILITY:
                _warn_once(f"cap-{cap}", f"attention: the varlen kernels need compute capability >= "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, this GPU has {cap[0]}.{cap[1]}; using sdpa_loop")
            else:
                out += [name for name in ("flash_attn", "torch_varlen") if have[name] and name not in _BROKEN]
    return out + ["sdpa_loop", "padded"]


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Concrete backend for ``name`` ("auto" or a backend name) on this device/dtype."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    usable = available_backends(device, dtype)
    if name == "auto":
        return usable[0]
    if name not in usable:
        raise ValueError(
            f"attention backend {name!r} is not usable for {dtype} tensors on {torch.device(device).type}; "
            f"usable: {', '.join(usable)}"
        )
    return name


# --------------------------------------------------------------------------- #
#                                  Backends                                   #
# --------------------------------------------------------------------------- #

def _sdpa_loop(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    """One SDPA call per run of equal-length sequences; q/k/v (T, H, d).

    The runs are cut with one ``split`` per tensor: its backward is a single
    concatenation, where per-run slicing would zero-fill a full (T, H, d)
    gradient for every run.
    """
    runs = []  # (L, m): m consecutive sequences of length L
    for L in lengths:
        if runs and runs[-1][0] == L:
            runs[-1][1] += 1
        else:
            runs.append([int(L), 1])
    if not runs or all(L == 0 for L, _ in runs):
        return q.new_empty(q.shape)
    sizes = [L * m for L, m in runs]
    outs = []
    for (L, m), qs, ks, vs in zip(runs, *(t.split(sizes) for t in (q, k, v))):
        if L == 0:
            continue
        # (m*L, H, d) -> (m, H, L, d)
        qs, ks, vs = (t.unflatten(0, (m, L)).transpose(1, 2) for t in (qs, ks, vs))
        o = sdpa(qs, ks, vs, scale=scale)  # (m, H, L, d)
        outs.append(o.transpose(1, 2).flatten(0, 1))  # (m*L, H, d)
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()


def _padded(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    """Pad to (B, H, M, d), mask padded keys, attend, unpad."""
    B, T = cu_seqlens.numel() - 1, q.shape[0]
    cu = cu_seqlens.long()
    seg = torch.repeat_interleave(torch.arange(B, device=q.device), cu[1:] - cu[:-1], output_size=T)
    local = torch.arange(T, device=q.device) - cu[seg]
    M = max(int(max_seqlen), 1)

    def pad(t):
        out = t.new_zeros(B, M, *t.shape[1:])
        out[seg, local] = t
        return out.transpose(1, 2)  # (B, H, M, d)

    key_ok = torch.zeros(B, M, dtype=torch.bool, device=q.device)
    key_ok[seg, local] = True
    o = sdpa(pad(q), pad(k), pad(v), attn_mask=key_ok[:, None, None, :], scale=scale)
    return o.transpose(1, 2)[seg, local]  # (T, H, d)


def _padded_train(q, k, v, cu_seqlens, max_seqlen, lengths, scale, multiple: int = PAD_MULTIPLE):
    """A packed batch (T, H, d) as one padded (B*H, M, d) batch through :func:`_attend`.

    M is the longest sequence rounded up to a multiple of ``multiple`` (PyTorch's CPU softmax is 2-3x
    slower per element on other row lengths). Padded keys are masked (probability exactly 0), padded
    queries dropped; padding rows repeat some real token, so every value stays finite and no gradient
    reaches it (exactly zero). Token rows are gathered with ``index_select`` (its backward is an
    ``index_add_`` of whole rows, where advanced indexing would sort). Needs ``lengths``.
    """
    B, T, (H, d) = len(lengths), q.shape[0], q.shape[1:]
    if T == 0:
        return q.new_empty(q.shape)
    M = -(-max(int(max_seqlen), 1) // multiple) * multiple
    dev = q.device
    lens = torch.as_tensor(lengths, device=dev)
    starts = cu_seqlens[:-1].long()
    pos = torch.arange(M, device=dev)
    src = (starts[:, None] + pos[None, :]).clamp_(max=T - 1).flatten()  # (B*M,) padded slot <- token
    dst = torch.repeat_interleave(torch.arange(B, device=dev) * M - starts, lens, output_size=T) \
        + torch.arange(T, device=dev)  # (T,) token <- padded slot
    bias = torch.zeros(B, M, dtype=q.dtype, device=dev).masked_fill_(pos[None, :] >= lens[:, None],
                                                                       torch.finfo(q.dtype).min)
    bias = bias[:, None, None, :].expand(B, H, 1, M).reshape(B * H, 1, M)

    def pad(t):  # (T, H, d) -> (B*H, M, d): whole token rows gathered, then one layout copy
        return t.index_select(0, src).view(B, M, H, -1).transpose(1, 2).reshape(B * H, M, t.shape[-1])

    o = _attend(pad(q), pad(k), pad(v), bias, scale)  # (B*H, M, d)
    return o.view(B, H, M, -1).transpose(1, 2).reshape(B * M, H, -1).index_select(0, dst)  # (T, H, d)


@functools.lru_cache(maxsize=8)
def _bucket_plan(lengths: tuple[int, ...], multiple: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """:func:`_bucketed_infer`'s gathers for one set of lengths (every block of a forward shares it):
    per group of sequences whose length rounds up to the same M, ``(M, n, src, keep_src, keep_slots, mask)``.

    src (n*M,): the packed token each padded slot reads (padding slots repeat a real token);
    keep_src / keep_slots: the real slots' tokens and positions (None when nothing is padded);
    mask (n, 1, 1, M): 0 for real keys, -inf for padded ones (None when nothing is padded).
    """
    T = sum(lengths)
    starts = [0]
    for L in lengths[:-1]:
        starts.append(starts[-1] + L)
    groups: dict[int, list[int]] = {}
    for i, L in enumerate(lengths):
        if L:
            groups.setdefault(-(-L // multiple) * multiple, []).append(i)
    plan = []
    for M, idx in groups.items():
        lens = torch.tensor([lengths[i] for i in idx], device=device)
        pos = torch.arange(M, device=device)
        src = (torch.tensor([starts[i] for i in idx], device=device)[:, None] + pos).clamp_(max=T - 1).flatten()
        valid = pos[None, :] < lens[:, None]  # (n, M)
        if bool(valid.all()):
            plan.append((M, len(idx), src, None, None, None))
            continue
        slots = valid.flatten().nonzero().squeeze(1)
        mask = torch.zeros(len(idx), 1, 1, M, dtype=dtype, device=device).masked_fill_(
            ~valid[:, None, None, :], float("-inf"))
        plan.append((M, len(idx), src, src.index_select(0, slots), slots, mask))
    return plan


def _bucketed_infer(q, k, v, cu_seqlens, max_seqlen, lengths, scale, multiple: int = PAD_MULTIPLE):
    """Inference on CPU in half precision: the sequences grouped by their length rounded up to
    ``multiple``, one key-masked SDPA call per group of (n, H, M, d).

    PyTorch's CPU attention kernel works in blocks of 32 rows: a (100, 4, 94, 32) bf16 call takes
    2.3x the time of a (100, 4, 96, 32) one, and a loop of one call per sequence runs each short
    sequence at the slow rate plus a dispatch. Rounding every sequence up to the next multiple of 32
    and masking the padded keys (probability exactly 0) costs a few padded rows and saves both.
    Padded query rows attend to real keys (so stay finite) and are dropped. Needs ``lengths``.
    """
    T, H, d = q.shape
    out = q.new_empty(T, H, v.shape[-1])
    qkv = _fused_qkv(q, k, v)  # (T, 3, H, d) when q, k, v are slices of one fused projection, else None
    for M, n, src, keep_src, keep_slots, mask in _bucket_plan(tuple(int(L) for L in lengths), multiple,
                                                               q.device, q.dtype):
        if qkv is not None:  # one gather for all three: (n*M, 3, H, d) -> 3 x (n, H, M, d)
            qs, ks, vs = qkv.index_select(0, src).view(n, M, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # (T, H, d) -> (n, H, M, d) each
            qs, ks, vs = (t.index_select(0, src).view(n, M, H, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # (n, H, M, d)
        o = o.transpose(1, 2).reshape(n * M, H, -1)
        if mask is None:
            out.index_copy_(0, src, o)
        else:
            out.index_copy_(0, keep_src, o.index_select(0, keep_slots))
    return out


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """The (T, 3, H, d) tensor that q, k, v (T, H, d) slice, when they are the three thirds of one fused
    qkv projection's output (as :class:`dcdit.models.layers.Attention` makes them); else None."""
    T, H, d = q.shape
    step = H * d * q.element_size()
    if (k.shape != q.shape or v.shape != q.shape or not (q.stride() == k.stride() == v.stride() == (3 * H * d, d, 1))
            or k.data_ptr() - q.data_ptr() != step or v.data_ptr() - k.data_ptr() != step):
        return None
    return q.as_strided((T, 3, H, d), (3 * H * d, H * d, d, 1))


def _cpu_half_infer(q: torch.Tensor) -> bool:
    """Half-precision CPU attention without autograd (sampling): :func:`_bucketed_infer` applies."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and q.requires_grad))


def _bucketed_counted(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    """:func:`_bucketed_infer`'s values, with a FLOP counter (a dispatch mode) charged the sequences' own
    work, sum_i L_i^2, not the padded buckets': the same images whether or not FLOPs are counted.

    The values are computed with the counter switched off; the counter then sees one CPU attention
    call per distinct length L, on shape-only ("meta") tensors of (m, H, L, d) for the m sequences of
    that length. A meta call computes nothing and dispatches once, where a per-length loop over the
    real tensors (the earlier way) dispatched every split, view and transpose through Python and
    made counted DC-DiT sampling ~2.7x slower than uncounted.
    """
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # a torch without it: count the loop and return its values
        return _sdpa_loop(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    H, dq, dv = q.shape[1], q.shape[2], v.shape[2]
    with _disable_current_modes():
        out = _bucketed_infer(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
        shapes = [(torch.empty(m, H, L, dq, dtype=q.dtype, device="meta"),
                   torch.empty(m, H, L, dv, dtype=v.dtype, device="meta"))
                  for L, m in Counter(int(L) for L in lengths if int(L)).items()]
    for qm, vm in shapes:  # seen by the counter (dcdit.flops counts this op: 4 m H L^2 d)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qm, qm, vm)
    return out


def _flop_counter_watching() -> bool:
    """Whether a torch FLOP counter (``torch.utils.flop_counter.FlopCounterMode``, a dispatch mode; also
    inside :func:`dcdit.flops.count_flops`) is active: then inference attention shows it one call per
    run of equal lengths (:func:`_bucketed_counted`), so it counts only the work the sequences need,
    sum(L_i^2), not the padded buckets'."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # a torch without it: no counter can be seen
        return False
    return any(isinstance(m, _FLOP_COUNTER_MODES) for m in _get_current_dispatch_mode_stack())


def _flop_counter_modes() -> tuple:
    """The dispatch-mode classes a FlopCounterMode pushes (a private ``_FlopCounterMode`` in torch >= 2.4)."""
    import torch.utils.flop_counter as fc
    return tuple(c for c in (getattr(fc, "_FlopCounterMode", None), getattr(fc, "FlopCounterMode", None))
                 if isinstance(c, type))


_FLOP_COUNTER_MODES = _flop_counter_modes()


def _flash(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    cu = cu_seqlens.to(torch.int32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _flash_attn_varlen()(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), softmax_scale=scale)


@functools.lru_cache(maxsize=None)
def _accepts_scale(fn) -> bool:
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the current API
        return True


def _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    cu = cu_seqlens.to(torch.int32)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    fn = _torch_varlen()
    if scale is None:
        return fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen))
    if _accepts_scale(fn):
        return fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), scale=scale)
    # Older varlen_attn without `scale`: it uses 1/sqrt(d); scaling q gives the same scores.
    q = q * (scale * q.shape[-1] ** 0.5)
    return fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen))


_IMPLS = {"flash_attn": _flash, "torch_varlen": _torch_varlen_call, "sdpa_loop": _sdpa_loop, "padded": _padded}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    lengths: Optional[Sequence[int]] = None,
    backend: str = "auto",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention within each packed sequence.

    q, k, v: (T, H, d); cu_seqlens: (B+1,) cumulative lengths starting at 0;
    max_seqlen: the longest L_i; lengths: the L_i as Python ints (saves a host
    sync for the CPU backends). Returns (T, H, d).
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (T, H, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    name = resolve_backend(backend, q.device, q.dtype)
    if name in ("flash_attn", "torch_varlen"):
        try:
            return _IMPLS[name](q, k, v, cu_seqlens, max_seqlen, lengths, scale)
        except (RuntimeError, TypeError) as e:  # kernel built for another GPU / torch, API drift
            _BROKEN.add(name)
            _warn_once(f"broken-{name}", f"attention: the {name} kernel failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); falling back to sdpa_loop from now on")
            name = "sdpa_loop"
    if lengths is None and name in ("sdpa_loop",):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if _cpu_half(q):
        if CPU_TRAIN_ATTENTION == "math":
            if name == "sdpa_loop" and PAD_RULE(lengths, max_seqlen):  # one masked batched call
                return _padded_train(q, k, v, cu_seqlens, max_seqlen, lengths, scale)  # instead of one per length
            return _IMPLS[name](q, k, v, cu_seqlens, max_seqlen, lengths, scale)
        # "fp32": upcast once for the whole packed batch, not per sequence (see sdpa)
        with torch.autocast("cpu", enabled=False):
            out = _IMPLS[name](q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, lengths, scale)
        return out.to(q.dtype)
    if name == "sdpa_loop" and INFER_BUCKETS and _cpu_half_infer(q):
        impl = _bucketed_counted if _flop_counter_watching() else _bucketed_infer
        return impl(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    return _IMPLS[name](q, k, v, cu_seqlens, max_seqlen, lengths, scale)


def pad_pays(lengths: Optional[Sequence[int]], max_seqlen: int) -> bool:
    """Whether one padded call is cheaper than ``_sdpa_loop``'s calls (one per run of equal lengths):
    the padding's extra token pairs against ``PAD_CALL_COST`` per call saved."""
    if not lengths or len(set(lengths)) == 1:
        return False  # equal lengths: sdpa_loop already makes one batched call
    runs = 1 + sum(a != b for a, b in zip(lengths, lengths[1:]))
    M = -(-max(int(max_seqlen), 1) // PAD_MULTIPLE) * PAD_MULTIPLE
    extra = len(lengths) * M * M - sum(int(n) ** 2 for n in lengths)
    return extra <= PAD_CALL_COST * (runs - 1)


# The padding rule varlen_attention applies, (lengths, max_seqlen) -> pad?: a setting like the ones above,
# so a benchmark can time one batch both ways through the public call (benchmarks/bench_pad_rule.py).
PAD_RULE = pad_pays
