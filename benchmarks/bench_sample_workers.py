#!/usr/bin/env python
"""Batches side by side: ``generate_local(workers=...)`` (``dcdit sample --workers``) at 2 threads.

    python benchmarks/bench_sample_workers.py --threads 2 --repeats 3 [--n 256] [--batch 64]

DDIM-25 sampling of N images in batches (bf16, clipped, no FLOP counting) with ``pretrained:mnist-dit4`` and
``pretrained:mnist-repro-dcdit-n4``, each with one worker (one batch at a time on all threads) and with two
(two batches side by side, half the threads each), the four runs interleaved round by round in one process.
Reports img/s (median), the two-worker speed-up, DC-DiT's time per FLOP over DiT/4's in each setting (GFLOPs
per image counted once per model on its first batch), and checks that the images do not depend on the
number of workers.
"""
from __future__ import annotations

from common import base_parser, interleaved, log, machine, median, save, setup


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=256, help="images per run")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch = setup(args, "sample_workers")
    import numpy as np

    from dcdit.checkpoint import load_model
    from dcdit.sampling import generate_local, sampling_diffusion_for

    info = machine()
    models = {n: load_model(f"pretrained:{n}").eval() for n in ("mnist-dit4", "mnist-repro-dcdit-n4")}
    diffs = {n: sampling_diffusion_for(m, "ddim", 25) for n, m in models.items()}
    kw = dict(batch_size=args.batch, clip_denoised=True, precision="bf16")
    gflops = {n: generate_local(m, diffs[n], args.batch, flops="first", **kw).stats.gflops_per_image
              for n, m in models.items()}
    images, fns = {}, {}
    for n, m in models.items():
        for w in (1, 2):
            def run(n=n, m=m, w=w):
                images[(n, w)] = generate_local(m, diffs[n], args.n, flops="none", workers=w, **kw).images
            fns[f"{n}/workers={w}"] = run
    times = interleaved(fns, args.repeats, warmup=1)
    ips = {k: args.n / median(v) for k, v in times.items()}
    per_flop = {w: (1 / ips[f"mnist-repro-dcdit-n4/workers={w}"] / gflops["mnist-repro-dcdit-n4"])
                / (1 / ips[f"mnist-dit4/workers={w}"] / gflops["mnist-dit4"]) for w in (1, 2)}
    rows = []
    print("| model | GFLOPs/img | img/s, 1 worker | img/s, 2 workers | speed-up | same images |")
    print("|---|---:|---:|---:|---:|---|")
    for n in models:
        a, b = ips[f"{n}/workers=1"], ips[f"{n}/workers=2"]
        same = bool(np.array_equal(images[(n, 1)], images[(n, 2)]))
        diff = int(np.abs(images[(n, 1)].astype(int) - images[(n, 2)].astype(int)).max())
        rows.append({"model": n, "gflops_per_image": gflops[n], "img_per_s": {"1": a, "2": b}, "speedup": b / a,
                     "same_images": same, "max_pixel_diff": diff})
        print(f"| `pretrained:{n}` | {gflops[n]:.2f} | {a:.1f} | {b:.1f} | {b / a:.2f}x | "
              f"{'yes' if same else f'no (max diff {diff})'} |")
    print(f"\nDC-DiT time per FLOP / DiT/4's: {per_flop[1]:.2f}x with 1 worker, {per_flop[2]:.2f}x with 2")
    log(f"threads {torch.get_num_threads()}, n {args.n}, batch {args.batch}")
    save(args, {"machine": info, "repeats": args.repeats, "n": args.n, "batch": args.batch, "rows": rows,
                "time_per_flop_vs_dit4": per_flop, "round_seconds": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
