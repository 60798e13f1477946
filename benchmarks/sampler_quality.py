"""Quality per network call: FID@N and class accuracy per sampler and step count on the shipped MNIST models.

    python benchmarks/sampler_quality.py [--n 2000] [--steps 5,10,15,25] [--samplers ddim,dpm++2m,unipc,euler]
        [--models pretrained:mnist-dit4,pretrained:mnist-repro-dcdit-n4] [--classifier DIR] [--out DIR]
        [--cells ddim:25,dpm++2m:10]   # only the cells a comparison needs (Inception FID is most of the cost)
    python benchmarks/sampler_quality.py --smoke      # 50 images, 2 steps, every sampler: a check, not a result

For every model x sampler x step count: N class-balanced samples (labels
k % 10, per-sample seeds from --seed, clipped x0, --cfg-scale, --precision),
then, with the library's scorer API (``dcdit.evaluation``): FID against N
held-out MNIST test images (Inception pool_3 features, or the in-domain
classifier's with --feature classifier) and the in-domain classifier's
accuracy on the intended labels. The classifier is --classifier, else one is
trained here (600 steps, as the reproduction's) and kept in --out.

Each cell is cached in --out/cells/ (a rerun resumes); the results go to
--out/sampler_quality.json and a markdown table --out/sampler_quality.md
(one row per model x sampler, one column per step count: FID / accuracy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.checkpoint import load_model
from dcdit.data import DataConfig, build_dataset
from dcdit.evaluation import (
    ReferenceScorer, build_extractor, classifier_accuracy, load_classifier, save_classifier, train_classifier,
)
from dcdit.sampling import SAMPLERS, generate_local, resolve_precision, sampling_diffusion_for
from reproduction import dataset_uint8, mnist  # benchmarks/reproduction: the reproduction's MNIST helpers

DEFAULT_MODELS = "pretrained:mnist-dit4,pretrained:mnist-repro-dcdit-n4"
DEFAULT_SAMPLERS = "ddim,dpm++2m,unipc,euler"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def classifier_dir(args, out: Path) -> Path:
    if args.classifier:
        return Path(args.classifier)
    path = out / "classifier"
    if not (path / "classifier.safetensors").is_file():
        log("training the in-domain MNIST classifier (600 steps)")
        ds = build_dataset(DataConfig(source="mnist", split="train", image_size=32))
        save_classifier(train_classifier(ds, steps=args.classifier_steps, batch_size=128, seed=0), path)
    return path


def generate(model, sampler: str, steps: int, n: int, args) -> tuple[np.ndarray, np.ndarray, dict]:
    """n class-balanced samples (uint8 NHWC), their labels, and what the run cost (FLOPs on the first batch)."""
    got = generate_local(model, sampling_diffusion_for(model, sampler, steps), n, batch_size=args.batch,
                         seed=args.seed, cfg_scale=args.cfg_scale, clip_denoised=True,
                         precision=args.precision, sampler=sampler)
    st = got.stats
    cost = {"seconds": got.seconds, "images_per_second": n / got.seconds, "network_calls": steps,
            "gflops_per_image": st.gflops_per_image, "timesteps": st.timesteps,
            "precision": resolve_precision(args.precision), "mean_kept_share": st.mean_kept_share}
    return got.images, got.labels, cost


def markdown(results: list[dict], steps: list[int], n: int, feature: str) -> str:
    cell = {(r["model"], r["sampler"], r["steps"]): r for r in results}
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        for sampler in dict.fromkeys(r["sampler"] for r in results if r["model"] == model):
            vals = []
            for s in steps:
                r = cell.get((model, sampler, s))
                vals.append("-" if r is None else f"{r['fid']:.1f} / {r['class_acc']:.3f}")
            rows.append(f"| {model.replace('pretrained:', '')} | {sampler} | " + " | ".join(vals) + " |")
    head = "| model | sampler | " + " | ".join(f"{s} steps" for s in steps) + " |"
    sep = "|---|---|" + "---|" * len(steps)
    return (f"FID@{n} ({feature} features, vs {n} MNIST test images) / class accuracy; one network call per "
            f"step (no guidance) or two (guidance)\n\n" + "\n".join([head, sep, *rows]) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS)
    p.add_argument("--steps", default="5,10,15,25")
    p.add_argument("--cells", default=None, metavar="SAMPLER:STEPS,...",
                   help="only these cells, e.g. ddim:25,dpm++2m:10 (replaces --samplers and --steps; default: their table)")
    p.add_argument("--n", type=int, default=2000, help="samples per cell and reference images (default 2000)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--feature", default="inception", choices=("inception", "classifier"),
                   help="FID features (default inception; classifier: the in-domain classifier's, cheap)")
    p.add_argument("--classifier", default=None, help="in-domain classifier directory (default: train one in --out)")
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/sampler_quality")
    p.add_argument("--smoke", action="store_true", help="50 images, 2 steps, 20 classifier steps: a check")
    args = p.parse_args()
    if args.smoke:
        args.n, args.steps, args.classifier_steps, args.batch = min(args.n, 50), "2", 20, 25
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    only = None
    if args.cells:  # a subset of the table: the cells a goal compares
        only = {(c.rsplit(":", 1)[0].strip(), int(c.rsplit(":", 1)[1])) for c in args.cells.split(",") if c.strip()}
        samplers = list(dict.fromkeys(sm for sm, _ in sorted(only)))
        steps = sorted({st for _, st in only})
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        raise SystemExit(f"unknown sampler(s) {bad}: expected {', '.join(SAMPLERS)}")
    clf_path = classifier_dir(args, out)
    clf = load_classifier(clf_path)
    extractor = build_extractor("inception" if args.feature == "inception" else f"classifier:{clf_path}",
                                batch_size=50 if args.feature == "inception" else 256)
    ref_imgs, ref_labels = dataset_uint8(mnist("test"), args.n)
    scorer = ReferenceScorer.from_images(extractor, ref_imgs, ref_labels, f"mnist-test-{args.n}",
                                         cache_dir=out / "stats_cache", cache_samples=False)
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = load_model(name, which="ema").eval()
        for sampler in samplers:
            for s in steps:
                if only is not None and (sampler, s) not in only:
                    continue
                key = f"{name.replace(':', '_')}_{sampler}_{s}_n{args.n}_cfg{args.cfg_scale:g}_{args.feature}"
                path = out / "cells" / f"{key}.json"
                if path.is_file():
                    results.append(json.loads(path.read_text()))
                    continue
                imgs, labels, cost = generate(model, sampler, s, args.n, args)
                row = {"model": name, "sampler": sampler, "steps": s, "n": args.n, "cfg_scale": args.cfg_scale,
                       "fid": scorer.fid(imgs)[0],
                       "class_acc": float(classifier_accuracy(clf, imgs, labels)), "feature": extractor.name, **cost}
                path.write_text(json.dumps(row, indent=1))
                results.append(row)
                log(f"{name} {sampler} {s} steps: FID {row['fid']:.2f}, acc {row['class_acc']:.3f}, "
                    f"{row['images_per_second']:.1f} img/s")
    meta = {"n": args.n, "steps": steps, "samplers": samplers, "cfg_scale": args.cfg_scale, "seed": args.seed,
            "precision": args.precision, "feature": extractor.name, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    (out / "sampler_quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, steps, args.n, extractor.name)
    (out / "sampler_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
