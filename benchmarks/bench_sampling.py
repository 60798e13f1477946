"""A full DDIM sampling run (50 steps) with timestep-dependent token counts: DiT vs DC-DiT, time and FLOPs.

    python benchmarks/bench_sampling.py [--quick] [--precision bf16|fp32] [--batch 4]

Models on a 32x32x4 latent: DC-DiT-S-N4 whose kept share follows the
timestep, 1/16 at t = 999 rising linearly to 1/2 at t = 0 (mean about 0.28;
exact per step, set by tail dropping on a router biased to keep every token:
an untrained router does not yet keep fewer tokens at noisy steps, this
emulates a trained one), DiT-S/2 (256 tokens: the paper's iso-size
baseline) and DiT-S/1 (the same 12 blocks on all 1024 tokens). One run with
per-step FLOP counting (also the warm-up), then interleaved timed runs.
bf16 runs the sampling calls inside one autocast region (weights are cast
once, not at every step).
"""
from __future__ import annotations


import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the FLOP-counted one (default 1)")
    p.add_argument("--no-dit1", action="store_true", help="skip DiT-S/1 (the slowest)")
    args = p.parse_args()
    torch = C.setup(args, f"sampling_{args.precision}")
    if args.quick:
        args.steps, args.repeats = 10, 1
    info = C.machine()
    C.log(f"machine: {info}")

    from dcdit.sampling import create_sampling_diffusion
    from dcdit.sampling.cost import RunCost
    from dcdit.sampling.sampler import sample

    dit1, dc = C.build_pair("S")
    models = {"DC-DiT-S (keep 1/16 -> 1/2 over t)": C.wrap(dc, args.precision, C.linear_keep_schedule()),
              "DiT-S/2": C.wrap(C.build_dit("S", 2), args.precision)}
    if not args.no_dit1:
        models["DiT-S/1"] = C.wrap(dit1, args.precision)
    labels = list(range(args.batch))
    diffusion = create_sampling_diffusion("ddim", args.steps, True)
    common = dict(seed=0, sampler="ddim", clip_denoised=False)

    rows = {}
    # one autocast region around the runs (as a user would sample): its weight cache then casts
    # each weight to bf16 once instead of at every step, for every model alike
    with torch.inference_mode(), C.autocast(args.precision):
        for name, m in models.items():
            C.log(f"FLOP-counted run (warm-up): {name}")
            _, stats = sample(m, diffusion, labels, measure_flops=True, **common)
            cost = RunCost.from_stats(stats)
            rows[name] = {"model": name, "gflops_per_image": cost.gflops_per_image,
                          "gflops_per_step": cost.gflops_per_step, "kept_share": cost.kept_share,
                          "kept_share_by_t": cost.kept_share_by_t, "timesteps": cost.timesteps}
        fns = {name: (lambda m=m: sample(m, diffusion, labels, measure_flops=False, **common))
               for name, m in models.items()}
        C.log(f"timing: {args.repeats} interleaved rounds of {list(fns)}")
        times = C.interleaved(fns, args.repeats, 0)
    ref = "DiT-S/1" if "DiT-S/1" in rows else "DiT-S/2"
    for name, r in rows.items():
        r["seconds"] = times[name]
        r["median_s"] = C.median(times[name])
        r["images_per_s"] = args.batch / r["median_s"]
    for name, r in rows.items():
        for base in ("DiT-S/2", "DiT-S/1"):
            if base in rows:
                r[f"time_vs_{base}"] = r["median_s"] / rows[base]["median_s"]
                r[f"flops_vs_{base}"] = r["gflops_per_image"] / rows[base]["gflops_per_image"]
    out = list(rows.values())
    print(report(out, args))
    C.save(args, {"benchmark": "sampling", "machine": info, "args": vars(args), "reference": ref, "rows": out})


def report(rows: list[dict], args) -> str:
    bases = [b for b in ("DiT-S/1", "DiT-S/2") if any(r["model"] == b for r in rows)]
    head = ["model", "mean kept share", "GFLOPs/img (run)", "run s", "img/s"]
    for b in bases:
        head += [f"time / {b}", f"FLOPs / {b}"]
    body = []
    for r in rows:
        line = [r["model"], "-" if r["kept_share"] is None else f"{r['kept_share']:.3f}",
                f"{r['gflops_per_image']:.1f}", f"{r['median_s']:.2f}", f"{r['images_per_s']:.3f}"]
        for b in bases:
            line += [f"{r[f'time_vs_{b}']:.3f}", f"{r[f'flops_vs_{b}']:.3f}"]
        body.append(line)
    return (f"{args.steps} DDIM steps, batch {args.batch}, {args.precision}\n\n" + C.md_table(head, body))


if __name__ == "__main__":
    main()
