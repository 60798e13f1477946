#!/usr/bin/env python
"""The sparse canvas (issue 25): does DC-DiT's router pay where most of the image is empty?

    python benchmarks/canvas.py --out runs/canvas --models dcdit,dit8 --upto 4000 --threads 1   # train + score
    python benchmarks/canvas.py --out runs/canvas --speed --upto 4000                         # times, one process
    python benchmarks/canvas.py --out runs/canvas --report docs/canvas --upto 4000            # table from cache

Data: MNIST digits at a seeded random position on a 64x64 black canvas (``data.source: canvas``).
Models: ``configs/canvas/*.yaml`` (the same 10 DiT blocks at width 128 everywhere; see the README
there): DC-DiT with its learned router, the same DC-DiT with a fixed lattice router and with a random
router at the same share (the referee's controls), the FLOP-matched DiT/8 and the parameter-matched
DiT/4. Scored with the reproduction's protocol (``reproduce.score``): 2000 class-balanced DDIM-25
samples -> FID against 2000 canvas test images (Inception features) and class accuracy by an
in-domain classifier with global max pooling; for routed models also the kept share against t and
the router's ROC-AUC against the digit's ink (``dcdit.analysis.routing_vs_detail``, the canvas's
detail map) on 128 test canvases noised to t.

``--upto N`` scores each run's checkpoint at step N (tagged ``NAME@N``) and a later call with a
larger N trains the same run on (the learning rate is constant after warm-up). Sampling times come
from ``--speed``: every scored model in one process, interleaved rounds, median of three.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adaptive import router_vs_detail
from reproduction import (  # the reproduction's training and scoring protocol (benchmarks/reproduction/)
    CANVAS_MODELS, Ctx, Settings, cached, canvas_claims, dataset, load, log, read_json, run_step, sampling_speed,
    score, stage_classifier, stage_reference, train_run, write_json,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "canvas"
MODELS = CANVAS_MODELS


def canvas_settings(smoke: bool = False) -> Settings:
    if smoke:  # plumbing check: the real models, a few steps, tiny samples, classifier features for FID
        return Settings(source="canvas", image_size=64, steps=2, batch=4, classifier_steps=4, n_fid=12, n_ref=12,
                        n_small=6, ddim_steps=2, sample_batch=12, speed_batch=2, flop_images=2, extractor="classifier")
    return Settings(source="canvas", image_size=64, classifier_steps=400, steps=6000)


def config_for(name: str, seed: int, steps: int, s: Settings, recipe: tuple[str, ...] = ()) -> dict:
    """``configs/canvas/NAME.yaml`` (its ``_base_`` resolved), changed by ``recipe`` (``KEY=VALUE`` overrides, the
    same for every model), with the run's seed and length (and batch: --smoke)."""
    from dcdit.training import config_to_dict, load_train_config

    sets = [*recipe, f"train.seed={seed}", f"train.steps={steps}", f"train.global_batch_size={s.batch}"]
    d = config_to_dict(load_train_config(CONFIGS / f"{name}.yaml", sets))
    if d["model"]["arch"] == "dcdit":
        d["ratio"]["group_size"] = min(d["ratio"]["group_size"], s.batch)
    return d


def tag_of(name: str, steps: int, s: Settings) -> str:
    return name if steps == s.steps else f"{name}@{steps}"


def step_tag(steps: int, s: Settings) -> str:
    return "final" if steps == s.steps else str(steps)


def segmentation(ctx: Ctx, model, seed: int, n: int = 128) -> dict:
    """The router's p against the digit's ink on noised test canvases, per t (ROC-AUC, kept share)."""
    ink, auc = router_vs_detail(model, dataset(ctx.s, "test"), seed, n)
    return {"ink": ink, "auc_ink_late": auc}


