"""`dcdit demo`: the main job on a built-in default."""
from __future__ import annotations

HELP = "Train a small DC-DiT on the built-in shapes data (bounded time), sample, and write runs/demo/report.md."


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo; an earlier run there is continued)")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget in minutes (default: 6)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the report's samples (default: 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config key, e.g. --set train.global_batch_size=16")


def run(args) -> int:
    from dcdit.demo import run_demo

    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    run_demo(args.out, minutes=args.minutes, sample_steps=args.sample_steps, seed=args.seed, overrides=args.set)
    return 0
