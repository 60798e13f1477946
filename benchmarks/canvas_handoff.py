"""Which half of the sampling run loses the canvas DC-DiT its FID? Hand one model's run to another at t.

    python benchmarks/canvas_handoff.py --out runs/canvas --threads 1 \\
        --pair runs/canvas/runs/dit8_s0/ckpt-0004000:dit8 runs/canvas/runs/dcdit_w32_s0/ckpt-0004000:w32 --switch 500

One DDIM-25 run per image in which model A predicts for every step with t >= ``--switch`` (the noisy
steps, where the image is laid out) and model B for the rest (the detail), then the reverse hand-off,
each scored with the canvas protocol of ``canvas.py`` (2000 class-balanced samples, FID against the
canvas test images, class accuracy by the canvas classifier; the same sample seeds as every model's
own score). If "DiT/8 then DC-DiT" scores like DiT/8 alone and "DC-DiT then DiT/8" like DC-DiT alone,
DC-DiT's deficit lies in the noisy steps; the reverse puts it in the late, detail steps. Results:
``handoff_A-B@SWITCH_s0.json`` in ``--out`` (cached like canvas.py's stages) and a table on stdout.

A name ``NAME+MODE`` runs that DC-DiT under a forced routing (``canvas_probe.py``'s ``all``, ``grid``,
``confident``, ``no-main``), so one model can hand off to itself with other routing, e.g. its own router
at t >= 250 and every token kept below: does the routing of the late steps cost the FID?

    python benchmarks/canvas_handoff.py --out runs/canvas --threads 1 --switch 250 \
        --pair runs/canvas/runs/dcdit_w32_s0/ckpt-0004000:w32 runs/canvas/runs/dcdit_w32_s0/ckpt-0004000:w32+all
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from canvas import canvas_settings
from canvas_probe import intervention
from reproduction import Ctx, cached, log, score

from dcdit.checkpoint import load_model
from dcdit.models import DCDiT
from dcdit.sampling.guidance import model_info


class HandOff(nn.Module):
    """``early`` predicts at t >= ``switch`` (original timesteps), ``late`` below; both must read the same
    images the same way (size, channels, classes, prediction). DC-DiT's routing output is dropped, so the
    sampler sees a plain model (no tail drop, no kept-share statistics)."""

    def __init__(self, early: nn.Module, late: nn.Module, switch: int):
        super().__init__()
        a, b = model_info(early), model_info(late)
        if a != b:
            raise ValueError(f"the two models read images differently: {a} vs {b}")
        self.early, self.late, self.switch = early, late, int(switch)
        self.config = dict(late.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W); t: (N,) original timesteps, the same for the whole batch at sampling
        if t.min() != t.max():
            raise ValueError("a hand-off needs one timestep per batch (sampling), got a mix")
        out = (self.early if int(t[0]) >= self.switch else self.late)(x, t, y)
        return out[0] if isinstance(out, tuple) else out  # DC-DiT: (prediction, routing)


class Routed(nn.Module):
    """A DC-DiT under one of ``canvas_probe.intervention``'s forced routings (``oracle`` needs x0: refused)."""

    MODES = ("all", "grid", "confident", "no-main")

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown routing mode {mode!r}: expected one of {', '.join(self.MODES)}")
        if not isinstance(model, DCDiT):
            raise ValueError(f"routing mode {mode!r} needs a DC-DiT, got a {type(model).__name__}")
        self.model, self.mode, self.config = model, mode, dict(model.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        with intervention(self.model, self.mode, None):
            return self.model(x, t, y)


def load(spec: str) -> tuple[str, nn.Module]:
    """``CKPT:NAME`` or ``CKPT:NAME+MODE`` -> (NAME[+MODE], its EMA model in eval mode)."""
    path, name = spec.rsplit(":", 1)
    model = load_model(path, which="ema").eval()
    if "+" in name:
        model = Routed(model, name.split("+", 1)[1])
    return name, model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/canvas", help="a canvas.py output directory (classifier, reference)")
    ap.add_argument("--pair", nargs=2, required=True, metavar="CKPT:NAME", help="the two models")
    ap.add_argument("--switch", type=int, default=500, help="the first model predicts at t >= this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="samples per run (default: the protocol's 2000)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (na, ma), (nb, mb) = (load(p) for p in args.pair)
    ctx = Ctx(Path(args.out), canvas_settings(), smoke=False)
    n = args.n or ctx.s.n_fid
    models = {na: ma, nb: mb}
    rows = []
    for early, late in ((na, nb), (nb, na)):
        tag = f"handoff_{early}-{late}@{args.switch}_s{args.seed}" + ("" if n == ctx.s.n_fid else f"_n{n}")
        res = cached(ctx.out / f"{tag}.json", lambda: {
            "early": early, "late": late, "switch": args.switch,
            **score(ctx, HandOff(models[early], models[late], args.switch), n, args.seed, 0.0, tag, grid=True)})
        log(f"{tag}: FID {res['fid']:.1f}, class acc {res['class_acc']:.3f}")
        rows.append(res)
    print(f"| t >= {args.switch} | t < {args.switch} | FID@{n} | class acc | GFLOPs/img |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['early']} | {r['late']} | {r['fid']:.1f} | {r['class_acc']:.3f} | {r['gflops_per_image']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
