"""`dcdit demo`: the main job on a built-in default."""
from __future__ import annotations

from dcdit.cli.options import add_precision, add_seed

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Train a small DC-DiT on MNIST for a fixed number of steps, sample, score, and write runs/demo/report.md."


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo; an earlier run there is continued)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the demo config's; fixed, so a busy machine takes longer)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="guidance of the report's samples (default: 3)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the report's samples (default: 50)")
    add_seed(parser, "seed of the training run and the report's samples")
    add_precision(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config key, e.g. --set train.global_batch_size=16")


def run(args) -> int:
    from dcdit.demo import run_demo

    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    run_demo(args.out, steps=args.steps, sample_steps=args.sample_steps, seed=args.seed, overrides=args.set,
             cfg_scale=args.cfg_scale, precision=args.precision)
    return 0
