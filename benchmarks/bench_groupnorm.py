#!/usr/bin/env python
"""GroupNorm on the scaffold's bf16 channels-last activations at inference: torch's kernel against
``dcdit.chunking.packing.GroupNorm`` (an NCHW copy for groups of < 16 channels), alone and inside sampling.

    python benchmarks/bench_groupnorm.py [--ckpt RUN_OR_CKPT ...] [--threads 1] [--rounds 5]

Part 1: (64, C, 16, 16) bf16 channels-last, 8 groups, median ms of 30 calls each. Part 2 (per --ckpt):
DDIM-10 sampling of 64 images, bf16, torch's GroupNorm and ours interleaved round by round in one
process (median img/s), and the largest pixel difference of the two runs' images (uint8).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import median_ms  # benchmarks/common.py (a script's own folder is first on sys.path)
from dcdit.chunking import packing


OURS = packing.GroupNorm.forward


def torch_forward(self, x):  # what packing.GroupNorm did at inference before (and nn.GroupNorm does)
    if torch.is_grad_enabled():
        return OURS(self, x)
    return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", nargs="*", default=[], help="DC-DiT checkpoints to sample (part 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| channels (8 groups) | torch ms | ours ms | speed-up |\n|---:|---:|---:|---:|")
    for c in (16, 32, 64, 128):
        gn = packing.GroupNorm(8, c)
        x = torch.randn(64, c, 16, 16).bfloat16().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            a, b = median_ms(lambda: torch_forward(gn, x), 30), median_ms(lambda: gn(x), 30)
        print(f"| {c} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    if args.ckpt:
        from dcdit.checkpoint import load_model
        from dcdit.sampling import generate_local, sampling_diffusion_for

        print("\n| checkpoint | torch GroupNorm img/s | ours img/s | speed-up | max pixel difference |\n|---|---:|---:|---:|---:|")
        for ck in args.ckpt:
            m = load_model(ck).eval()
            d = sampling_diffusion_for(m, "ddim", 10)
            run = lambda: generate_local(m, d, 64, batch_size=64, seed=0, clip_denoised=True, precision="auto",
                                         flops="none").images
            times, outs = {"torch": [], "ours": []}, {}
            run()
            for _ in range(args.rounds):
                for k, f in (("torch", torch_forward), ("ours", OURS)):
                    packing.GroupNorm.forward = f
                    t0 = time.perf_counter()
                    outs[k] = run()
                    times[k].append(time.perf_counter() - t0)
            packing.GroupNorm.forward = OURS
            ips = {k: 64 / sorted(v)[len(v) // 2] for k, v in times.items()}
            diff = int(np.abs(outs["torch"].astype(int) - outs["ours"].astype(int)).max())
            print(f"| {ck} | {ips['torch']:.1f} | {ips['ours']:.1f} | {ips['ours'] / ips['torch']:.2f}x | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
