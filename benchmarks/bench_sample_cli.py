#!/usr/bin/env python
"""Are `dcdit sample`'s defaults the fast path? The command's img/s against the reproduction's speed stage.

    python benchmarks/bench_sample_cli.py [--models pretrained:mnist-dit4,pretrained:mnist-repro-dcdit-n4]
        [--threads 2] [--rounds 3] [--num-samples 256] [--out benchmarks/results/sample_cli.json]

Per model and round (rounds interleave the models and the two ways, median per way):
* the speed stage's measurement (``reproduction.sampling_speed``: ``sample()`` in this process, DDIM 25,
  batch 100, the reproduction's precision, no FLOP counting), and
* ``dcdit sample --ckpt MODEL --batch-size 64 --steps 25 --num-samples N --npz TMP``, every other option at
  its default (sampler, precision, --flops first, progress bar off only because stderr is not a terminal),
  in a fresh process; its img/s is the one the command prints (sampling time: model loading and start-up
  excluded, as the speed stage excludes them), and the same command with ``--flops none`` (what the
  default FLOP count on the first batch costs).

Issue 26's goal: the command's img/s >= the speed stage's / 1.25 for each model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dcdit.checkpoint import load_model
from reproduction import Settings, sampling_speed

DEFAULT_MODELS = "pretrained:mnist-dit4,pretrained:mnist-repro-dcdit-n4"


def cli_images_per_second(model: str, num_samples: int, threads: int, tmp: Path, *extra: str) -> float:
    """One fresh ``dcdit sample`` process at its defaults (batch 64, 25 steps) + ``extra``; the img/s it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dcdit", "sample", "--ckpt", model, "--batch-size", "64", "--steps", "25",
           "--num-samples", str(num_samples), "--npz", str(tmp / "s.npz"), *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"= ([0-9.]+) img/s", out)
    if m is None:
        raise RuntimeError(f"no img/s in the output of {' '.join(cmd)}:\n{out}")
    return float(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=256, help="samples per dcdit sample run (default 256)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    models = {n: load_model(n, which="ema").eval() for n in names}
    s = Settings()
    stage: dict[str, list[float]] = {n: [] for n in names}
    cli: dict[str, list[float]] = {n: [] for n in names}
    cli_nf: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                stage[n].append(sampling_speed({n: models[n]}, s, seed=0)["images_per_sec"][n])
                cli[n].append(cli_images_per_second(n, args.num_samples, args.threads, Path(d)))
                cli_nf[n].append(cli_images_per_second(n, args.num_samples, args.threads, Path(d), "--flops", "none"))
                print(f"round {r}: {n}: speed stage {stage[n][-1]:.2f} img/s, dcdit sample {cli[n][-1]:.2f} img/s, "
                      f"with --flops none {cli_nf[n][-1]:.2f}", flush=True)
    rows = {n: {"speed_stage_img_s": statistics.median(stage[n]), "cli_img_s": statistics.median(cli[n]),
                "cli_flops_none_img_s": statistics.median(cli_nf[n]),
                "rounds_speed_stage": stage[n], "rounds_cli": cli[n], "rounds_cli_flops_none": cli_nf[n]} for n in names}
    for n, r in rows.items():
        r["ratio"] = r["speed_stage_img_s"] / r["cli_img_s"]
        r["held"] = r["ratio"] <= 1.25
        print(f"{n}: speed stage {r['speed_stage_img_s']:.2f} img/s (batch {s.speed_batch}), dcdit sample "
              f"{r['cli_img_s']:.2f} img/s (batch 64, defaults; {r['cli_flops_none_img_s']:.2f} with --flops none): "
              f"{r['ratio']:.2f}x ({'held' if r['held'] else 'not held'})")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
                "torch": torch.__version__, "num_samples": args.num_samples, "rounds": args.rounds}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "models": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