def stage_model(ctx: Ctx, name: str, seed: int, steps: int, recipe: tuple[str, ...] = ()) -> dict:
    """Train ``name`` (its config changed by ``recipe``) to ``steps``, resuming its run, and score that checkpoint."""
    tag = tag_of(name, steps, ctx.s)
    run_dir = ctx.out / "runs" / f"{name}_s{seed}"
    d = config_for(name, seed, steps, ctx.s, recipe)
    tr = cached(ctx.out / f"train_{tag}_s{seed}.json", lambda: train_run(d, run_dir, steps))

    def evaluate():
        model = load(run_dir, f"ckpt-{steps:07d}")
        res = score(ctx, model, ctx.s.n_fid, seed, 0.0, f"{tag}_s{seed}", grid=True)
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if d["model"]["arch"] == "dcdit":
            res["segmentation"] = segmentation(ctx, model, seed)
        return res

    return {"train": tr, "eval": cached(ctx.out / f"eval_{tag}_s{seed}.json", evaluate)}


def stage_speed(ctx: Ctx, seed: int, steps: int) -> dict:
    """Sampling img/s of every model scored at ``steps``, in this one process (interleaved, median of 3)."""
    names = [n for n in MODELS if run_step(ctx.out / "runs" / f"{n}_s{seed}") >= steps]

    def run():
        models = {n: load(ctx.out / "runs" / f"{n}_s{seed}", f"ckpt-{steps:07d}") for n in names}
        return {"models": names, **sampling_speed(models, ctx.s, seed)}

    return cached(ctx.out / f"speed_{step_tag(steps, ctx.s)}_s{seed}.json", run)


def stage_routing(ctx: Ctx, seed: int, steps: int) -> dict:
    """Which tokens each routed model's router keeps on noised canvas test images, per t: the ROC-AUC of p,
    and the shares of ink cells and of background cells kept (``routing_vs_detail``)."""
    names = [n for n in MODELS if n.startswith("dcdit") and run_step(ctx.out / "runs" / f"{n}_s{seed}") >= steps]

    def run():
        return {n: segmentation(ctx, load(ctx.out / "runs" / f"{n}_s{seed}", f"ckpt-{steps:07d}"), seed)["ink"]
                for n in names}

    return cached(ctx.out / f"routing_{step_tag(steps, ctx.s)}_s{seed}.json", run)


def routing_table(rows: dict) -> list[str]:
    L = ["| model | t | ROC-AUC of p vs ink | ink cells kept | background cells kept | kept share |",
         "|---|---:|---:|---:|---:|---:|"]
    for n, per_t in rows.items():
        for r in (per_t if n in MODELS else []):  # (the cache adds "seconds")
            L.append(f"| {MODELS[n]} | {r['t']} | {r['auc']:.3f} | {r['detail_kept']:.3f} | {r['other_kept']:.3f} "
                     f"| {r['kept_share']:.3f} |")
    return L


def blank(value, spec: str) -> str:
    """A table cell: the number formatted, or empty where it was not measured (no timing, a DiT's router)."""
    return "" if value is None else format(value, spec)


