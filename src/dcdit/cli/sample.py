"""``dcdit sample``: images from a checkpoint (DDPM/DDIM/DPM-Solver++/UniPC/Euler, guidance, Lite-CFG, compute
budgets, precision, DDP)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dcdit.cli.options import add_ckpt, add_device, add_precision, add_sampler, add_seed, add_tail_drop

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = ("Sample images from a checkpoint: DDPM/DDIM or diffusers' DPM-Solver++/UniPC/Euler, guidance, Lite-CFG, "
        "compute budgets; PNG grid and/or ADM .npz.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt(p)
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights to load (default: ema)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or inf (a diverged run's) and keep non-finite samples, for debugging")
    g = p.add_argument_group("sampler")
    add_sampler(g)
    g.add_argument("--steps", type=int, default=50, help="sampling steps = network calls per image (default: 50)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic; default 0)")
    add_precision(g)
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first K eps channels (3 reproduces DiT; default: all)")
    g.add_argument("--noise-schedule", default=None, help="linear|cosine (default: the run's, else linear)")
    g.add_argument("--diffusion-steps", type=int, default=None, help="training T (default: the run's, else 1000)")
    g.add_argument("--clip-denoised", choices=("auto", "yes", "no"), default="auto",
                   help="clamp predicted x0 to [-1, 1] (auto: pixel models yes, latents no)")
    b = p.add_argument_group("compute budget (DC-DiT; give at most one)")
    add_tail_drop(b, "tail-drop fraction F: drop the lowest-p F of the boundary tokens at every step")
    b.add_argument("--keep-share", type=float, default=None,
                   help="target mean share of first-stage tokens kept; f is solved on a probe run")
    b.add_argument("--gflops", type=float, default=None,
                   help="target GFLOPs (2 per MAC) per image per sampling step (both CFG halves count); "
                        "f is solved by bisection on the measured FLOPs of a probe run")
    add_tail_drop(b, "Lite-CFG: tail-drop fraction of the conditional half (same as --tail-drop)", "--cond-drop")
    add_tail_drop(b, "Lite-CFG: tail-drop fraction of the unconditional half (needs --cfg-scale != 1)",
                  "--uncond-drop")
    b.add_argument("--probe-size", type=int, default=32,
                   help="budget probe: the run's first N samples, sampled exactly as the real run "
                        "(default: 32; a probe covering the whole run is exact, a smaller one misses by "
                        "about the per-image spread / sqrt(N))")
    b.add_argument("--probe-steps", type=int, default=None,
                   help="budget probe: fewer sampling steps, evenly spread (cheaper, less accurate; "
                        "default: all --steps)")
    o = p.add_argument_group("samples and output")
    o.add_argument("--num-samples", type=int, default=16, help="total samples (default: 16)")
    o.add_argument("--batch-size", type=int, default=16, help="samples per batch per process (default: 16)")
    add_seed(o, "global seed; sample k's noise comes from (seed, k)")
    o.add_argument("--classes", default=None, help="comma list of labels, cycled (default: all classes cycled)")
    o.add_argument("--grid", default=None, metavar="PNG", help="write a grid of the first --grid-count samples")
    o.add_argument("--grid-count", type=int, default=64, help="images in the grid (default: 64)")
    o.add_argument("--npz", default=None, metavar="NPZ", help="write all samples in the ADM format (arr_0, arr_1)")
    o.add_argument("--stats-json", default=None, metavar="JSON", help="write kept shares / FLOPs per step here")
    o.add_argument("--vae", default=None, metavar="DIR", help="local VAE directory to decode latents")
    o.add_argument("--space", choices=("auto", "latent", "pixel"), default="auto",
                   help="model space (auto: the run config's data source; 4 channels without one = latent)")
    o.add_argument("--flops", choices=("first", "all", "none"), default="first",
                   help="count FLOPs on each process's first --flop-images samples (default), every batch, or never")
    o.add_argument("--flop-images", type=int, default=16,
                   help="with --flops first: the first batch holds this many samples (at most --batch-size) and "
                        "only they run under the FLOP counter, which slows DC-DiT sampling (default: 16)")
    o.add_argument("--workers", default="auto", metavar="N|auto",
                   help="batches sampled side by side in N threads, each with 1/N of torch's threads (auto: 2 on a "
                        "CPU with 2+ threads, else 1; the images do not depend on it)")
    add_device(o)
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from dcdit.sampling import (
        generate_local, merge_ranks, resolve_precision, resolve_tail_drop, resolve_workers, save_outputs,
    )
    from dcdit.sampling.seeds import labels_for_indices
    from dcdit.training.distributed import setup, teardown

    budget = check_options(args)  # everything that needs no model, before a process group or a model loads
    dist_info = setup(args.device, what="--device")
    rank, world = dist_info.rank, dist_info.world_size
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)
    done = False  # teardown meets the other ranks at a barrier only on success (on an error they may never come)
    try:
        make_output_dirs(args, log, rank)
        precision = resolve_precision(args.precision, dist_info.device)
        s = SamplingSetup(args, budget, dist_info.device, rank)
        # Solve the budget once (rank 0) on the run's first samples, then share the tail drop.
        n_probe = min(args.probe_size, args.num_samples)
        tail_drop = resolve_tail_drop(s.model, budget, labels_for_indices(range(n_probe), s.num_classes, s.classes),
                                      diffusion=s.diffusion, seed=args.seed, cfg_scale=args.cfg_scale,
                                      guidance_channels=args.guidance_channels, uncond_drop=args.uncond_drop,
                                      probe_steps=args.probe_steps, sampler=args.sampler, eta=args.eta,
                                      clip_denoised=s.clip, precision=precision, num_samples=args.num_samples,
                                      rank=rank, world_size=world, log=log)
        args.workers = resolve_workers(args.workers, dist_info.device)
        part = generate_local(
            s.model, s.diffusion, args.num_samples, batch_size=args.batch_size, seed=args.seed, classes=s.classes,
            rank=rank, world_size=world, decode=s.decode, keep_latents=s.keep_latents, flops=args.flops,
            flop_images=min(args.flop_images, args.batch_size) if args.flops == "first" else None,
            workers=args.workers,
            progress=rank == 0 and not args.no_progress, sampler=args.sampler, eta=args.eta,
            cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, tail_drop=tail_drop,
            uncond_drop=args.uncond_drop, clip_denoised=s.clip, precision=precision, device=dist_info.device,
            allow_nonfinite=args.allow_nonfinite,
        )
        first_out = Path(args.npz or args.grid)
        merged = merge_ranks(part, args.num_samples, first_out.parent / f".{first_out.stem}.parts", rank, world)
        if merged is None:  # not rank 0: teardown's barrier keeps this rank up until rank 0 has written
            done = True
            return 0
        written = save_outputs(merged, args.npz, None if s.keep_latents else args.grid, args.grid_count)
        report(args, merged, budget, precision, tail_drop, world, written, log)
        done = True
        return 0
    finally:
        teardown(dist_info, sync=done)


def check_options(args):
    """The options checked against each other (no model needed); returns the compute budget, if any."""
    from dcdit.sampling import Budget
    from dcdit.sampling.guidance import is_guided

    if args.grid is None and args.npz is None:
        raise ValueError("nothing to write: give --grid PNG and/or --npz NPZ")
    if args.num_samples < 1 or args.batch_size < 1 or args.flop_images < 1:
        raise ValueError("--num-samples, --batch-size and --flop-images must be positive")
    if args.workers != "auto" and not (str(args.workers).isdigit() and int(args.workers) >= 1):
        raise ValueError(f"--workers must be a positive integer or auto, got {args.workers!r}")
    if args.cond_drop is not None and args.tail_drop is not None:
        raise ValueError("give the conditional fraction once: --cond-drop or --tail-drop")
    budget = Budget.from_options(args.cond_drop if args.cond_drop is not None else args.tail_drop,
                                 args.keep_share, args.gflops)
    if args.uncond_drop is not None and not is_guided(args.cfg_scale):
        raise ValueError("--uncond-drop (Lite-CFG) needs guidance: set --cfg-scale != 1")
    if args.probe_size < 1 or (args.probe_steps is not None and args.probe_steps < 1):
        raise ValueError("--probe-size and --probe-steps must be positive")
    if args.eta != 0 and args.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"--eta applies to --sampler ddim only ({args.sampler} is a deterministic solver)")
    return budget


def make_output_dirs(args, log, rank: int) -> None:
    """Create the output files' folders now (said once, on rank 0), not after hours of sampling."""
    for opt, target in (("--npz", args.npz), ("--grid", args.grid), ("--stats-json", args.stats_json)):
        parent = None if target is None else Path(target).parent
        if parent is not None and not parent.is_dir() and rank == 0:
            log(f"{opt}: creating the directory {parent}")
            parent.mkdir(parents=True, exist_ok=True)


