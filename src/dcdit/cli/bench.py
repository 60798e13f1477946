"""``dcdit bench``: wall-clock latency and images/s of DiT and DC-DiT side by side (same main network)."""
from __future__ import annotations

import argparse

from dcdit.cli.options import add_device, add_precision, add_sampler, add_tail_drops

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Benchmark DiT vs DC-DiT (same main network size): latency, images/s and GFLOPs per step, in one run."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("S", "B", "L", "XL"), default="S", help="main network size (default: S)")
    p.add_argument("--patch", type=int, default=2, help="DiT patch size (default: 2)")
    p.add_argument("--n", type=int, choices=(4, 16), default=4, help="DC-DiT compression preset N (default: 4)")
    p.add_argument("--dit-ckpt", default=None, help="use this DiT checkpoint instead of random weights")
    p.add_argument("--dcdit-ckpt", default=None, help="use this DC-DiT checkpoint instead of random weights")
    p.add_argument("--which", choices=("ema", "model"), default="ema",
                   help="checkpoints: weights to load (default: ema, else model)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or inf (a diverged run's) and keep non-finite outputs, for debugging")
    p.add_argument("--image-size", type=int, default=256, help="random models: image size (default: 256)")
    p.add_argument("--in-channels", type=int, default=4, help="random models: 4 = latents (size/8), else pixels")
    add_tail_drops(p, [0.0, 0.3, 0.5], "DC-DiT tail-drop fractions to time")
    p.add_argument("--keep-share", type=float, default=None,
                   help="random DC-DiT: calibrate the untrained router to keep this share (default: 1/N)")
    p.add_argument("--no-calibrate", action="store_true", help="random DC-DiT: leave the router at its init")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampling run (default: 4)")
    add_sampler(p)
    p.add_argument("--steps", type=int, default=5, help="sampling steps per timed run (default: 5)")
    add_precision(p)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (1: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_device(p)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def run(args) -> int:
    import platform
    import sys
    from pathlib import Path

    import torch

    from dcdit.checkpoint import load_model
    from dcdit.utils import save_json
    from dcdit.sampling import diffusion_for_checkpoint, model_info, resolve_precision, sample
    from dcdit.sampling.cost import build_named_model, calibrate_router_bias, measure_run_cost, time_interleaved
    from dcdit.sampling.seeds import labels_for_indices
    from dcdit.cli.options import resolve_device

    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    log = lambda s: print(s, file=sys.stderr, flush=True)

    dit_name, dc_name = f"DiT-{args.size}/{args.patch}", f"DC-DiT-{args.size}-N{args.n}"
    if args.dit_ckpt:
        dit = load_model(args.dit_ckpt, which=args.which, map_location=device, allow_nonfinite=args.allow_nonfinite)
        dit_label = f"{Path(args.dit_ckpt).name} ({args.which})"
    else:
        dit, dit_label = build_named_model(dit_name, args.image_size, args.in_channels).to(device), dit_name
    if args.dcdit_ckpt:
        dc = load_model(args.dcdit_ckpt, which=args.which, map_location=device, allow_nonfinite=args.allow_nonfinite)
        dc_label = f"{Path(args.dcdit_ckpt).name} ({args.which})"
    else:
        dc, dc_label = build_named_model(dc_name, args.image_size, args.in_channels).to(device), dc_name
    from dcdit.models import is_dcdit

    if args.dit_ckpt and is_dcdit(dit):
        raise ValueError(f"--dit-ckpt {args.dit_ckpt} holds a DC-DiT: give it as --dcdit-ckpt"
                         + (" (the two checkpoints look swapped)" if args.dcdit_ckpt and not is_dcdit(dc) else ""))
    if args.dcdit_ckpt and not is_dcdit(dc):
        raise ValueError(f"--dcdit-ckpt {args.dcdit_ckpt} holds a {type(dc).__name__}, not a DC-DiT: give it as "
                         "--dit-ckpt")
    di, ci = model_info(dit), model_info(dc)
    if (di["in_channels"], di["input_hw"]) != (ci["in_channels"], ci["input_hw"]):
        raise ValueError(f"the two models see different inputs: {dit_label} {di['in_channels']}x{di['input_hw']}, "
                         f"{dc_label} {ci['in_channels']}x{ci['input_hw']}")
    num_classes = min(di["num_classes"], ci["num_classes"])
    labels = labels_for_indices(range(args.batch_size), num_classes)
    precision = resolve_precision(args.precision, device)
    common = dict(seed=0, sampler=args.sampler, cfg_scale=args.cfg_scale, clip_denoised=False, device=device,
                  precision=precision, allow_nonfinite=args.allow_nonfinite)
    if not args.dcdit_ckpt and not args.no_calibrate:
        # Calibrate on the timed run itself, so the share in the label is the f = 0 row's kept share.
        target = args.keep_share if args.keep_share is not None else 1.0 / args.n
        d0 = diffusion_for_checkpoint(None, dc, args.sampler, args.steps)  # an untrained, built model
        reached = calibrate_router_bias(dc, target, share_fn=lambda: sample(
            dc, d0, labels, tail_drop=0.0, measure_flops=False, **common)[1].mean_kept_share[0])
        dc_label += f" (router calibrated: keeps {reached:.3f} at f=0)"

    setups = []  # (label, arch, tail_drop, model, diffusion)
    for model, ckpt, label, tail_drops in ((dit, args.dit_ckpt, dit_label, [0.0]),
                                           (dc, args.dcdit_ckpt, dc_label, args.tail_drop)):
        diffusion = diffusion_for_checkpoint(ckpt, model, args.sampler, args.steps)
        setups += [(label, type(model).__name__, tail_drop, model, diffusion) for tail_drop in tail_drops]
    rows = []
    for label, arch, tail_drop, model, diffusion in setups:
        log(f"counting FLOPs: {label} tail drop {tail_drop:g}")
        cost = measure_run_cost(model, diffusion, labels, tail_drop=tail_drop, **common)
        rows.append({"model": label, "arch": arch, "tail_drop": tail_drop, "kept_share": cost.kept_share,
                     "gflops_per_step": cost.gflops_per_step, "gflops_per_image": cost.gflops_per_image})
    log(f"timing {len(setups)} setups, {args.warmup} warm-up + {args.repeats} interleaved repeats")
    timings = time_interleaved([(m, d, labels, dict(common, tail_drop=tail_drop)) for _, _, tail_drop, m, d in setups],
                               repeats=args.repeats, warmup=args.warmup)
    for r, timing in zip(rows, timings):
        r.update(timing.to_dict())
    base = rows[0]
    for r in rows:
        r["speedup_vs_dit"] = base["median_seconds"] / r["median_seconds"]
        r["flops_vs_dit"] = r["gflops_per_step"] / base["gflops_per_step"]

    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads) | "
          f"batch {args.batch_size} | {args.sampler.upper()} {args.steps} steps | {precision} | "
          f"cfg {args.cfg_scale:g} | median of {args.repeats} "
          f"interleaved runs after {args.warmup} warm-up; speedup = DiT time / time, FLOPs = GFLOPs / DiT's")
    print(format_bench_table(rows))
    if args.json:
        save_json(args.json, {"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                              "sampler": args.sampler, "steps": args.steps, "precision": precision,
                              "cfg_scale": args.cfg_scale, "repeats": args.repeats,
                              "warmup": args.warmup, "rows": rows})
        print(f"wrote {args.json}")
    return 0


def format_bench_table(rows: list[dict]) -> str:
    width = max(len(r["model"]) for r in rows)
    lines = [f"{'model':<{width}} {'f':>5} {'kept':>6} {'GFLOPs/img/step':>16} {'ms/step':>9} {'img/s':>8} "
             f"{'speedup':>8} {'FLOPs':>7}"]
    for r in rows:
        kept = "-" if r["kept_share"] is None else f"{r['kept_share']:.3f}"
        f = "-" if r["arch"] == "DiT" else f"{r['tail_drop']:g}"
        lines.append(f"{r['model']:<{width}} {f:>5} {kept:>6} {r['gflops_per_step']:>16.4g} {r['ms_per_step']:>9.1f} "
                     f"{r['images_per_second']:>8.3f} {r['speedup_vs_dit']:>7.2f}x {r['flops_vs_dit']:>6.2f}x")
    return "\n".join(lines)
