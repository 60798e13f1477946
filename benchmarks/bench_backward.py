"""DC-DiT training step: the three backward fixes against autograd's generic path, side by side.

    python benchmarks/bench_backward.py [--quick]

The model is the reproduction's DC-DiT (MNIST 32x32x1, patch 1, width 128,
c2 / D4 / c2, batch 32, bf16 autocast, the kept share set exactly per sample
by tail dropping: 1/8 to 3/8, mean 1/4, so sequence lengths vary as with a
trained router). Each row times forward + loss + backward + AdamW with one
fix switched back to the generic path (and all three at once), interleaved
with the current code in the same process; medians and their ratio.

- GroupNorm: the grid stages hand GroupNorm channels-last views; the generic
  backward kernel for that layout is ~10x slower than for NCHW
  (``dcdit.chunking.packing.GroupNorm`` runs its backward on NCHW copies).
- sdpa_loop: per-run slicing of the packed q/k/v zero-fills a full (T, H, d)
  gradient per run in backward; one ``split`` per tensor does a single cat.
- dechunk Toeplitz: autograd multiplies by an expanded, transposed kernel;
  the kernel is symmetric, so the backward reuses the forward's matmul.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def sliced_sdpa_loop(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    """The generic path: one slice of q/k/v per run of equal lengths."""
    import torch
    import torch.nn.functional as F

    outs, start, i, n = [], 0, 0, len(lengths)
    while i < n:
        j = i
        while j + 1 < n and lengths[j + 1] == lengths[i]:
            j += 1
        L, m = lengths[i], j - i + 1
        end = start + L * m
        if L > 0:
            qs, ks, vs = (t[start:end].unflatten(0, (m, L)).transpose(1, 2) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).flatten(0, 1))
        start, i = end, j + 1
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()


@contextmanager
def generic(which: str):
    """Switch one fix (or "all") back to autograd's generic path for the duration."""
    import importlib

    import torch
    import torch.nn as nn

    from dcdit.chunking.packing import GroupNorm

    AB = importlib.import_module("dcdit.attention.backends")
    DK = importlib.import_module("dcdit.chunking.dechunk")  # the package re-exports a function of that name

    saved = (GroupNorm.forward, AB._IMPLS["sdpa_loop"], DK._toeplitz_matmul)
    try:
        if which in ("groupnorm", "all"):
            GroupNorm.forward = nn.GroupNorm.forward
        if which in ("sdpa_loop", "all"):
            AB._IMPLS["sdpa_loop"] = sliced_sdpa_loop
        if which in ("toeplitz", "all"):
            DK._toeplitz_matmul = torch.matmul
        yield
    finally:
        GroupNorm.forward, AB._IMPLS["sdpa_loop"], DK._toeplitz_matmul = saved


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch = C.setup(args, "backward")
    if args.quick:
        args.repeats = 3
    info = C.machine()
    C.log(f"machine: {info}")

    from bench_train import make_step

    from dcdit.diffusion import create_diffusion
    from dcdit.models import DCDiT, DCDiTConfig

    import importlib

    # the sdpa_loop row is about the per-sequence loop, which bf16 training on CPU no longer takes by
    # default (one padded batched-matmul call, issue 13 part 3): time the loop path it describes
    importlib.import_module("dcdit.attention.backends").CPU_TRAIN_ATTENTION = "fp32"
    torch.manual_seed(0)
    cfg = DCDiTConfig(input_size=32, in_channels=1, num_classes=10, patch_size=1, arch_layout=["c2", ["D4"], "c2"],
                      d_model=[128, 128], num_heads=[4, 4])
    model = DCDiT(cfg).train()
    C.keep_all_boundaries(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    diffusion = create_diffusion(None)
    B = args.batch
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, 1, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
    # kept counts 1/8 .. 3/8 of the 1024 tokens across the batch (mean 1/4): a trained router's lengths vary
    # per sample, so the packed batch holds B runs of different lengths, as in training
    drops = torch.tensor([C.drop_for_share(s, 1024) for s in torch.linspace(0.125, 0.375, B).tolist()])
    step = make_step(torch, model, diffusion, opt, x, y, drops, True, 4.0)

    def run(which):
        def f():
            t, noise = torch.randint(0, 1000, (B,), generator=g), torch.randn(B, 1, 32, 32, generator=g)
            with ExitStack() as stack:
                if which != "current":
                    stack.enter_context(generic(which))
                step(t, noise)
        return f

    variants = ("current", "groupnorm", "sdpa_loop", "toeplitz", "all")
    C.log(f"train step: 1 warm-up + {args.repeats} interleaved rounds of {variants}")
    times = C.interleaved({v: run(v) for v in variants}, args.repeats, 1)
    cur = C.median(times["current"])
    rows = []
    for v in variants:
        med = C.median(times[v])
        rows.append({"generic_path": "none (current code)" if v == "current" else v, "step_s": med,
                     "vs_current": med / cur, "seconds": times[v]})
    print(C.md_table(["generic path for", "step s (median)", "time / current"],
                     [[r["generic_path"], f"{r['step_s']:.3f}", f"{r['vs_current']:.2f}x"] for r in rows]))
    C.save(args, {"machine": info, "batch": B, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
