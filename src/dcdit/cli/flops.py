"""``dcdit flops``: per-component FLOPs per sampling step and per image over a whole sampling run."""
from __future__ import annotations

import argparse

from dcdit.cli.options import add_ckpt, add_precision, add_sampler, add_seed, add_tail_drop, add_tail_drops

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "FLOPs per component, per sampling step and per image over a real sampling run (each step counted)."


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--ckpt / --model and the shape options of a registry model (shared with ``dcdit bench``)."""
    src = p.add_mutually_exclusive_group(required=True)
    add_ckpt(src, required=False)
    src.add_argument("--model", help="registry name with random weights, e.g. DiT-S/2 or DC-DiT-S-N4")
    src.add_argument("--config", metavar="YAML",
                     help="a training config's model with random weights, sized to its data (before training it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--config: override a config key (repeatable), as in dcdit train")
    p.add_argument("--which", choices=("ema", "model"), default="ema",
                   help="--ckpt: weights to load (default: ema, else model)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or inf (a diverged run's) and keep non-finite outputs, for debugging")
    p.add_argument("--image-size", type=int, default=256, help="--model: image size in pixels (default: 256)")
    p.add_argument("--in-channels", type=int, default=4, help="--model: 4 = SD-VAE latents (size/8), else pixels")
    p.add_argument("--num-classes", type=int, default=1000, help="--model: classes (default: 1000)")
    p.add_argument("--calibrate-router", type=float, default=None, metavar="SHARE",
                   help="--model / --config DC-DiT: set the untrained router's bias to keep about SHARE of the tokens")


def load_for_cost(args, share_fn_for=None):
    """The model named by --ckpt or --model (with optional router calibration) and a label for tables.

    ``share_fn_for(model)`` gives the kept-share measurement the calibration
    aims at (the run that is then counted); default: noise inputs.
    """
    from pathlib import Path

    import torch

    from dcdit.checkpoint import load_model
    from dcdit.sampling.cost import build_named_model, calibrate_router_bias

    if args.ckpt:
        if args.calibrate_router is not None:
            raise ValueError("--calibrate-router is for untrained --model networks, not checkpoints")
        return load_model(args.ckpt, which=args.which, allow_nonfinite=args.allow_nonfinite), f"{Path(args.ckpt).name} ({args.which})"
    if args.set and not args.config:
        raise ValueError("--set overrides a --config")
    if args.config:
        from dcdit.data import build_dataset
        from dcdit.training import load_train_config
        from dcdit.training.trainer import build_train_model

        cfg = load_train_config(args.config, args.set)
        torch.manual_seed(cfg.train.seed)
        model, name = build_train_model(cfg, build_dataset(cfg.data)).eval(), cfg.name
    else:
        model, name = build_named_model(args.model, args.image_size, args.in_channels, args.num_classes), args.model
    label = f"{name} (random init)"
    if args.calibrate_router is not None:
        share_fn = share_fn_for(model) if share_fn_for is not None else None
        share = calibrate_router_bias(model, args.calibrate_router, share_fn=share_fn)
        label = f"{name} (random init, router calibrated: keeps {share:.3f} at tail drop 0)"
    return model, label


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampler(p)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    add_tail_drops(p, [0.0])
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (1: none; >1 counts both halves)")
    add_tail_drop(p, "Lite-CFG: tail-drop fraction of the unconditional half", "--uncond-drop")
    p.add_argument("--batch-size", type=int, default=2, help="images in the counted run (default: 2)")
    add_seed(p, "seed of the counted run")
    add_precision(p)
    p.add_argument("--per-step", action="store_true", help="also print GFLOPs and kept share per timestep")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def run(args) -> int:
    from dcdit.utils import save_json
    from dcdit.models import is_dcdit
    from dcdit.sampling import diffusion_for_checkpoint, model_info, sample
    from dcdit.sampling.cost import measure_run_cost
    from dcdit.sampling.seeds import labels_for_indices

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    def run_kwargs(model):
        info = model_info(model)
        diffusion = diffusion_for_checkpoint(args.ckpt, model, args.sampler, args.steps)
        labels = labels_for_indices(range(args.batch_size), info["num_classes"])
        return diffusion, labels, dict(seed=args.seed, sampler=args.sampler, cfg_scale=args.cfg_scale,
                                       clip_denoised=False, allow_nonfinite=args.allow_nonfinite,
                                       precision=args.precision)

    def share_fn_for(model):  # calibrate on the counted run itself (tail drop 0)
        diffusion, labels, kw = run_kwargs(model)
        return lambda: sample(model, diffusion, labels, measure_flops=False, **kw)[1].mean_kept_share[0]

    model, label = load_for_cost(args, share_fn_for)
    if not is_dcdit(model) and (any(args.tail_drop) or args.uncond_drop is not None):
        raise ValueError(f"tail dropping needs a DC-DiT; {label} is a {type(model).__name__}")
    diffusion, labels, kw = run_kwargs(model)
    costs = [measure_run_cost(model, diffusion, labels, tail_drop=tail_drop, uncond_drop=args.uncond_drop, **kw)
             for tail_drop in args.tail_drop]
    print(f"{label} | {args.sampler.upper()} {args.steps} steps | batch {args.batch_size} | cfg {args.cfg_scale:g}"
          + (f" | uncond drop {args.uncond_drop:g}" if args.uncond_drop is not None else ""))
    print("GFLOPs = 2 x GMACs, attention included; per image (with guidance both halves count).")
    print(format_cost_table(costs))
    if args.per_step:
        print()
        print(format_per_step(costs))
    if args.json:
        save_json(args.json, {"model": label, "sampler": args.sampler, "steps": args.steps,
                              "cfg_scale": args.cfg_scale, "batch_size": args.batch_size,
                              "runs": [c.to_dict() for c in costs]})
        print(f"wrote {args.json}")
    return 0


def format_cost_table(costs) -> str:
    """Summary rows per tail-drop fraction, then GFLOPs per image per step by component."""
    lines = [f"{'tail drop':>9} {'kept':>6} {'GFLOPs/step':>12} {'min..max over t':>19} {'GFLOPs/image':>13} "
             f"{'GMACs/step':>11}"]
    for c in costs:
        kept = "-" if c.kept_share is None else f"{c.kept_share:.3f}"
        rng = f"{min(c.gflops_by_t):.4g}..{max(c.gflops_by_t):.4g}"
        lines.append(f"{c.tail_drop:>9.3g} {kept:>6} {c.gflops_per_step:>12.4g} {rng:>19} {c.gflops_per_image:>13.4g} "
                     f"{c.gflops_per_step / 2:>11.4g}")
    comps = sorted({k for c in costs for k in c.components_per_step}, key=lambda k: -costs[0].components_per_step.get(k, 0))
    lines.append("")
    head = "".join(f"{'f=' + format(c.tail_drop, 'g'):>12}" for c in costs)
    lines.append(f"{'component (GFLOPs/step)':<24}{head}{'share':>8}")
    for k in comps:
        vals = "".join(f"{c.components_per_step.get(k, 0.0):>12.4g}" for c in costs)
        share = costs[0].components_per_step.get(k, 0.0) / max(costs[0].gflops_per_step, 1e-30)
        lines.append(f"{k:<24}{vals}{share:>8.1%}")
    lines.append(f"{'total':<24}" + "".join(f"{c.gflops_per_step:>12.4g}" for c in costs))
    lines.append(f"{'total per image (run)':<24}" + "".join(f"{c.gflops_per_image:>12.4g}" for c in costs))
    return "\n".join(lines)


def format_per_step(costs) -> str:
    """GFLOPs (and kept share) per timestep for every fraction."""
    head = "".join(f"{'f=' + format(c.tail_drop, 'g'):>18}" for c in costs)
    lines = [f"{'t':>5}{head}   (GFLOPs/step, kept share)"]
    for i, t in enumerate(costs[0].timesteps):
        cells = ""
        for c in costs:
            kept = "" if c.kept_share_by_t is None else f" ({c.kept_share_by_t[i]:.2f})"
            cells += f"{format(c.gflops_by_t[i], '.4g') + kept:>18}"
        lines.append(f"{t:>5}{cells}")
    return "\n".join(lines)
