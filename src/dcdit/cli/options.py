"""The options several subcommands share, defined once: the same names, types, defaults and help everywhere.

    add_ckpt(p)                          --ckpt (model directory, run directory, weights file or pretrained:NAME)
    add_device(p)                        --device, default auto (cuda when available, else cpu)
    add_precision(p)                     --precision of the network calls, default auto
    add_seed(p, help)                    --seed, default 0
    add_tail_drop(p) / add_tail_drops(p) --tail-drop: one fraction, or a comma list

A tail-drop option is read by :func:`dcdit.sampling.budget.parse_tail_drop`, the
same check the training config and :class:`~dcdit.sampling.budget.Budget` use.
"""
from __future__ import annotations

import argparse

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

# The sampler names and precisions (dcdit.sampling.SAMPLERS / PRECISIONS), spelled out so that
# `dcdit --help` does not import torch; tests check they agree.
SAMPLER_CHOICES = ("ddpm", "ddim", "dpm++2m", "unipc", "euler")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
SAMPLER_HELP = ("ddpm | ddim (ours) | dpm++2m (DPM-Solver++ 2M) | unipc | euler (diffusers' schedulers, "
                "need the diffusers package; deterministic, 10-20 steps) (default: ddim)")
PRECISION_HELP = ("precision of the network calls: auto (bf16 where the CPU/GPU computes it natively, else "
                  "fp32), fp32 (exact), bf16, fp16 (default: auto)")
CKPT_HELP = "model directory, run directory (uses 'latest'), weights file or pretrained:NAME"
DEVICE_HELP = "auto|cpu|cuda[:K] (default: auto: cuda when available, else cpu)"


def tail_drop_type(text: str) -> float:
    """argparse type of a tail-drop fraction in [0, 1)."""
    from dcdit.sampling.budget import parse_tail_drop

    try:
        return parse_tail_drop(text, "the tail-drop fraction")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tail_drops_type(text: str) -> list[float]:
    """argparse type of a comma list of tail-drop fractions, e.g. ``0,0.3,0.6``."""
    from dcdit.sampling.budget import parse_tail_drops

    try:
        return parse_tail_drops(text, "each tail-drop fraction")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_ckpt(p, required: bool = True, help: str = CKPT_HELP):
    return p.add_argument("--ckpt", required=required, help=help)


def add_device(p, help: str = DEVICE_HELP):
    return p.add_argument("--device", default="auto", help=help)


def add_precision(p):
    return p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)


def add_sampler(p):
    return p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddim", help=SAMPLER_HELP)


def add_seed(p, help: str):
    return p.add_argument("--seed", type=int, default=0, help=f"{help} (default: 0)")


def add_tail_drop(p, help: str, flag: str = "--tail-drop", default=None):
    return p.add_argument(flag, type=tail_drop_type, default=default, metavar="F", help=help)


def add_tail_drops(p, default: list[float], help: str = "comma list of tail-drop fractions"):
    shown = ",".join(f"{v:g}" for v in default)
    return p.add_argument("--tail-drop", type=tail_drops_type, default=default, metavar="F[,F...]",
                          help=f"{help} (default: {shown})")


def resolve_device(name: str):
    """``--device`` as a torch.device: auto is cuda when available, else cpu; a bad name is a one-line error."""
    from dcdit.training.distributed import resolve_device as resolve

    return resolve(name, what="--device")
