"""`dcdit train`: train a DiT or DC-DiT from a YAML config (also under torchrun)."""
from __future__ import annotations

import argparse

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Train a DiT or DC-DiT from a YAML config (torchrun for several processes); resume exactly."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="training config (see configs/); optional with --resume (the run's config.yaml is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted key, YAML value (e.g. train.steps=200); repeatable")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue from a run or checkpoint directory (no PATH: the run in --out / train.out_dir)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: train.out_dir, else runs/<config name>)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dcdit.training import load_train_config, train
    from dcdit.training.state import find_checkpoint

    config = args.config
    if config is None:
        if not args.resume:
            raise ValueError("pass --config FILE.yaml (or --resume RUN_DIR to continue a run)")
        where = Path(args.out) if args.resume is True and args.out else None
        if where is None and args.resume is True:
            raise ValueError("--resume without a path needs --config or --out to find the run")
        where = where or Path(args.resume)
        ckpt = find_checkpoint(where)
        if ckpt is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {where}")
        run_dir = Path(args.out) if args.out else ckpt.parent
        config = run_dir / "config.yaml"
        if not config.exists():
            raise FileNotFoundError(f"no config.yaml in {run_dir}: pass --config")
    cfg = load_train_config(config, args.overrides)
    run_dir = train(cfg, out=args.out, resume=args.resume)
    print(run_dir)
    # A run stopped by a signal exits like an interrupted program (its checkpoint is saved).
    ckpt = find_checkpoint(run_dir) if run_dir.exists() else None
    reason = json.loads((ckpt / "train_state.json").read_text()).get("reason") if ckpt else None
    return {"SIGINT": 130, "SIGTERM": 143}.get(reason, 0)
