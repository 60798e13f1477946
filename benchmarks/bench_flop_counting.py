#!/usr/bin/env python
"""What counting FLOPs costs at sampling (``sample(measure_flops=True)``, the Python API's default).

    python benchmarks/bench_flop_counting.py --threads 2 --repeats 5

DDIM-25 sampling of 100 images (bf16, clipped) with ``pretrained:mnist-dit4`` and
``pretrained:mnist-repro-dcdit-n4``, interleaved round by round in one process, three ways:

* ``uncounted``: ``measure_flops=False``;
* ``counted``: ``measure_flops=True`` as the library does it now: DC-DiT's bucketed attention runs with the
  counter switched off and shows it one shape-only (meta) attention call per distinct sequence length;
* ``counted_loop``: the earlier way (kept here to measure against): the counter watched a per-length loop
  of attention calls over the real tensors, whose every split, view and transpose went through Python.

Reports img/s (median), the counted runs' slowdown, and checks that both counted ways report the same
GFLOPs and the same images as the uncounted run.
"""
from __future__ import annotations

from common import base_parser, interleaved, log, machine, median, save, setup


def loop_counted(q, k, v, cu_seqlens, max_seqlen, lengths, scale):
    """The counted path before the meta calls: values from the bucketed path with the counter off, then the
    per-length loop over the real tensors under the counter (its output discarded)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from dcdit.attention import backends as AB

    with _disable_current_modes():
        out = AB._bucketed_infer(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    AB._sdpa_loop(q, k, v, cu_seqlens, max_seqlen, lengths, scale)
    return out


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n", type=int, default=100, help="images per run")
    args = p.parse_args(argv)
    torch = setup(args, "flop_counting")
    import numpy as np

    from dcdit.attention import backends as AB
    from dcdit.checkpoint import load_model
    from dcdit.sampling import sample, sampling_diffusion_for

    info = machine()
    labels = np.arange(args.n) % 10
    now = AB._bucketed_counted
    fns, outs, gflops = {}, {}, {}
    for name in ("mnist-dit4", "mnist-repro-dcdit-n4"):
        model = load_model(f"pretrained:{name}").eval()
        diffusion = sampling_diffusion_for(model, "ddim", 25)
        for way in ("uncounted", "counted", "counted_loop"):
            def run(model=model, diffusion=diffusion, way=way, key=f"{name}/{way}"):
                AB._bucketed_counted = loop_counted if way == "counted_loop" else now
                try:
                    x, st = sample(model, diffusion, labels, seed=0, clip_denoised=True, precision="bf16",
                                   measure_flops=way != "uncounted")
                finally:
                    AB._bucketed_counted = now
                outs[key], gflops[key] = x, st.gflops_per_image
            fns[f"{name}/{way}"] = run
    times = interleaved(fns, args.repeats, warmup=1)
    ips = {k: args.n / median(v) for k, v in times.items()}
    rows = []
    print("| model | uncounted img/s | counted img/s (now) | counted, per-length loop (before) | slowdown now | slowdown before |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("mnist-dit4", "mnist-repro-dcdit-n4"):
        u, c, b = (ips[f"{name}/{w}"] for w in ("uncounted", "counted", "counted_loop"))
        same_flops = gflops[f"{name}/counted"] == gflops[f"{name}/counted_loop"]
        same_images = all(torch.equal(outs[f"{name}/uncounted"], outs[f"{name}/{w}"]) for w in ("counted", "counted_loop"))
        rows.append({"model": name, "img_per_s": {"uncounted": u, "counted": c, "counted_loop": b},
                     "slowdown": {"counted": u / c, "counted_loop": u / b},
                     "gflops_per_image": gflops[f"{name}/counted"], "same_gflops": same_flops,
                     "same_images": same_images})
        print(f"| `pretrained:{name}` | {u:.1f} | {c:.1f} | {b:.1f} | {u / c:.2f}x | {u / b:.2f}x |")
        log(f"{name}: {gflops[f'{name}/counted']:.4f} GFLOPs/img; same GFLOPs both ways: {same_flops}; "
            f"same images counted or not: {same_images}")
    save(args, {"machine": info, "repeats": args.repeats, "n": args.n, "rows": rows, "round_seconds": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
