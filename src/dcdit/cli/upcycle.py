"""`dcdit upcycle`: a DC-DiT whose main network starts from a trained DiT checkpoint."""
from __future__ import annotations

import argparse

HELP = "Build a DC-DiT from a DiT checkpoint (blocks -> main network) for `dcdit train` to start from."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dit", required=True, metavar="CKPT",
                        help="DiT weights: released .pt (bare or with 'ema'), .safetensors, or a dcdit model/run dir")
    parser.add_argument("--preset", required=True, metavar="NAME", help="DC-DiT preset, e.g. DC-DiT-XL-N4")
    parser.add_argument("--out", metavar="DIR", help="output model directory (default: runs/upcycled-<preset>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="DC-DiT config override, YAML value (e.g. num_classes=10); repeatable")
    parser.add_argument("--which", choices=("ema", "model"), default="ema",
                        help="which weights of the DiT checkpoint to take (default: ema)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickles in .pt files (only for files you trust)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="take DiT weights holding NaN or inf (a diverged run's) anyway")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from dcdit.checkpoint import save_model_dir
    from dcdit.training.upcycle import upcycle

    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    model, summary = upcycle(args.dit, args.preset, overrides, which=args.which, trust_pickle=args.trust_pickle,
                              allow_nonfinite=args.allow_nonfinite)
    out = Path(args.out or f"runs/upcycled-{args.preset}")
    save_model_dir(out, model, model)
    share = summary["params_copied"] / max(summary["params_total"], 1)
    print(f"upcycled {args.dit} -> {out}: {summary['tensors_copied']} tensors, "
          f"{summary['params_copied'] / 1e6:.2f}M of {summary['params_total'] / 1e6:.2f}M parameters "
          f"({share:.0%}) from the DiT; start training with --set model.init_from={out}")
    return 0