class SamplingSetup:
    """The checkpoint's model checked against the options, its sampling diffusion, class list, pixel or latent
    space (``clip``: clamp predicted x_0) and, for latents, the VAE decoder or raw latents to keep."""

    def __init__(self, args, budget, device, rank: int):
        from dcdit.checkpoint import load_model
        from dcdit.models import is_dcdit
        from dcdit.sampling import (
            diffusion_for_checkpoint, is_latent_checkpoint, model_info, parse_classes, read_train_config,
        )

        self.model = load_model(args.ckpt, which=args.which, map_location=device, allow_nonfinite=args.allow_nonfinite)
        info = model_info(self.model)
        if args.guidance_channels is not None and not 1 <= args.guidance_channels <= info["in_channels"]:
            raise ValueError(f"--guidance-channels {args.guidance_channels}: the model has {info['in_channels']} "
                             f"eps channels (give 1..{info['in_channels']})")
        needs_routing = (budget is not None and (budget.kind != "tail_drop" or budget.value > 0)) or (
            args.uncond_drop is not None)
        if needs_routing and not is_dcdit(self.model):  # said before the VAE loads and the budget probe runs
            raise ValueError(f"compute budgets and Lite-CFG need a DC-DiT checkpoint; {args.ckpt} is a "
                             f"{type(self.model).__name__}")
        self.num_classes = info["num_classes"]
        self.classes = parse_classes(args.classes, self.num_classes)
        self.diffusion = diffusion_for_checkpoint(args.ckpt, self.model, args.sampler, args.steps,
                                                  noise_schedule=args.noise_schedule,
                                                  diffusion_steps=args.diffusion_steps)
        latent = args.space == "latent" or (
            args.space == "auto" and is_latent_checkpoint(read_train_config(args.ckpt), info["in_channels"]))
        self.clip = {"yes": True, "no": False}.get(args.clip_denoised, not latent)
        self.decode, self.keep_latents = self.decoder(args, device, rank) if latent else (None, False)

    @staticmethod
    def decoder(args, device, rank: int):
        """(latent -> image decoder, keep raw latents) for a latent model."""
        import warnings

        from dcdit.sampling import latent_decoder

        if args.vae is not None:
            return latent_decoder(args.vae, device), False
        if args.npz is None:  # nothing could be written: say so before sampling, not after
            raise ValueError(f"--grid {args.grid}: {args.ckpt} samples latents, and a grid needs them decoded: "
                             "give --vae DIR (a local diffusers AutoencoderKL), or --npz to keep the raw latents")
        if rank == 0:
            warnings.warn("latent model without --vae: saving raw latents (npz keys 'latents', 'labels'); "
                          "no grid is written", stacklevel=1)
        return None, True


