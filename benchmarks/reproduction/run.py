"""Reproduce the DC-DiT paper's claims at CPU scale, v2 (MNIST 32x32 and the built-in shapes data).

    python benchmarks/reproduce.py --out runs/repro2 --seeds 0          # one seed (~2 h on 2 quiet cores)
    python benchmarks/reproduce.py --out runs/repro2 --seeds 0,1        # the second seed on top (cached stages skip)
    python benchmarks/reproduce.py --out /tmp/repro --smoke             # tiny everything (the test)
    python benchmarks/reproduce.py --out runs/repro2 --seeds 0,1 --only report   # table/plots from cached stages

The layout puts the cost where the paper has it: a 2x2 patchify stem to a 16x16
grid (256 tokens), a narrow one-ResBlock conv encoder and decoder (width 16),
the router and dechunk at the main width, and a main network of 10 DiT blocks
at width 128 that sees ~64 tokens at N = 4. The scaffold (stem, encoder, router,
dechunk, decoder, final layer) is then ~13.5 % of DC-DiT's FLOPs at 25 % kept
(16.7 % with 8 blocks, 11.5 % at 30 % kept; the paper: ~7 % at XL, where the main
network is far wider), so the main network dominates as in the paper; DiT/2 (256
tokens) and DiT/4 (64 tokens) have the same main network. Every model trains with the
learning-speed recipe (v-prediction, Min-SNR-5, label table at N(0, 1),
lr 1e-3, EMA 0.999 with warm-up; BENCHMARKS.md "Learning speed").

Stages (each caches its result as JSON in --out; re-running skips what is done, a
training run interrupted mid-way resumes from its last checkpoint):

  classifier  in-domain MNIST classifier (dcdit.evaluation.train_classifier), its test accuracy
  reference   Inception statistics of held-out MNIST test images (the stats cache keeps them)
  train       DiT/4, DC-DiT N=4 (multi-budget from mid-run), DiT/2 on MNIST: same steps, batch,
              data, optimizer and seed for every model; training seconds from each run's log
  eval        per model: DDIM samples -> FID (Inception), class accuracy, GFLOPs/image (by
              component), kept-token share per sampling step
  upcycle     DC-DiT N=4 started from the trained DiT/4 (the same ~64 main-network tokens, as the
              paper upcycles at matched token counts) vs the same model from scratch (its main run's
              checkpoints), FID against steps up to a quarter of the scratch run
  speed       sampling images/s, every trained model in one process, same batch, back to back
  elastic     DC-DiT N=4 at tail-drop fractions 0.2, 0.4, 0.6 (and 0 from eval)
  shapes      a DC-DiT on the shapes data set; ROC-AUC of the router's p vs the detail map per t
  curve       every model's checkpoints at 1/4 and 1/2 of the run: FID against training GFLOPs
  report      results.json, table.md (with each claim: held or not), PNGs

On request only (--only shapes-ablation): the shapes DC-DiT again with one change each (epsilon
instead of v; no multi-budget), to see which sets the cells its router marks.

All numbers come from this process's own measurements; nothing is tuned per model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .report import stage_report
from .runs import read_json, write_json
from .scoring import Ctx
from .settings import MODELS, SHAPES_VARIANTS, STAGES, Settings, smoke_settings
from .stages import (
    stage_classifier, stage_curve, stage_elastic, stage_eval, stage_reference, stage_shapes, stage_speed, stage_train,
    stage_upcycle,
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/repro2", help="output directory (stage JSONs, runs, table, plots)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing in well under a minute")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (e.g. 0,1)")
    ap.add_argument("--only", default=None, choices=STAGES, help="run one stage (its prerequisites must be cached)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--n-small", type=int, default=None,
                    help="samples per elastic / upcycling point (default 500; --smoke 12)")
    ap.add_argument("--speed-batch", type=int, default=None, help="batch of the images/s measurement (default 100)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="train/eval only these MNIST models (e.g. to run stages in parallel processes)")
    ap.add_argument("--canvas", default=None, metavar="DIR/results_STEP",
                    help="fold the sparse canvas into the report and its claims: canvas.py --report's "
                         "DIR/results_STEP_sSEED.json for each seed (e.g. docs/canvas/results_4000)")
    ap.add_argument("--variants", default=",".join(SHAPES_VARIANTS),
                    help=f"with --only shapes-ablation: which of {', '.join(SHAPES_VARIANTS)}")
    return ap.parse_args(argv)


def settings_for(args, out: Path) -> Settings:
    """The run's settings (--smoke, --n-small, --speed-batch), refused if ``out`` was produced with others."""
    s = smoke_settings() if args.smoke else Settings()
    if args.n_small:
        s.n_small = args.n_small
    if args.speed_batch:
        s.speed_batch = args.speed_batch
    saved = out / "settings.json"
    # n_small and ddim_steps (evaluation sizes) may change between invocations: each evaluation's JSON
    # records its own n and step count. Everything else must match what the cached stages were produced with.
    free = ("n_small", "ddim_steps", "n_fid", "speed_batch", "flop_images")
    if saved.is_file():
        old = {k: v for k, v in read_json(saved).items() if k not in free}
        if old != {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k not in free}:
            raise SystemExit(f"{out} was produced with different settings ({saved}); use another --out")
    write_json(saved, asdict(s))
    return s


def run_seed(ctx: Ctx, seed: int, args) -> None:
    """Every requested stage of one training seed, in the order later stages need them: DiT/4 and DC-DiT
    (upcycling, elastic), then DiT/2, then speed and the training-compute curve."""
    want = (lambda st: args.only is None or args.only == st)
    models = [n for n in MODELS if n in args.models.split(",")]
    for n in [m for m in models if m != "dit2"]:
        if want("train"):
            stage_train(ctx, n, seed)
        if want("eval"):
            stage_eval(ctx, n, seed)
    if want("upcycle") and {"dit4", "dcdit_n4"} <= set(models):
        write_json(ctx.out / f"upcycle_result_s{seed}.json", stage_upcycle(ctx, seed))
    if want("elastic") and "dcdit_n4" in models:
        stage_elastic(ctx, seed)
    if want("shapes"):
        stage_shapes(ctx, seed)
    if args.only == "shapes-ablation":  # not part of the default run
        for v in args.variants.split(","):
            if v not in SHAPES_VARIANTS:
                raise SystemExit(f"error: unknown shapes variant {v!r} (known: {', '.join(SHAPES_VARIANTS)})")
            stage_shapes(ctx, seed, v)
    if "dit2" in models:
        if want("train"):
            stage_train(ctx, "dit2", seed)
        if want("eval"):
            stage_eval(ctx, "dit2", seed)
    if want("speed"):
        stage_speed(ctx, seed)
    if want("curve"):
        stage_curve(ctx, seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, settings_for(args, out), args.smoke)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.time()
    if args.only in (None, "classifier"):
        stage_classifier(ctx, 0)
    if args.only in (None, "reference"):
        stage_reference(ctx)
    for seed in seeds:
        run_seed(ctx, seed, args)
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "this_invocation_seconds": round(time.time() - t0, 1)}
    if args.canvas:
        meta["canvas"] = args.canvas
    R = stage_report(ctx, seeds, meta)
    print(R["table_md"])
    print(f"\nresults: {out / 'results.json'}; table: {out / 'table.md'}; plots: {', '.join(R['plots'].values())}")
    print(f"sum of stage wall times (s): {R['total_stage_seconds']}")
    return 0
