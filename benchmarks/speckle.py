#!/usr/bin/env python
"""How much of a canvas model's FID is background speckle? FID of the same samples before and after
setting faint pixels (< --threshold of 255) to black, for each model.

    python benchmarks/speckle.py runs/canvas/runs/dcdit_s0/ckpt-0004000:dcdit runs/canvas/runs/dit8_s0/ckpt-0004000:dit8 \\
        [--n 1000] [--threshold 64] [--out docs/canvas/speckle.json]

Samples: DDIM-25, cfg 1, class-balanced labels, per-sample seeds (``generate_local``), bf16; FID with
Inception features against the first --n canvas test images. The thresholded reference is thresholded
the same way, so clean canvases score as before; a model whose FID drops much more than the
reference's own change owes that much of its distance to faint pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.checkpoint import load_model
from dcdit.evaluation import ReferenceScorer, build_extractor
from dcdit.sampling import generate_local, sampling_diffusion_for
from reproduction import dataset, dataset_uint8
from canvas import canvas_settings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="CKPT:LABEL")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threshold", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = build_extractor("inception", batch_size=50)
    ref, _ = dataset_uint8(dataset(canvas_settings(), "test"), args.n)
    clean = lambda x: np.where(x < args.threshold, 0, x).astype(np.uint8)
    raw_ref, thr_ref = ReferenceScorer.from_images(ext, ref), ReferenceScorer.from_images(ext, clean(ref))
    rows = {"reference_thresholded_vs_raw": raw_ref.fid(clean(ref))[0]}
    for spec in args.models:
        ckpt, _, label = spec.rpartition(":")
        model = load_model(ckpt).eval()
        t0 = time.time()
        x = generate_local(model, sampling_diffusion_for(model, "ddim", 25), args.n, batch_size=100, seed=0,
                           clip_denoised=True, precision="auto", flops="none").images
        faint = float(((x > 0) & (x < args.threshold)).mean())
        rows[label] = {"ckpt": ckpt, "fid": raw_ref.fid(x)[0], "fid_thresholded": thr_ref.fid(clean(x))[0],
                       "faint_pixel_share": faint, "seconds": round(time.time() - t0, 1)}
        print(f"{label}: FID {rows[label]['fid']:.1f} -> {rows[label]['fid_thresholded']:.1f} with pixels < "
              f"{args.threshold} set to 0 (faint pixels: {faint:.1%})", flush=True)
    print(f"reference: its thresholded copy is FID {rows['reference_thresholded_vs_raw']:.2f} from itself")
    if args.out:
        meta = {"n": args.n, "threshold": args.threshold, "date": time.strftime("%Y-%m-%d"),
                "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
        Path(args.out).write_text(json.dumps({"meta": meta, "models": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