def report(args, merged, budget, precision: str, tail_drop: float, world: int, written: list, log) -> None:
    """The run's line on stdout, the budget check, the --stats-json summary and the files written."""
    import json

    from dcdit.utils import save_json

    st = merged.stats
    summary = {
        "num_samples": args.num_samples, "world_size": world, "sampler": args.sampler, "steps": args.steps,
        "precision": precision, "workers": args.workers,
        "cfg_scale": args.cfg_scale, "tail_drop": tail_drop, "uncond_drop": args.uncond_drop,
        "seconds": merged.seconds, "images_per_second": args.num_samples / max(merged.seconds, 1e-9),
        "budget": None if budget is None else {"kind": budget.kind, "value": budget.value},
        **({} if st is None else {"stats": st.to_dict()}),
    }
    print(summary_line(args, summary, st, precision, tail_drop, world))
    if budget is not None and budget.kind != "tail_drop" and st is not None:
        check = budget_check(budget, st, min(args.probe_size, args.num_samples), args.num_samples,
                             args.probe_steps is not None and args.probe_steps < args.steps)
        if check is not None:
            summary["budget"].update(check)
            log(check["message"])
    if args.stats_json:
        save_json(args.stats_json, json.loads(json.dumps(summary, default=float)))
        written.append(Path(args.stats_json))
    for w in written:
        print(f"wrote {w}")


