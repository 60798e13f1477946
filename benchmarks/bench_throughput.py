"""Training throughput as a share of the machine's bf16 matmul rate, measured in the same process.

    python benchmarks/bench_throughput.py [--threads 2] [--batch 64 256] [--compile] [--keep 0.25]

For each model of the learning-curve benchmark (MNIST 32x32 sizes) and batch
size: the median time of a full training step (train_step: forward under bf16
autocast, diffusion loss + ratio loss, backward, grad clip, AdamW, EMA
update), the step's useful FLOPs (3x the counted forward FLOPs: linear layers,
convolutions and attention, on the model's own routing), and that rate as a
fraction of a large bf16 matmul timed in the same run (interleaved rounds, so
load on a shared machine hits both). Results: benchmarks/results/throughput.json.

DC-DiT's work depends on its routing. A freshly initialised router keeps ~1% of
the tokens (the forced first and last of each sequence), and the ratio loss
then raises the share step by step, so timing the first steps of a new model
measures an almost empty main network whose size changes from step to step.
``--keep`` (default 0.25, the N=4 target that trained models settle at, ~64 of
256 tokens) shifts the router's output bias once so that this share is kept on
a benchmark batch; the FLOPs of every timed step are counted on that step's own
inputs and routing (a no-grad forward, untimed). ``--keep 0`` times the
initialised router, as before.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


def matmul_rate(torch, n: int = 1024, reps: int = 20) -> float:
    """GFLOP/s of a (n x n) @ (n x n) bf16 matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def calibrate_router(torch, model, keep: float, batch: int = 64) -> float:
    """Shift a DC-DiT's router output bias so that ``keep`` of the grid tokens are kept on a noisy
    benchmark batch (the forced first/last tokens left out of the quantile). Returns the shift."""
    from dcdit.diffusion import create_diffusion

    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 1, 32, 32, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    x_t = create_diffusion("").q_sample(x, t, noise=torch.randn(x.shape, generator=g))
    was_training = model.training
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, routing = model.eval()(x_t, t, y)
    model.train(was_training)
    p = routing[0].boundary_prob.flatten().double().clamp(1e-9, 1 - 1e-9)
    p = p[p < 1 - 1e-6]
    shift = -torch.quantile(torch.log(p / (1 - p)), 1 - keep).item()
    model.routing_module.residual_scorer[-1].bias.data += shift
    return shift


def make_step(torch, name: str, batch: int, compile_: bool, keep: float = 0.0):
    """(step, flops_next, kept): ``step()`` runs one training step; ``flops_next()`` the training FLOPs
    (3x forward) of the next step's inputs; ``kept`` collects each step's kept share (DC-DiT)."""
    from learning_curve import MODELS, train_gflops_per_image  # benchmarks/learning_curve.py (this folder is on sys.path)
    from dcdit.diffusion import create_diffusion
    from dcdit.flops import count_flops
    from dcdit.training.step import train_step
    from dcdit.training.trainer import update_ema

    m = MODELS[name]
    if m["arch"] == "dit":
        from dcdit.models.dit import build_dit as build
    else:
        from dcdit.models.dcdit import build_dcdit as build
    model = build(m["preset"], input_size=32, in_channels=1, num_classes=10, **m["overrides"]).train()
    dc = m["arch"] == "dcdit"
    if dc and keep > 0:
        calibrate_router(torch, model, keep)
    gflops = train_gflops_per_image(copy.deepcopy(model).float(), 32, 1) * batch
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    diffusion = create_diffusion("", min_snr_gamma=5.0)
    fwd_model = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    draw = lambda: (torch.randint(0, 1000, (batch,), generator=g), torch.randn(x.shape, generator=g))
    nxt, kept = [draw()], []

    def step():
        t, noise = nxt.pop()
        nxt.append(draw())
        loss, stats = train_step(fwd_model, diffusion, x, y, t, noise, bf16=True,
                                 ratio_weight=0.03 if dc else 0.0, ratio_N=4.0 if dc else None, ratio_group=16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.999)
        if dc:
            kept.append(float(stats["keep_natural_0"]))

    def flops_next() -> float:
        if not dc:  # a fixed token count: the same every step
            return gflops
        t, noise = nxt[0]
        x_t = diffusion.q_sample(x, t, noise=noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rep, _ = count_flops(lambda: model.eval()(x_t, t, y))
        model.train()
        return 3.0 * rep.total / 1e9

    return step, flops_next, kept


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["dit4", "dcdit_n4"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (DiT only)")
    ap.add_argument("--keep", type=float, default=0.25,
                    help="DC-DiT: calibrate the router to keep this share of tokens (0: as initialised)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = {}
    for name in a.models:
        for b in a.batch:
            for comp in ([False, True] if a.compile and name.startswith("dit") else [False]):
                key = f"{name} b{b}" + (" compiled" if comp else "")
                torch.manual_seed(0)  # the same initial weights whatever else runs
                step, flops_next, kept = make_step(torch, name, b, comp, a.keep)
                for _ in range(2 if not comp else 3):  # warm-up (and compilation)
                    step()
                variants[key] = dict(step=step, flops_next=flops_next, kept=kept, model=name, batch=b,
                                     compiled=comp, times=[], gflops=[])
    rates = []
    for r in range(a.rounds):
        rates.append(matmul_rate(torch))
        for v in variants.values():
            v["gflops"].append(v["flops_next"]())  # untimed: this step's own FLOPs
            t0 = time.perf_counter()
            v["step"]()
            v["times"].append(time.perf_counter() - t0)
    peak = statistics.median(rates)
    rows = []
    print(f"bf16 matmul (1024^3): {peak:.0f} GFLOP/s (median of {a.rounds}), {a.threads} thread(s)")
    print("| variant | step s | img/s | train GFLOP/step | GFLOP/s | share of bf16 matmul | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, v in variants.items():
        s = statistics.median(v["times"])
        gf = statistics.median(v["gflops"])
        rate = statistics.median(f / t for f, t in zip(v["gflops"], v["times"]))
        kept = statistics.median(v["kept"][-a.rounds:]) if v["kept"] else None
        rows.append(dict(variant=key, model=v["model"], batch=v["batch"], compiled=v["compiled"], step_s=s,
                         images_per_s=v["batch"] / s, train_gflop_per_step=gf, gflops_per_s=rate,
                         share_of_matmul=rate / peak, kept_share=kept, step_times=v["times"],
                         step_gflops=v["gflops"]))
        print(f"| {key} | {s:.3f} | {v['batch'] / s:.0f} | {gf:.1f} | {rate:.0f} | {rate / peak:.2f} | "
              f"{'' if kept is None else f'{kept:.2f}'} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(threads=a.threads, keep=a.keep, matmul_gflops=peak, matmul_rates=rates,
                                           rows=rows, date=time.strftime("%Y-%m-%d %H:%M")), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