def report(ctx: Ctx, seed: int, steps: int, out_dir: Path | None, recipe: tuple[str, ...] = (),
           dcdit: str = "dcdit") -> str:
    tag = step_tag(steps, ctx.s)
    ev, tr = {}, {}
    for n in MODELS:
        t = tag_of(n, steps, ctx.s)
        if (e := read_json(ctx.out / f"eval_{t}_s{seed}.json")) is not None:
            ev[n], tr[n] = e, read_json(ctx.out / f"train_{t}_s{seed}.json") or {}
    speed = read_json(ctx.out / f"speed_{tag}_s{seed}.json") or {}
    ips = speed.get("images_per_sec", {})
    L = [f"Sparse canvas 64x64, seed {seed}, checkpoints at step {steps} (batch 64, bf16 training, 1 thread each); "
         f"{ctx.s.n_fid} DDIM-{ctx.s.ddim_steps} samples per model, cfg 1."
         + (f" Recipe: configs/canvas/*.yaml with {', '.join(recipe)}." if recipe else ""), "",
         "| model | FID@2000 | FID@500 | class acc | GFLOPs/img | img/s (one process) | kept share noisiest / cleanest "
         "| router AUC vs ink, t<=250 | t=950 | train min |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for n, e in ev.items():
        seg = e.get("segmentation") or {}
        a950 = next((r["auc"] for r in seg.get("ink", []) if r["t"] == 950), None)
        kept = (f"{e['kept_share_noisiest']:.3f} / {e['kept_share_cleanest']:.3f}" if "kept_share_noisiest" in e else "")
        mins = tr[n].get("train_seconds_at_median_rate")
        fid500 = (e.get("fid_at") or {}).get("500")  # absent when fewer than 500 samples were scored (--smoke)
        L.append(f"| {MODELS[n]} | {e['fid']:.1f} | {'-' if fid500 is None else f'{fid500:.1f}'} | {e['class_acc']:.3f} "
                 f"| {e['gflops_per_image']:.2f} | {blank(ips.get(n), '.1f')} | {kept} "
                 f"| {blank(seg.get('auc_ink_late'), '.3f')} | {blank(a950, '.3f')} "
                 f"| {'' if mins is None else f'{mins / 60:.1f}'} |")
    L += ["", f"Goals, judged on `{dcdit}` (and its controls `{dcdit}_grid`, `{dcdit}_random` where scored):", "",
          "| goal (issue 25) | target | measured | held |", "|---|---|---:|---|"]
    L += [f"| {c['claim'].removeprefix('canvas: ')} | {c['goal']} | {c['per_seed'][0]:.3f} | "
          f"{'yes' if c['held'] else 'no'} |" for c in canvas_claims([{"eval": ev, "speed": speed, "dcdit_model": dcdit}])
          if c["per_seed"][0] is not None]
    if (routing := read_json(ctx.out / f"routing_{tag}_s{seed}.json")) is not None:
        L += ["", "What the routers keep on 128 canvas test images noised to t (`--routing`):", "",
              *routing_table(routing)]
    if speed:
        L += ["", f"Sampling times: batch {speed['batch']}, DDIM {speed['ddim_steps']}, {speed['precision']}, "
                  f"{speed['threads']} thread(s), every model in one process (median of 3 interleaved rounds)."]
    text = "\n".join(L) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"table_{tag}_s{seed}.md").write_text(text)
        results = {"eval": ev, "train": tr, "speed": speed, "dcdit_model": dcdit}
        write_json(out_dir / f"results_{tag}_s{seed}.json", results)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/canvas")
    ap.add_argument("--models", default="dcdit,dit8", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--upto", type=int, default=None, help="train to / score the checkpoint at this step (default 6000)")
    ap.add_argument("--speed", action="store_true", help="only: sampling img/s of every model scored at --upto")
    ap.add_argument("--routing", action="store_true",
                    help="only: which tokens every routed model scored at --upto keeps (ink vs background, per t)")
    ap.add_argument("--report", default=None, metavar="DIR", help="write the table for --upto into DIR and stop")
    ap.add_argument("--dcdit", default="dcdit", metavar="NAME",
                    help="the DC-DiT the goals judge (its controls: NAME_grid, NAME_random), e.g. dcdit_w32")
    ap.add_argument("--smoke", action="store_true", help="tiny everything (plumbing check)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="recipe",
                    help="change every model's config (a recipe), e.g. diffusion.min_snr_gamma=null; "
                         "use its own --out, since runs and scores are cached by model name")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = canvas_settings(args.smoke)
    steps = args.upto or s.steps
    if args.dcdit not in MODELS or not args.dcdit.startswith("dcdit"):
        raise SystemExit(f"error: --dcdit {args.dcdit!r} is not a canvas DC-DiT (known: "
                         f"{', '.join(n for n in MODELS if n.startswith('dcdit'))})")
    ctx = Ctx(Path(args.out), s, smoke=args.smoke)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(ctx, args.seed, steps, Path(args.report), tuple(args.recipe), args.dcdit))
        return 0
    if args.routing:
        print("\n".join(routing_table(stage_routing(ctx, args.seed, steps))))
        return 0
    if args.speed:
        sp = stage_speed(ctx, args.seed, steps)
        log(", ".join(f"{n} {v:.1f} img/s" for n, v in sp["images_per_sec"].items()))
        return 0
    stage_classifier(ctx, 0)
    stage_reference(ctx)
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODELS:
            raise SystemExit(f"error: unknown model {name!r} (known: {', '.join(MODELS)})")
        r = stage_model(ctx, name, args.seed, steps, tuple(args.recipe))
        log(f"{name}@{steps}: FID {r['eval']['fid']:.1f}, class acc {r['eval']['class_acc']:.3f}")
    print(report(ctx, args.seed, steps, None, tuple(args.recipe), args.dcdit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
