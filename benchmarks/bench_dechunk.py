"""Dechunk + plug-back cost on a 32x32 vs a 64x64 grid at the same kept share (fast path vs dense reference).

    python benchmarks/bench_dechunk.py [--quick]

Times ``dcdit.chunking.dechunk`` (smoothing over the kept tokens and plug-back
to every grid cell, fp32, the DC-DiT-S width D = 384) and the dense reference
``dechunk_dense`` (k x k smoothing, L x k nearest search per sample), on
random kept sets of the given share (at least one kept token per sample).
Target: time(64x64) / time(32x32) <= 5 for the fast path (linear is 4).
"""
from __future__ import annotations


import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shares", default="0.5,0.25,0.0625")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dense-repeats", type=int, default=3)
    p.add_argument("--sigma", type=float, default=1.0)
    args = p.parse_args()
    torch = C.setup(args, "dechunk")
    if args.quick:
        args.repeats, args.dense_repeats, args.shares = 5, 1, "0.25"
    info = C.machine()
    C.log(f"machine: {info}")

    from dcdit.chunking import PackedSeqs, chunk
    from dcdit.chunking.dechunk import dechunk, dechunk_dense, nearest_kept_index, smooth_kept

    B, D = args.batch, args.dim
    rows = []
    for share in [float(s) for s in args.shares.split(",")]:
        setups = {}
        for side in (32, 64):
            g = torch.Generator().manual_seed(side)
            L = side * side
            seqs = PackedSeqs.uniform(B, L, "cpu")
            keep = torch.rand(B, L, generator=g) < share
            keep[:, 0] = True
            h = torch.randn(B * L, D, generator=g)
            prob = torch.rand(B, L, generator=g) * 0.5 + 0.5
            hk, idx, sk = chunk(h, keep, seqs)
            setups[side] = (hk, seqs.unpad(prob)[idx], seqs.local[idx], sk, seqs, (side, side), args.sigma)
        fns = {}
        for side, a in setups.items():
            fns[f"dechunk {side}"] = lambda a=a: dechunk(*a)
            fns[f"plug-back index {side}"] = lambda a=a: nearest_kept_index(a[2], a[3], a[4], a[5])
            fns[f"smoothing {side}"] = lambda a=a: smooth_kept(a[0], a[1].clamp(1e-4, 1 - 1e-4), a[2], a[3], a[5],
                                                                 a[6])
        dense = {f"dense {side}": (lambda a=a: dechunk_dense(*a)) for side, a in setups.items()}
        C.log(f"share {share}: {args.repeats} rounds (fast), {args.dense_repeats} (dense)")
        with torch.inference_mode():
            with torch.no_grad():
                out_fast = dechunk(*setups[32])
                out_dense = dechunk_dense(*setups[32])
            err = float((out_fast - out_dense).abs().max())
            times = C.interleaved(fns, args.repeats, 2)
            times |= C.interleaved(dense, args.dense_repeats, 1)
        med = {k: C.median(v) for k, v in times.items()}
        row = {"share": share, "batch": B, "dim": D, "max_abs_err_vs_dense_32": err,
               "kept_per_sample": {side: a[3].total / B for side, a in setups.items()},
               "median_s": med, "seconds": times}
        for part in ("dechunk", "plug-back index", "smoothing", "dense"):
            row[f"ratio {part}"] = med[f"{part} 64"] / med[f"{part} 32"]
        rows.append(row)
        C.log(f"  fast {med['dechunk 32'] * 1e3:.1f} ms -> {med['dechunk 64'] * 1e3:.1f} ms "
              f"({row['ratio dechunk']:.2f}x); dense {med['dense 32'] * 1e3:.1f} -> {med['dense 64'] * 1e3:.1f} ms "
              f"({row['ratio dense']:.2f}x); max |fast - dense| {err:.2e}")
    print(report(rows))
    C.save(args, {"benchmark": "dechunk", "machine": info, "args": vars(args), "rows": rows})


def report(rows: list[dict]) -> str:
    head = ["kept share", "fast 32x32 ms", "fast 64x64 ms", "64/32 fast (<= 5)", "of which plug-back 64/32",
            "smoothing 64/32", "dense 32x32 ms", "dense 64x64 ms", "64/32 dense", "speed-up at 64x64"]
    body = []
    for r in rows:
        m = r["median_s"]
        body.append([f"{r['share']:g}", f"{m['dechunk 32'] * 1e3:.1f}", f"{m['dechunk 64'] * 1e3:.1f}",
                     f"{r['ratio dechunk']:.2f}", f"{r['ratio plug-back index']:.2f}", f"{r['ratio smoothing']:.2f}",
                     f"{m['dense 32'] * 1e3:.1f}", f"{m['dense 64'] * 1e3:.1f}", f"{r['ratio dense']:.2f}",
                     f"{m['dense 64'] / m['dechunk 64']:.1f}x"])
    return C.md_table(head, body)


if __name__ == "__main__":
    main()
