"""``dcdit visualize``: routing maps over the denoising steps, cost over time and a class grid from a checkpoint."""
from __future__ import annotations

import argparse

from dcdit.cli.options import add_ckpt, add_device, add_precision, add_sampler, add_seed, add_tail_drop

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Plot routing maps over the denoising steps, kept share / FLOPs vs timestep, and a class grid (PNG)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt(p)
    p.add_argument("--out", required=True, help="output directory for the PNGs")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights to load (default: ema)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or inf (a diverged run's) and keep non-finite samples, for debugging")
    p.add_argument("--classes", default=None, help="comma list of classes, one grid row each (default: first 4)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default: 4)")
    p.add_argument("--rows", type=int, default=3, help="samples shown in the boundary-map figure (default: 3)")
    p.add_argument("--columns", type=int, default=6, help="steps shown in the boundary-map figure (default: 6)")
    add_sampler(p)
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    add_precision(p)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (default: 1, none)")
    add_tail_drop(p, "DC-DiT tail-drop fraction (default: 0)", default=0.0)
    p.add_argument("--batch-size", type=int, default=16, help="batch size for the grid samples (default: 16)")
    add_seed(p, "global seed")
    p.add_argument("--vae", default=None, metavar="DIR", help="local VAE directory to decode latents for display")
    p.add_argument("--space", choices=("auto", "latent", "pixel"), default="auto", help="model space (default: auto)")
    add_device(p)


def run(args) -> int:
    import sys
    import warnings
    from pathlib import Path

    import numpy as np
    import torch

    from dcdit.checkpoint import load_model
    from dcdit.cli.options import resolve_device
    from dcdit.models import is_dcdit
    from dcdit.sampling import (
        diffusion_for_checkpoint,
        is_latent_checkpoint,
        model_info,
        parse_classes,
        read_train_config,
        sample,
    )
    from dcdit.sampling.sampler import SampleStats
    from dcdit.viz import (
        RoutingRecord,
        RoutingRecorder,
        default_display,
        plot_boundary_maps,
        plot_class_grid,
        plot_cost_over_time,
    )

    for name in ("per_class", "rows", "columns", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    model = load_model(args.ckpt, which=args.which, map_location=device, allow_nonfinite=args.allow_nonfinite)
    info = model_info(model)
    routed = is_dcdit(model)
    if args.tail_drop and not routed:
        raise ValueError("--tail-drop needs a DC-DiT checkpoint")
    classes = parse_classes(args.classes, info["num_classes"]) or list(range(min(4, info["num_classes"])))
    train_cfg = read_train_config(args.ckpt)
    diffusion = diffusion_for_checkpoint(args.ckpt, model, args.sampler, args.steps)
    latent = args.space == "latent" or (args.space == "auto" and is_latent_checkpoint(train_cfg, info["in_channels"]))
    display = default_display
    if latent and args.vae:
        from dcdit.data.transforms import to_uint8_images
        from dcdit.sampling import latent_decoder

        decode = latent_decoder(args.vae, device)
        display = lambda z: to_uint8_images(decode(z).float().cpu())
    elif latent:
        warnings.warn("latent model without --vae: showing the first three latent channels", stacklevel=1)

    labels = np.repeat(np.asarray(classes), args.per_class)  # class-major: rows of the grid
    n = len(labels)
    kw = dict(seed=args.seed, sampler=args.sampler, cfg_scale=args.cfg_scale, tail_drop=args.tail_drop,
              clip_denoised=not latent, precision=args.precision, device=device, allow_nonfinite=args.allow_nonfinite)
    # The first `rows` samples one at a time with FLOP counting (per-sample cost and the maps);
    # per-sample seeds make them the same samples as in a batched run.
    rows = min(args.rows, n)
    records, finals, stats = [], [], []
    for k in range(rows):
        rec = RoutingRecorder()
        x, st = sample(model, diffusion, labels[k:k + 1], indices=[k], measure_flops=True, callback=rec, **kw)
        records.append(rec.record)
        finals.append(x)
        stats.append(st)
    for start in range(rows, n, args.batch_size):
        idx = list(range(start, min(n, start + args.batch_size)))
        x, st = sample(model, diffusion, labels[idx], indices=idx, measure_flops=False, **kw)
        finals.append(x)
        stats.append(st)
    merged = SampleStats.merge(stats)
    record = RoutingRecord.concat(records)
    images = np.concatenate([display(x) for x in finals])

    tag = (f"{Path(args.ckpt).name}, {args.sampler.upper()} {args.steps} steps, cfg {args.cfg_scale:g}, "
           f"tail drop {args.tail_drop:g}")
    written = []
    if routed and record["boundary_prob"] is not None:
        written.append(plot_boundary_maps(record, out / "boundary_maps.png", display=display,
                                          max_samples=rows, max_steps=args.columns,
                                          title=f"routing over the denoising steps ({tag})"))
    else:
        print("no routing to draw (not a DC-DiT): skipping boundary_maps.png", file=sys.stderr)
    written.append(plot_cost_over_time(merged.timesteps, out / "cost_vs_timestep.png", kept_share=merged.kept_share,
                                       flops=record["flops"], title=f"kept share (n={n}) and cost (n={rows}) - {tag}"))
    written.append(plot_class_grid(images, labels, out / "class_grid.png", per_class=args.per_class,
                                   title=f"samples by class ({tag})"))
    for p in written:
        print(f"wrote {p.path} ({p.panels} panels)")
    return 0
