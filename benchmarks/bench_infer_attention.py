#!/usr/bin/env python
"""DC-DiT's attention at sampling (bf16, CPU): one SDPA call per run of equal lengths against sequences
bucketed by their length rounded up to 32 (``dcdit.attention.backends.INFER_BUCKETS``), alone and inside
sampling, with DiT/4 beside them for the time-per-FLOP ratio of issue 26.

    python benchmarks/bench_infer_attention.py [--threads 2] [--rounds 5] [--out FILE.json]

Part 1: the attention kernel's time against the sequence length (100 x 4 heads x 32, bf16): PyTorch's
CPU kernel is fast on multiples of 32 rows. Part 2: packed batches of 100 sequences with lengths drawn
normal(mean, sd), 4 heads x 32: the per-length loop and the bucketed path, median ms. Part 3: DDIM-25
sampling of 100 images (bf16, clipped, no FLOP counting) with ``pretrained:mnist-dit4`` and
``pretrained:mnist-repro-dcdit-n4`` (both paths), the three runs interleaved round by round in one
process; img/s (median), GFLOPs per image (counted once per model), DC-DiT's time per FLOP over
DiT/4's, and the largest difference between the two DC-DiT paths' images.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

from common import median_ms  # benchmarks/common.py (a script's own folder is first on sys.path)
from dcdit.attention import backends as AB


def kernel_by_length(lengths=(48, 56, 64, 72, 80, 88, 94, 96, 128)) -> dict:
    out = {}
    with torch.inference_mode():
        for L in lengths:
            q, k, v = (torch.randn(100, 4, L, 32).bfloat16() for _ in range(3))
            out[L] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return out


def packed(mean: float, sd: float, n: int = 100, seed: int = 0) -> dict:
    lens = np.clip(np.random.default_rng(seed).normal(mean, sd, n).round(), 1, None).astype(int).tolist()
    T = sum(lens)
    cu = torch.tensor([0] + np.cumsum(lens).tolist())
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, 4, 32, generator=g).bfloat16() for _ in range(3))
    with torch.inference_mode():
        loop = lambda: AB._sdpa_loop(q, k, v, cu, max(lens), lens, None)
        buck = lambda: AB._bucketed_infer(q, k, v, cu, max(lens), lens, None)
        err = (loop().float() - buck().float()).abs().max().item()
        a, b = median_ms(loop), median_ms(buck)
    return {"mean": mean, "sd": sd, "distinct_lengths": len(set(lens)), "max": max(lens),
            "loop_ms": a, "bucketed_ms": b, "speedup": a / b, "max_abs_diff": err}


def sampling(rounds: int) -> dict:
    from dcdit.checkpoint import load_model
    from dcdit.sampling import sample, sampling_diffusion_for

    models = {n: load_model(f"pretrained:{n}").eval() for n in ("mnist-dit4", "mnist-repro-dcdit-n4")}
    diffs = {n: sampling_diffusion_for(m, "ddim", 25) for n, m in models.items()}
    labels = np.arange(100) % 10
    runs = {"dit4": ("mnist-dit4", True), "dcdit_loop": ("mnist-repro-dcdit-n4", False),
            "dcdit_bucketed": ("mnist-repro-dcdit-n4", True)}

    def run(key, count=False):
        n, buckets = runs[key]
        AB.INFER_BUCKETS = buckets
        x, st = sample(models[n], diffs[n], labels, seed=0, measure_flops=count, clip_denoised=True,
                       precision="bf16")
        if count:
            gflops[n] = st.gflops_per_image
        return x

    gflops = {}
    outs = {k: run(k, count=True) for k in runs}  # warm-up, and the FLOPs of the timed batch
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            outs[k] = run(k)
            times[k].append(time.perf_counter() - t0)
    AB.INFER_BUCKETS = True
    ips = {k: 100 / float(np.median(t)) for k, t in times.items()}
    per_flop = lambda k: (1 / ips[k] / gflops[runs[k][0]]) / (1 / ips["dit4"] / gflops["mnist-dit4"])
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()
    diff = (to_u8(outs["dcdit_loop"]) - to_u8(outs["dcdit_bucketed"])).abs()
    return {"images_per_sec": ips, "round_seconds": times, "gflops_per_image": gflops,
            "time_per_flop_vs_dit4": {k: per_flop(k) for k in ("dcdit_loop", "dcdit_bucketed")},
            "max_pixel_diff": float(diff.max()), "mean_pixel_diff": float(diff.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "threads": args.threads,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "loadavg_start": list(np.round(np.array(__import__("os").getloadavg()), 2))}
    res["kernel_ms_by_length"] = kernel_by_length()
    print("| length | SDPA ms (100 x 4 x L x 32, bf16) |\n|---:|---:|")
    for L, ms in res["kernel_ms_by_length"].items():
        print(f"| {L} | {ms:.2f} |")
    res["packed"] = [packed(m, s) for m, s in ((40, 15), (64, 15), (64, 30), (100, 30))]
    print("\n| lengths mean / sd | distinct | max | loop ms | bucketed ms | speed-up | max abs diff |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in res["packed"]:
        print(f"| {r['mean']} / {r['sd']} | {r['distinct_lengths']} | {r['max']} | {r['loop_ms']:.2f} "
              f"| {r['bucketed_ms']:.2f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.3g} |")
    s = res["sampling"] = sampling(args.rounds)
    print("\n| model | GFLOPs/img | img/s | time per FLOP / DiT/4's |\n|---|---:|---:|---:|")
    for k, n in (("dit4", "mnist-dit4"), ("dcdit_loop", "mnist-repro-dcdit-n4"), ("dcdit_bucketed", "mnist-repro-dcdit-n4")):
        ratio = s["time_per_flop_vs_dit4"].get(k, 1.0)
        print(f"| {k} | {s['gflops_per_image'][n]:.2f} | {s['images_per_sec'][k]:.1f} | {ratio:.2f}x |")
    print(f"\nDC-DiT images, per-length loop vs bucketed: max pixel difference {s['max_pixel_diff']:.0f} / 255, "
          f"mean {s['mean_pixel_diff']:.3f}")
    res["loadavg_end"] = list(np.round(np.array(__import__("os").getloadavg()), 2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
