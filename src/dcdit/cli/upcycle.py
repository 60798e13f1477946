"""`dcdit upcycle`: a DC-DiT whose main network starts from a trained DiT checkpoint."""
from __future__ import annotations

import argparse

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Build a DC-DiT from a DiT checkpoint (blocks -> main network) for `dcdit train` to start from."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dcdit.data.config import MNIST_SPLITS, SOURCES

    parser.add_argument("--dit", required=True, metavar="CKPT",
                        help="DiT weights: pretrained:NAME, a dcdit model/run dir, a released .pt (bare or with "
                             "'ema') or .safetensors")
    parser.add_argument("--preset", required=True, metavar="NAME",
                        help="DC-DiT preset, e.g. DC-DiT-XL-N4 (DC-DiT-MNIST-N4 for the shipped MNIST DiTs)")
    parser.add_argument("--out", metavar="DIR", help="output model directory (default: runs/upcycled-<preset>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="DC-DiT config override, YAML value (e.g. num_classes=10); repeatable")
    parser.add_argument("--which", choices=("ema", "model"), default="ema",
                        help="which weights of the DiT checkpoint to take (default: ema)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickles in .pt files (only for files you trust)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="take DiT weights holding NaN or inf (a diverged run's) anyway")
    c = parser.add_argument_group("router calibration (the router starts keeping ~1/N of the tokens)")
    c.add_argument("--data-source", choices=SOURCES, default=None,
                   help="calibrate on noised images of this data source (default: on noise)")
    c.add_argument("--data-path", default=None, help="folder / .npz / latents dir of --data-source")
    c.add_argument("--split", default="train", choices=MNIST_SPLITS, help="mnist split (default: train)")
    c.add_argument("--calibration-size", type=int, default=64, help="data images to calibrate on (default: 64)")
    c.add_argument("--keep-share", type=float, default=None,
                   help="kept share to calibrate to (default: 1/N of the preset's downsample_factor)")
    c.add_argument("--no-calibrate", action="store_true",
                   help="leave the router at its fresh init (keeps almost only the two forced tokens)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from dcdit.checkpoint import save_model_dir
    from dcdit.data import DataConfig
    from dcdit.training.upcycle import upcycle
    from dcdit.utils import atomic_write, save_json

    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    if args.keep_share is not None and not 0 < args.keep_share < 1:
        raise ValueError(f"--keep-share must lie in (0, 1), got {args.keep_share}")
    if args.calibration_size < 1:
        raise ValueError(f"--calibration-size must be positive, got {args.calibration_size}")
    if args.no_calibrate and (args.data_source or args.keep_share is not None):
        raise ValueError("--no-calibrate leaves the router as initialised: drop --data-source / --keep-share")
    if args.data_path and not args.data_source:
        raise ValueError("--data-path needs --data-source (which kind of data it holds)")
    data = None if args.data_source is None else DataConfig(source=args.data_source, path=args.data_path,
                                                            split=args.split)
    model, summary = upcycle(args.dit, args.preset, overrides, which=args.which, trust_pickle=args.trust_pickle,
                             calibrate=not args.no_calibrate, data=data, target_share=args.keep_share,
                             calibration_size=args.calibration_size,
                             allow_nonfinite=args.allow_nonfinite)
    out = Path(args.out or f"runs/upcycled-{args.preset}")
    save_model_dir(out, model, model)
    d = summary["diffusion"]
    if d["recorded"]:  # the DiT's run recorded its noise process: `dcdit sample --ckpt OUT` reads it from here
        section = {"diffusion": {k: d[k] for k in ("noise_schedule", "diffusion_steps")}}
        if d.get("data_source"):
            section["data"] = {"source": d["data_source"]}
        text = "# the DiT's diffusion settings, carried over by `dcdit upcycle` (not a full training config)\n"
        atomic_write(out / "train_config.yaml", lambda p: Path(p).write_text(text + yaml.safe_dump(section)))
    save_json(out / "upcycle.json", {"dit": str(args.dit), "preset": args.preset, "overrides": overrides,
                                     **{k: v for k, v in summary.items() if k != "main_prefix"}})
    share = summary["params_copied"] / max(summary["params_total"], 1)
    print(f"upcycled {args.dit} -> {out}: {summary['tensors_copied']} tensors, "
          f"{summary['params_copied'] / 1e6:.2f}M of {summary['params_total'] / 1e6:.2f}M parameters "
          f"({share:.0%}) from the DiT")
    print(f"diffusion settings from the DiT: prediction {model.config['prediction']}, learn_sigma "
          f"{model.config['learn_sigma']}, noise schedule {d['noise_schedule']} over {d['diffusion_steps']} steps"
          + ("" if d["recorded"] else " (not recorded with the DiT: DiT's default)"))
    r = summary["router"]
    if r is None:
        print("router left at its init (--no-calibrate)")
    else:
        print(f"router calibrated on {r.get('data', 'noise')}: keeps {r['kept_share']:.3f} of the tokens at init "
              f"(target {r['target']:.3f}), averaged over t = {', '.join(map(str, r['timesteps']))}")
    print(f"start training with --set model.init_from={out}"
          + ("" if not d["recorded"] else f" --set diffusion.noise_schedule={d['noise_schedule']} "
                                          f"--set diffusion.diffusion_steps={d['diffusion_steps']}"))
    return 0