def summary_line(args, summary: dict, st, precision: str, tail_drop: float, world: int) -> str:
    msg = (f"{args.num_samples} samples ({args.sampler}, {args.steps} steps, {precision}, {world} process(es) x "
           f"{args.workers} worker(s)) in "
           f"{summary['seconds']:.1f}s = {summary['images_per_second']:.2f} img/s; tail-drop {tail_drop:.3f}")
    if args.uncond_drop is not None:  # Lite-CFG: the unconditional half drops its own share
        msg += f" (conditional), {args.uncond_drop:.3f} (unconditional)"
    if st is not None and st.gflops_per_step is not None:
        msg += f"; {st.gflops_per_step:.4g} GFLOPs/image/step ({st.gflops_per_image:.4g} per image"
        n_flops = st.flops_per_step.shape[1]
        msg += f", counted on the first {n_flops} samples: --flops all counts every one)" if (
            n_flops < args.num_samples) else ")"
    if st is not None and st.mean_kept_share is not None:
        msg += f"; kept share {st.mean_kept_share[0]:.3f}"
    return msg


def budget_check(budget, stats, n_probe: int, n_run: int, short_probe: bool) -> dict | None:
    """What the real run achieved against a kept-share / GFLOPs target, and why it missed if it did.

    Returns ``{"achieved", "relative_error", "message"}``, or None when the run
    measured nothing to compare (GFLOPs with ``--flops none``).
    """
    if budget.kind == "gflops":
        achieved = stats.gflops_per_step
        unit, measured = "GFLOPs/image/step", stats.flops_per_step
        n_measured = None if measured is None else measured.shape[1]
    else:
        achieved = None if stats.mean_kept_share is None else stats.mean_kept_share[0]
        unit, n_measured = "kept share", stats.num_images
    if achieved is None:
        return None
    err = (achieved - budget.value) / budget.value
    over = f"{n_measured} samples" if n_measured is None or n_measured >= n_run else (
        f"the first {n_measured} of {n_run} samples (--flops first counts FLOPs on the first --flop-images; --flops all "
        "counts every one)")
    msg = f"budget: target {budget.kind} {budget.value:g}, achieved {achieved:.4g} {unit} over {over} ({err:+.1%})"
    if abs(err) > budget.tolerance:
        why = []
        if short_probe:
            why.append("the probe ran fewer steps than the run (--probe-steps): its trajectories differ")
        if n_probe < n_run:
            why.append(f"the probe saw {n_probe} of the {n_run} samples and the router keeps more tokens on some "
                       f"images than others: raise --probe-size (a probe of every sample is exact)")
        if not why:
            why.append("the cost moves in whole tokens")
        msg = f"warning: {msg} misses the target by more than {budget.tolerance:.0%}: " + "; ".join(why)
    return {"achieved": float(achieved), "relative_error": float(err), "message": msg}
