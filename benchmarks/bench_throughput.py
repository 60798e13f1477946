"""Training throughput as a share of the machine's bf16 matmul rate, measured in the same process.

    python benchmarks/bench_throughput.py [--threads 2] [--batch 64 256] [--compile]

For each model of the learning-curve benchmark (MNIST 32x32 sizes) and batch
size: the median time of a full training step (train_step: forward under bf16
autocast, diffusion loss + ratio loss, backward, grad clip, AdamW, EMA
update), the step's useful FLOPs (3x the counted forward FLOPs: linear layers,
convolutions and attention, on the model's own routing), and that rate as a
fraction of a large bf16 matmul timed in the same run (interleaved rounds, so
load on a shared machine hits both). Results: benchmarks/results/throughput.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def matmul_rate(torch, n: int = 1024, reps: int = 20) -> float:
    """GFLOP/s of a (n x n) @ (n x n) bf16 matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def make_step(torch, name: str, batch: int, compile_: bool):
    from learning_curve import MODELS, train_gflops_per_image
    from dcdit.diffusion import create_diffusion
    from dcdit.training.step import train_step
    from dcdit.training.trainer import update_ema

    m = MODELS[name]
    if m["arch"] == "dit":
        from dcdit.models.dit import build_dit as build
    else:
        from dcdit.models.dcdit import build_dcdit as build
    model = build(m["preset"], input_size=32, in_channels=1, num_classes=10, **m["overrides"]).train()
    gflops = train_gflops_per_image(copy.deepcopy(model).float(), 32, 1) * batch
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    diffusion = create_diffusion("", min_snr_gamma=5.0)
    fwd_model = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    dc = m["arch"] == "dcdit"

    def step():
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss, _ = train_step(fwd_model, diffusion, x, y, t, torch.randn(x.shape, generator=g), bf16=True,
                             ratio_weight=0.03 if dc else 0.0, ratio_N=4.0 if dc else None, ratio_group=16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.999)

    return step, gflops


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["dit4", "dcdit_n4"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (DiT only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = {}
    for name in a.models:
        for b in a.batch:
            for comp in ([False, True] if a.compile and name.startswith("dit") else [False]):
                key = f"{name} b{b}" + (" compiled" if comp else "")
                step, gflops = make_step(torch, name, b, comp)
                for _ in range(2 if not comp else 3):  # warm-up (and compilation)
                    step()
                variants[key] = dict(step=step, gflops=gflops, model=name, batch=b, compiled=comp, times=[])
    rates = []
    for r in range(a.rounds):
        rates.append(matmul_rate(torch))
        for v in variants.values():
            t0 = time.perf_counter()
            v["step"]()
            v["times"].append(time.perf_counter() - t0)
    peak = statistics.median(rates)
    rows = []
    print(f"bf16 matmul (1024^3): {peak:.0f} GFLOP/s (median of {a.rounds}), {a.threads} thread(s)")
    print("| variant | step s | img/s | train GFLOP/step | GFLOP/s | share of bf16 matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, v in variants.items():
        s = statistics.median(v["times"])
        rate = v["gflops"] / s
        rows.append(dict(variant=key, model=v["model"], batch=v["batch"], compiled=v["compiled"], step_s=s,
                         images_per_s=v["batch"] / s, train_gflop_per_step=v["gflops"], gflops_per_s=rate,
                         share_of_matmul=rate / peak))
        print(f"| {key} | {s:.3f} | {v['batch'] / s:.0f} | {v['gflops']:.1f} | {rate:.0f} | {rate / peak:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(threads=a.threads, matmul_gflops=peak, matmul_rates=rates, rows=rows,
                                           date=time.strftime("%Y-%m-%d %H:%M")), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
