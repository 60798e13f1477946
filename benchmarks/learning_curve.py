"""Learning curves: sample quality against training steps, wall-clock and training FLOPs.

Trains one model with one recipe on MNIST 32x32 and scores its EMA weights at
a list of steps: sample class accuracy (an independent in-domain classifier,
``dcdit train-classifier --source mnist``), Inception FID against held-out
MNIST test images, images seen, training seconds (the training segments only,
evaluation excluded) and training GFLOPs (3x the forward FLOPs, counted on the
model's own routing). Runs are bounded by steps, never by time; to compare two
recipes fairly run them side by side with one thread each (or one after the
other on a quiet machine) and compare steps first, seconds second.

    # one curve (resumes: re-running continues where it stopped)
    python benchmarks/learning_curve.py --model dit4 --recipe fast --steps 6000 --out runs/lc/dit4_fast
    # compare recipes / models: a table and plots from several curves
    python benchmarks/learning_curve.py --report runs/lc/dit4_fast runs/lc/dit4_dit --plot-dir docs/learning

Models (``--model``) are the reproduction's sizes: ``dit4`` (DiT, patch 4, 64
tokens), ``dit2`` (patch 2, 256 tokens) and ``dcdit_n4`` (2x2 stem -> 16x16 grid,
encoder/decoder at width 32, the same 4-block width-128 main network on ~64 of
the 256 tokens). Recipes (``--recipe``): ``dit`` (the original DiT training
defaults at this scale), ``fast`` (the recipe the curves in BENCHMARKS.md
support: label init N(0, 1), Min-SNR-5, lr 1e-3, EMA warm-up, v-prediction) and
``fast-eps`` (``fast`` with DiT's epsilon prediction, the earlier curves);
``--set key=value`` changes any config key on top.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.evaluation import (
    ReferenceScorer, build_extractor, classifier_accuracy, load_classifier, load_stats, save_stats,
)
from dcdit.sampling import LocalSamples, generate_local, sampling_diffusion_for
from reproduction import SAMPLE_PRECISION, dataset_uint8, mnist  # the reproduction's evaluation protocol

MAIN_NET = {"hidden_size": 128, "depth": 4, "num_heads": 4}
MODELS: dict[str, dict] = {
    "dit4": {"arch": "dit", "preset": "DiT-S/4", "overrides": dict(MAIN_NET)},
    "dit2": {"arch": "dit", "preset": "DiT-S/2", "overrides": dict(MAIN_NET)},
    "dcdit_n4": {"arch": "dcdit", "preset": "DC-DiT-S-N4",
                 "overrides": {"patch_size": 2, "d_model": [128, 128], "num_heads": [4, 4],
                               "arch_layout": ["c2", ["D4"], "c2"]}},
}

# Config keys each recipe sets (dotted), on top of BASE.
RECIPES: dict[str, dict] = {
    # DiT's own choices, sized for a short run (a 0.9999 EMA would not move in a few thousand steps).
    "dit": {"optim.lr": 1e-4, "train.ema_decay": 0.999},
    # The first fast recipe (epsilon prediction): the curves in BENCHMARKS.md before v-prediction.
    "fast-eps": {"optim.lr": 1e-3, "optim.warmup_steps": 200, "model.label_init_std": 1.0,
                 "diffusion.min_snr_gamma": 5.0, "train.ema_decay": 0.999, "train.ema_warmup": True},
}
# What the learning-speed benchmark supports (BENCHMARKS.md "Learning speed"): fast-eps + v-prediction.
RECIPES["fast"] = {**RECIPES["fast-eps"], "diffusion.prediction": "v"}

BASE: dict = {
    "data": {"source": "mnist", "image_size": 32},
    "optim": {"lr": 1e-4, "warmup_steps": 0, "grad_clip": 1.0},
    "train": {"global_batch_size": 64, "seed": 0, "ema_decay": 0.999, "log_interval": 50,
              "ckpt_interval": 10**9, "keep_last_k": 1, "precision": "bf16", "device": "cpu",
              "progress": False, "tensorboard": False, "num_workers": 0},
    "ratio": {"weight": 0.03, "target_N": 4.0, "group_size": 16},
    "multibudget": {"enabled": False},
    "samples": {"interval": 0},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_key(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def build_config(model: str, recipe: str, sets: list[str], name: str) -> dict:
    import yaml

    if model not in MODELS:
        raise SystemExit(f"error: unknown --model {model!r}; choose one of {', '.join(MODELS)}")
    if recipe not in RECIPES:
        raise SystemExit(f"error: unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    d = copy.deepcopy(BASE)
    d["model"] = copy.deepcopy(MODELS[model])
    d["name"] = name
    for k, v in RECIPES[recipe].items():
        set_key(d, k, v)
    for s in sets:
        k, _, v = s.partition("=")
        set_key(d, k, yaml.safe_load(v))
    return d


# --------------------------------------------------------------------------- scoring


def mnist_scorer(cache: Path, n_ref: int) -> ReferenceScorer:
    """Inception FID against the first ``n_ref`` MNIST test images (their statistics kept in ``cache``)."""
    inception = build_extractor("inception", batch_size=50)
    path = cache / f"mnist_test_inception_{n_ref}.npz"
    if path.is_file():
        return ReferenceScorer(inception, load_stats(path))
    imgs, labels = dataset_uint8(mnist("test"), n_ref)
    scorer = ReferenceScorer.from_images(inception, imgs, labels, "mnist-test")
    save_stats(path, scorer.reference, include_features=False)
    return scorer


def score(scorer: ReferenceScorer, classifier, images: np.ndarray, labels: np.ndarray, fid: bool) -> dict:
    """Class accuracy by the in-domain ``classifier`` and, with ``fid``, Inception FID."""
    out = {"class_acc": float(classifier_accuracy(classifier, images, labels)), "n": int(len(images))}
    if fid:
        out["fid"] = scorer.fid(images)[0]
    return out


def generate(model, n: int, cfg_scale: float, ddim_steps: int, seed: int = 1234, batch: int = 500) -> LocalSamples:
    """n class-balanced DDIM samples (SAMPLE_PRECISION, clipped x0): uint8 NHWC images, labels, statistics."""
    return generate_local(model, sampling_diffusion_for(model, "ddim", ddim_steps), n, batch_size=batch, seed=seed,
                          flops="none", cfg_scale=cfg_scale, clip_denoised=True, precision=SAMPLE_PRECISION)


def kept_extremes(got: LocalSamples) -> dict:
    """Mean kept share at the noisiest and at the cleanest sampling step (empty for a DiT)."""
    summary = got.stats.kept_summary()
    return {k: summary[k] for k in ("kept_share_noisiest", "kept_share_cleanest") if k in summary}


def train_gflops_per_image(model, image_size: int, channels: int, n: int = 16) -> float:
    """3x the forward GFLOPs per image at uniformly drawn timesteps (the model's own routing for DC-DiT)."""
    from dcdit.flops import count_flops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, image_size, image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.arange(n) % 10
    model = model.eval()
    rep, _ = count_flops(lambda: model(x, t, y))
    return 3.0 * rep.total / n / 1e9


# --------------------------------------------------------------------------- one curve


def train_seconds(run: Path, upto: int) -> float:
    """Training time to step ``upto`` from the run's own log (sampling and checkpointing excluded)."""
    from dcdit.training.rundir import training_seconds

    return training_seconds(run, upto)


def save_curve(path: Path, curve: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(curve, indent=1))
    os.replace(tmp, path)


def run_curve(a) -> dict:
    from dcdit.checkpoint import load_model
    from dcdit.training import config_from_dict, train
    from dcdit.training.state import find_checkpoint

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    d = build_config(a.model, a.recipe, a.set or [], out.name)
    d["train"]["steps"] = a.steps
    d["train"]["num_threads"] = a.threads
    curve_path = out / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else {
        "model": a.model, "recipe": a.recipe, "sets": a.set or [], "config": d, "threads": a.threads,
        "points": []}
    def settings(c: dict) -> dict:  # the config without train.steps: a curve may be extended
        c = copy.deepcopy(c)
        c["train"].pop("steps", None)
        return c

    if settings(curve["config"]) != settings(d):
        raise SystemExit(f"error: {out} holds a curve with another config; use a new --out")
    curve["config"] = d
    scorer, classifier = mnist_scorer(Path(a.cache), a.n_ref), load_classifier(Path(a.classifier))
    eval_at = sorted({int(s) for s in a.eval_at.split(",") if int(s) <= a.steps} | {a.steps})
    done_steps = {p["step"] for p in curve["points"]}
    gflops_img = None
    for target in eval_at:
        if target in done_steps:
            continue
        ck = find_checkpoint(out / "run") if (out / "run").exists() else None
        at = int(ck.name.split("-")[1]) if ck is not None else 0
        if at < target:
            d_seg = copy.deepcopy(d)
            d_seg["train"]["steps"] = target
            cfg = config_from_dict(d_seg)
            log(f"{out.name}: train {at} -> {target}")
            train(cfg, out=str(out / "run"), resume=True if at else None)
            ck = find_checkpoint(out / "run")
            if int(ck.name.split("-")[1]) < target:  # stopped by a signal: the checkpoint is saved, resume later
                save_curve(curve_path, curve)
                raise SystemExit(f"{out.name}: training stopped before step {target}; re-run to resume")
        model = load_model(out / "run", which="ema").eval()
        if gflops_img is None or a.model.startswith("dcdit"):
            gflops_img = train_gflops_per_image(copy.deepcopy(model).float(), 32, 1)
        point = {"step": target, "images": target * d["train"]["global_batch_size"],
                 "train_seconds": round(train_seconds(out / "run", target), 1),
                 "train_gflops_per_image": gflops_img}
        prev = [p for p in curve["points"] if p["step"] < target]
        point["train_gflops"] = (prev[-1]["train_gflops"] if prev else 0.0) + gflops_img * (
            target - (prev[-1]["step"] if prev else 0)) * d["train"]["global_batch_size"]
        n = a.n_final if target == a.steps else a.n_eval
        t0 = time.time()
        for s in a.cfg:
            got = generate(model, n, s, a.ddim_steps)
            imgs, labels = got.images, got.labels
            res = score(scorer, classifier, imgs, labels, fid=target == a.steps or s in a.fid_cfg)
            point[f"cfg{s:g}"] = {**res, **kept_extremes(got)}
            if target == a.steps:
                from dcdit.viz.plots import plot_class_grid

                plot_class_grid(imgs[:100], labels[:100], out / f"samples_cfg{s:g}.png", per_class=10,
                                title=f"{out.name}, step {target}, DDIM {a.ddim_steps}, cfg {s:g}")
        point["eval_seconds"] = round(time.time() - t0, 1)
        rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
        rows = [r for r in rows if "loss" in r and r.get("step", 0) <= target]
        if rows:
            point["train_mse"] = rows[-1].get("mse")
            point["images_per_sec"] = float(np.median([r["images_per_sec"] for r in rows[-20:]]))
        curve["points"].append(point)
        curve["points"].sort(key=lambda p: p["step"])
        save_curve(curve_path, curve)
        log(f"{out.name} step {target}: " + ", ".join(
            f"cfg {s:g} acc {point[f'cfg{s:g}']['class_acc']:.3f} FID {point[f'cfg{s:g}'].get('fid', float('nan')):.1f}"
            for s in a.cfg) + f" | train {point['train_seconds'] / 60:.1f} min")
    return curve


# --------------------------------------------------------------------------- report


def report(dirs: list[str], plot_dir: str | None) -> str:
    curves = [(Path(p).name, json.loads((Path(p) / "curve.json").read_text())) for p in dirs]
    for d, (_, c) in zip(dirs, curves):  # training time from the run's own log (also across restarts)
        if (Path(d) / "run" / "metrics.jsonl").is_file():
            for pt in c["points"]:
                pt["train_seconds"] = train_seconds(Path(d) / "run", pt["step"])
    lines = ["| run | model | recipe | step | images | train min | train TFLOPs | img/s | "
             "acc cfg 1 | FID cfg 1 | acc cfg 3 | FID cfg 3 |", "|" + "---|" * 12]
    for name, c in curves:
        for p in c["points"]:
            cells = []
            for s in ("cfg1", "cfg3"):
                q = p.get(s)
                cells += [f"{q['class_acc']:.2f}" if q else "-", f"{q['fid']:.1f}" if q and "fid" in q else "-"]
            lines.append(f"| {name} | {c['model']} | {c['recipe']} {' '.join(c['sets'])} | {p['step']} | "
                         f"{p['images']} | {p['train_seconds'] / 60:.1f} | {p['train_gflops'] / 1e3:.1f} | "
                         f"{p.get('images_per_sec', float('nan')):.0f} | " + " | ".join(cells) + " |")
    if plot_dir:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        for metric, label in (("class_acc", "sample class accuracy"), ("fid", "Inception FID")):
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for name, c in curves:
                for s, ls in (("cfg1", "--"), ("cfg3", "-")):
                    pts = [p for p in c["points"] if s in p and metric in p[s]]
                    if not pts:
                        continue
                    ys = [p[s][metric] for p in pts]
                    for ax, xs in zip(axes, ([p["step"] for p in pts], [p["train_seconds"] / 60 for p in pts],
                                             [p["train_gflops"] / 1e3 for p in pts])):
                        ax.plot(xs, ys, ls, marker="o", label=f"{name} {s}")
            for ax, xl in zip(axes, ("training steps", "training minutes (this machine)", "training TFLOPs")):
                ax.set_xlabel(xl)
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
                if metric == "fid":
                    ax.set_yscale("log")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(Path(plot_dir) / f"learning_{metric}.png", dpi=110)
            plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit4", choices=sorted(MODELS))
    ap.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    ap.add_argument("--set", action="append", help="config key=value on top of the recipe (repeatable)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-at", default="500,1000,2000,3000,4000,6000,8000",
                    help="steps to score at (the final step is always scored)")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to score")
    ap.add_argument("--fid-cfg", type=float, nargs="+", default=[1.0, 3.0],
                    help="guidance scales whose FID is computed at intermediate points (all at the final step)")
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--n-eval", type=int, default=1000, help="samples per intermediate point")
    ap.add_argument("--n-final", type=int, default=2000, help="samples at the final step")
    ap.add_argument("--n-ref", type=int, default=2000, help="MNIST test images for the FID reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--classifier", default="runs/mnist-classifier")
    ap.add_argument("--cache", default="runs/lc-cache")
    ap.add_argument("--out")
    ap.add_argument("--report", nargs="+", metavar="CURVE_DIR")
    ap.add_argument("--plot-dir")
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.report, a.plot_dir))
        return 0
    if not a.out:
        ap.error("--out is required to train a curve")
    run_curve(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
