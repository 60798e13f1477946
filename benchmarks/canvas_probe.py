#!/usr/bin/env python
"""Where does a canvas DC-DiT lose to DiT/8: the routing, or the scaffold around it?

One denoising step on canvas test images, at fixed timesteps: noise a clean canvas x0 to x_t, ask the
model for x0, and measure how wrong it is on the background (97 % of the pixels, black) and on the ink.
``speckle`` is the share of background pixels the model paints brighter than 64/255 (what the sample
grids show as dots; benchmarks/speckle.py). Every DC-DiT runs under up to six conditions (``--modes``):

* ``learned``: its own router (as sampled);
* ``oracle``: the router's choice replaced by the tokens whose patch holds ink in x0 (what a router
  that marks the digit perfectly would keep: ~0.08 of the canvas grid, less than the learned ~0.2);
* ``grid``: the router replaced by the fixed lattice at 1/N (``router_mode: grid``; its p is 0 or 1, so
  the dechunk plugs back without smoothing): is the learned choice better than an even spread for the
  main network this model trained?
* ``confident``: the router's own choice of tokens with its p set to 1 on them and 0 elsewhere (the
  dechunk then plugs back without smoothing, as for the fixed routers): what the soft p costs;
* ``all``: every token kept (the main network sees the full 16x16 grid: no chunking loss at all);
* ``no-main``: the main network's output replaced by zeros (the scaffold alone: encoder, residual,
  decoder). How much worse this is than ``learned`` is what the main network contributes.

If ``all`` and ``oracle`` are as clean as DiT/8, the routing is what costs; if even ``all`` leaves the
background much worse than DiT/8, the scaffold (4x4 stem at width 16 -> convs -> final layer) cannot
carry the per-pixel readout that small t asks for.

    python benchmarks/canvas_probe.py runs/canvas/runs/dcdit_s0/ckpt-0004000:dcdit \\
        runs/canvas/runs/dit8_s0/ckpt-0004000:dit8 [--n 256] [--out docs/canvas/probe.json]
    python benchmarks/canvas_probe.py --table docs/canvas/probe/*.json   # the markdown table
    python benchmarks/canvas_probe.py pretrained:mnist-repro-dcdit-n4:repro --source mnist --modes learned,no-main

Forcing a routing patches the routers' ``logits`` for the probe only (the keep rule, p > 0.5, and the
dechunk are the model's own). Same images, noise and t for every model; bf16 autocast as in sampling.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from dcdit.checkpoint import load_model
from dcdit.chunking.routing import SpatialPredictabilityRouter
from dcdit.data import build_dataset
from dcdit.data.config import DataConfig
from dcdit.diffusion.gaussian_diffusion import ModelMeanType
from dcdit.sampling import sampling_diffusion_for
from dcdit.sampling.precision import autocast_for
from reproduction import dataset
from canvas import canvas_settings

TIMESTEPS = (10, 25, 50, 100, 250, 500, 950)
SPECKLE = 64 / 127.5 - 1.0  # x0 above this is brighter than 64/255


@contextmanager
def intervention(model: torch.nn.Module, mode: str, ink_cells: torch.Tensor):
    """Within the block the model runs under ``mode`` (module docstring); ink_cells (B*L,) for "oracle"."""
    routers = [m for m in model.modules() if isinstance(m, SpatialPredictabilityRouter) and m.mode == "learned"]
    if mode == "no-main":  # the main network's output replaced by zeros: what the scaffold does alone
        model._main_blocks = lambda hk, c, layout, pos: torch.zeros_like(hk)
        try:
            yield
        finally:
            del model._main_blocks
        return
    if mode == "learned" or not routers:
        yield
        return
    if mode == "grid":  # the fixed lattice router at 1/N (router_mode "grid"), on the learned model's weights
        for r in routers:
            r.mode = "grid"
        try:
            yield
        finally:
            for r in routers:
                r.mode = "learned"
        return
    for r in routers:
        def logits(h, seqs, grid, own=r.logits):
            if mode == "confident":
                keep = own(h, seqs, grid) > 0
            else:
                keep = torch.ones(h.shape[0], dtype=torch.bool) if mode == "all" else ink_cells
            return torch.where(keep, 30.0, -30.0).to(h.dtype)
        r.logits = logits
    try:
        yield
    finally:
        for r in routers:
            del r.logits


def probe(model, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, mode: str, cell: int,
          chunk: int = 32) -> list[dict]:
    """One row per t: x0-prediction error on background and ink pixels, speckle, kept share."""
    diffusion = sampling_diffusion_for(model, "ddim", 1000)
    is_v = getattr(diffusion, "model_mean_type", None) == ModelMeanType.VELOCITY
    ink = x0 > -1 + 1e-3  # (B, 1, H, W)
    ink_cells = F.max_pool2d(ink.float(), cell) > 0  # (B, 1, gh, gw): the patches that hold ink
    rows = []
    for t_int in TIMESTEPS:
        x0_hat, kept = [], []
        for b in range(0, x0.shape[0], chunk):  # chunks below the model's own batch grouping
            xb, nb = x0[b : b + chunk], noise[b : b + chunk]
            t = torch.full((xb.shape[0],), t_int, dtype=torch.long)
            xt = diffusion.q_sample(xb, t, nb)
            cells = ink_cells[b : b + chunk].flatten()  # (b*L,), the packed tokens' raster order
            with torch.no_grad(), autocast_for("auto"), intervention(model, mode, cells):
                out = model(xt, t, y[b : b + chunk])
            pred, routing = out if isinstance(out, tuple) else (out, None)
            pred = pred[:, : xb.shape[1]].float()
            xh = diffusion.predict_xstart_from_v(xt, t, pred) if is_v else diffusion.predict_xstart_from_eps(xt, t, pred)
            x0_hat.append(xh.clamp(-1, 1))
            if routing:
                kept.append(routing[0].keep_mask.float().mean())
        x0_hat = torch.cat(x0_hat)
        err, bg = (x0_hat - x0) ** 2, ~ink
        row = {"t": t_int, "mse_background": float(err[bg].mean()), "mse_ink": float(err[ink].mean()),
               "speckle": float((x0_hat[bg] > SPECKLE).float().mean())}
        if kept:
            row["kept_share"] = float(torch.stack(kept).mean())
        rows.append(row)
    return rows


def table(files, ts=(25, 250, 500)) -> str:
    """One markdown row per model and mode of the probe JSONs ``files``: x0 MSE on background / ink at ``ts``."""
    head = " | ".join(f"t={t}: background / ink" for t in ts)
    lines = [f"| model / routing | kept share (t={ts[1]}) | {head} |", "|---|---:|" + "---|" * len(ts)]
    for f in files:
        for label, r in json.loads(Path(f).read_text())["models"].items():
            rows = {x["t"]: x for x in r["rows"]}
            kept = rows[ts[1]].get("kept_share")
            cells = " | ".join(f"{rows[t]['mse_background']:.4f} / {rows[t]['mse_ink']:.3f}" for t in ts)
            lines.append(f"| {label} | {'-' if kept is None else f'{kept:.2f}'} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="CKPT:LABEL")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only: print the markdown table of probe JSON files")
    ap.add_argument("--n", type=int, default=256, help="canvas test images (the first n)")
    ap.add_argument("--modes", default="learned,oracle,all,no-main",
                    help="comma list of learned, oracle, grid, confident, all, no-main (DiT runs learned only)")
    ap.add_argument("--source", choices=("canvas", "mnist"), default="canvas",
                    help="test images: the canvas (64x64) or MNIST 32x32 (for the shipped MNIST models)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.models:
        ap.error("give CKPT:LABEL models to probe (or --table JSON...)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = (dataset(canvas_settings(), "test") if args.source == "canvas"
          else build_dataset(DataConfig(source="mnist", split="test", image_size=32)))
    x0 = torch.stack([ds[i][0] for i in range(args.n)])
    y = torch.as_tensor(ds.labels[: args.n]).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for spec in args.models:
        ckpt, _, label = spec.rpartition(":")
        model = load_model(ckpt).eval()
        cell = getattr(model, "patch_size", 4)
        routed = any(isinstance(m, SpatialPredictabilityRouter) and m.mode == "learned" for m in model.modules())
        modes = [m for m in args.modes.split(",") if routed or m in (("learned", "no-main") if hasattr(model, "_main_blocks")
                                                                     else ("learned",))]
        for mode in modes:
            t0 = time.time()
            rows = probe(model, x0, y, noise, mode, cell)
            results[f"{label}/{mode}"] = {"ckpt": ckpt, "rows": rows, "seconds": round(time.time() - t0, 1)}
            print(f"{label}/{mode}: " + ", ".join(
                f"t={r['t']} bg {r['mse_background']:.4f} ink {r['mse_ink']:.3f} speckle {r['speckle']:.4f}"
                + (f" kept {r['kept_share']:.2f}" if "kept_share" in r else "") for r in rows), flush=True)
    if args.out:
        meta = {"n": args.n, "timesteps": TIMESTEPS, "date": time.strftime("%Y-%m-%d"),
                "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
        Path(args.out).write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
