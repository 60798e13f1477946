#!/usr/bin/env python
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
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STAGES = ("classifier", "reference", "train", "eval", "upcycle", "speed", "elastic", "shapes", "curve", "report",
          "shapes-ablation")
MODELS = ("dit4", "dcdit_n4", "dit2")  # training order: the cheap models (and what upcycling needs) first
LABEL = {"dit2": "DiT/2", "dit4": "DiT/4", "dcdit_n4": "DC-DiT N=4"}
# Precision of every sampling network call (dcdit.sampling.precision): "auto" is bf16 on a CPU or GPU that
# computes bf16 natively (this machine: AVX512-BF16 / AMX, as the published results), fp32 elsewhere.
SAMPLE_PRECISION = "auto"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything sized in one place (full run vs --smoke)."""

    # main network, shared by DiT/2, DiT/4 and DC-DiT's main stage
    hidden: int = 128
    depth: int = 10                   # deep enough that the scaffold is <= 15 % of DC-DiT's FLOPs (8: ~17 %)
    heads: int = 4
    # DC-DiT scaffold: 2x2 stem -> 16x16 grid; one conv ResBlock each side at width hidden / enc_factor
    patch: int = 2
    enc_layout: str = "c1"
    enc_factor: int = 8
    norm_groups: int = 8
    # training, identical for every MNIST model (the learning-speed recipe)
    steps: int = 4000                 # 5.1 MNIST epochs at batch 64
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    ema_warmup: bool = True
    label_init_std: float = 1.0
    min_snr_gamma: float = 5.0
    prediction: str = "v"
    compile_dit: bool = True          # torch.compile the DiTs' training step (~1.3x; DC-DiT routes, so eager)
    multibudget_start: float = 0.5    # share of the run after which DC-DiT N=4 trains multi-budget
    fractions: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    upcycle_share: float = 0.25       # the upcycled run trains this share of the scratch run's steps
    ddim_steps: int = 25
    n_fid: int = 2000                 # samples per model for the main FID
    n_ref: int = 2000                 # held-out real MNIST test images
    n_small: int = 500                # samples per elastic / upcycling point
    flop_images: int = 50             # images whose FLOPs are counted per evaluation (the counter slows sampling)
    sample_batch: int = 250
    speed_batch: int = 100
    elastic: list = field(default_factory=lambda: [0.2, 0.4, 0.6])
    classifier_steps: int = 600
    shapes_steps: int = 2000
    shapes_images: int = 128          # held-out images for the routing analysis
    shapes_train_images: int = 10000
    shapes_timesteps: list = field(default_factory=lambda: [25, 50, 100, 150, 250, 500, 750, 950])
    extractor: str = "inception"      # FID features ("classifier": the in-domain classifier's, for --smoke)
    source: str = "mnist"             # data source of the classifier and the FID reference (canvas.py: "canvas")
    image_size: int = 32


def smoke_settings() -> Settings:
    return Settings(depth=2, steps=8, batch=8, warmup=1, ddim_steps=2, n_fid=24, n_ref=24, n_small=12,
                    sample_batch=12, speed_batch=4, classifier_steps=10, shapes_steps=4, shapes_images=8,
                    shapes_train_images=256, shapes_timesteps=[50, 500], extractor="classifier", flop_images=6, compile_dit=False)


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def cached(path: Path, fn):
    """Run ``fn()`` unless ``path`` holds its result; record the stage's wall time."""
    got = read_json(path)
    if got is not None:
        return got
    t0 = time.time()
    res = fn()
    res["seconds"] = round(time.time() - t0, 1)
    write_json(path, res)
    log(f"done {path.name} in {res['seconds']:.0f}s")
    return res


def mnist(split: str):
    return dataset(Settings(), split)


def dataset(s: Settings, split: str):
    """The run's data (``s.source`` at ``s.image_size``), split ``split``."""
    from dcdit.data import DataConfig, build_dataset

    return build_dataset(DataConfig(source=s.source, split=split, image_size=s.image_size))


def dataset_uint8(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    from dcdit.data.transforms import to_uint8_images

    n = min(n, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    return to_uint8_images(x), np.asarray(ds.labels[:n])


# --------------------------------------------------------------------------- configs


def model_section(s: Settings, name: str) -> dict:
    if name in ("dit2", "dit4"):
        return {"arch": "dit", "preset": "DiT-S/2" if name == "dit2" else "DiT-S/4",
                "overrides": {"hidden_size": s.hidden, "depth": s.depth, "num_heads": s.heads},
                "label_init_std": s.label_init_std}
    return {"arch": "dcdit", "preset": "DC-DiT-S-N4", "overrides": dcdit_overrides(s),
            "label_init_std": s.label_init_std}


def dcdit_overrides(s: Settings) -> dict:
    return {"patch_size": s.patch, "d_model": [s.hidden, s.hidden], "num_heads": [s.heads, s.heads],
            "arch_layout": [s.enc_layout, [f"D{s.depth}"], s.enc_layout], "enc_dec_dim_factor": [s.enc_factor, None],
            "norm_groups": s.norm_groups}


def upcycle_steps(s: Settings) -> int:
    return max(1, int(s.steps * s.upcycle_share))


def checkpoint_steps(s: Settings) -> list[int]:
    """Steps whose checkpoints the upcycling comparison scores: 1/4, 1/2 and all of the upcycled run."""
    u = upcycle_steps(s)
    return sorted({max(1, u // 4), max(1, u // 2), u})


def train_dict(s: Settings, name: str, seed: int, steps: int | None = None) -> dict:
    steps = steps or s.steps
    dc = name.startswith("dcdit")
    d = {
        "name": name,
        "model": model_section(s, name.removesuffix("_upcycled")),
        "data": {"source": "mnist", "split": "train", "image_size": 32},
        "diffusion": {"min_snr_gamma": s.min_snr_gamma, "prediction": s.prediction},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup},
        "train": {"steps": steps, "global_batch_size": s.batch, "seed": seed, "ema_decay": s.ema_decay,
                  "ema_warmup": s.ema_warmup, "precision": "bf16", "device": "cpu",
                  "compile": s.compile_dit and not dc, "log_interval": max(1, min(50, steps)),
                  "ckpt_interval": max(1, upcycle_steps(s) // 4), "keep_last_k": 0, "progress": False,
                  "tensorboard": False},
        "samples": {"interval": 0},
    }
    if dc:
        d["ratio"] = {"weight": 0.03, "target_N": 4.0, "group_size": min(16, s.batch)}
        d["multibudget"] = {"enabled": True, "start_step": int(s.steps * s.multibudget_start),
                            "fractions": list(s.fractions)}
    return d


def shapes_dict(s: Settings, seed: int) -> dict:
    import yaml

    d = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/shapes_dcdit_cpu.yaml").read_text())
    d["name"] = "shapes_dcdit"
    d["data"]["num_samples"] = s.shapes_train_images
    d["train"].update({"steps": s.shapes_steps, "global_batch_size": s.batch, "seed": seed, "precision": "bf16",
                       "ckpt_interval": max(1, s.shapes_steps), "keep_last_k": 1, "progress": False,
                       "tensorboard": False, "log_interval": max(1, min(50, s.shapes_steps))})
    d["optim"]["warmup_steps"] = min(d["optim"]["warmup_steps"], s.warmup * 5)
    d["ratio"]["group_size"] = min(16, s.batch)
    d["multibudget"]["start_step"] = s.shapes_steps // 2
    d["samples"] = {"interval": 0}
    if s.depth < 4:  # --smoke
        d["model"]["overrides"]["arch_layout"] = ["c2", [f"D{s.depth}"], "c2"]
    return d


def run_step(run_dir: Path) -> int:
    from dcdit.training.state import find_checkpoint

    ck = find_checkpoint(run_dir) if run_dir.exists() else None
    return int(ck.name.split("-")[1]) if ck is not None else 0


def train_run(d: dict, run_dir: Path, steps: int) -> dict:
    from dcdit.training import config_from_dict, train
    from dcdit.training.rundir import training_seconds

    cfg = config_from_dict(d)
    done = run_step(run_dir)
    if done < steps:
        log(f"train {d['name']} -> {run_dir} ({steps} steps x batch {d['train']['global_batch_size']}"
            + (f", resuming at {done}" if done else "") + ")")
        train(cfg, out=str(run_dir), resume=True if done else None)
    if run_step(run_dir) < steps:
        raise RuntimeError(f"{run_dir} stopped before step {steps}")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]
    last = rows[-1] if rows else {}
    secs = training_seconds(run_dir, upto=steps)
    return {"run_dir": str(run_dir), "steps": steps, "batch": d["train"]["global_batch_size"],
            "final_loss": last.get("loss"), "final_mse": last.get("mse"),
            "compression_natural": last.get("compression_natural"), "train_seconds": round(secs, 1),
            "train_images_per_s": steps * d["train"]["global_batch_size"] / secs if secs else None,
            "train_seconds_at_median_rate": round(training_seconds(run_dir, upto=steps, at_median_rate=True), 1),
            "threads": torch.get_num_threads()}


def train_minutes(t: dict | None) -> float | None:
    """A training run's minutes at its median logged rate: a paused or shared log interval (or the one
    holding torch.compile's ~15 s) does not move it. The plain sum of the intervals is ``train_seconds``."""
    from dcdit.training.rundir import training_seconds

    if not t:
        return None
    secs = t.get("train_seconds_at_median_rate") or training_seconds(t["run_dir"], upto=t["steps"], at_median_rate=True)
    return secs / 60 if secs else None


# --------------------------------------------------------------------------- sampling + scoring


class Ctx:
    def __init__(self, out: Path, s: Settings, smoke: bool):
        self.out, self.s, self.smoke = out, s, smoke
        self._extractors: dict = {}
        self._refs: dict = {}
        self._clf = None

    # ---- shared evaluation pieces
    @property
    def clf_dir(self) -> Path:
        return self.out / "classifier"

    def classifier(self):
        from dcdit.evaluation import load_classifier

        if self._clf is None:
            self._clf = load_classifier(self.clf_dir)
        return self._clf

    def extractor(self, kind: str | None = None):
        from dcdit.evaluation import build_extractor

        kind = kind or self.s.extractor
        if kind not in self._extractors:
            spec = "inception" if kind == "inception" else f"classifier:{self.clf_dir}"
            ex = build_extractor(spec, batch_size=50 if spec == "inception" else 256)  # the fast Inception pass
            self._extractors[kind] = ex
        return self._extractors[kind]

    def features(self, images: np.ndarray, labels, name: str, kind: str | None = None):
        from dcdit.evaluation import ArrayImages, compute_feature_set

        cache = self.out / "stats_cache" if self.smoke else None
        return compute_feature_set(ArrayImages(images, labels, name=name), self.extractor(kind), cache_dir=cache)

    def reference(self, kind: str | None = None):
        kind = kind or self.s.extractor
        if kind not in self._refs:
            imgs, labels = dataset_uint8(dataset(self.s, "test"), self.s.n_ref)
            self._refs[kind] = self.features(imgs, labels, f"{self.s.source}-test", kind)
        return self._refs[kind]

    def fid(self, feats: np.ndarray, kind: str | None = None) -> float:
        from dcdit.evaluation import feature_statistics, frechet_distance

        ref = self.reference(kind)
        mu, sigma = feature_statistics(feats)
        return float(frechet_distance(mu, sigma, ref.mu, ref.sigma))


def generate(model, n: int, s: Settings, seed: int, tail_drop: float = 0.0):
    """n class-balanced DDIM samples (SAMPLE_PRECISION), FLOPs counted on the first ``s.flop_images``."""
    from dcdit.data.transforms import to_uint8_images
    from dcdit.sampling import SampleStats, sample, sampling_diffusion_for

    diffusion = sampling_diffusion_for(model, "ddim", s.ddim_steps)
    labels = np.arange(n) % 10
    outs, stats = [], []
    t0 = time.time()
    # per-sample noise comes from the sample's index, so the split into batches does not change the images
    first = min(n, s.flop_images or s.sample_batch)
    for a, b in [(0, first)] + [(c, min(n, c + s.sample_batch)) for c in range(first, n, s.sample_batch)]:
        x, st = sample(model, diffusion, labels[a:b], seed=seed, indices=range(a, b), tail_drop=tail_drop,
                       measure_flops=a == 0, clip_denoised=True, precision=SAMPLE_PRECISION)
        outs.append(to_uint8_images(x.float()))
        stats.append(st)
    return np.concatenate(outs), labels, SampleStats.merge(stats), time.time() - t0


def kept_summary(st) -> dict:
    if st.kept_share is None:
        return {}
    ks = st.kept_share[:, 0, :]  # (steps, n), stage 0
    return {"kept_share_noisiest": float(ks[0].mean()), "kept_share_cleanest": float(ks[-1].mean()),
            "t_noisiest": int(st.timesteps[0]), "t_cleanest": int(st.timesteps[-1]),
            "kept_share_mean": float(ks.mean()), "kept_share_by_t": [float(v) for v in ks.mean(1)],
            "natural_share_by_t": [float(v) for v in st.natural_share[:, 0, :].mean(1)]}


def score(ctx: Ctx, model, n: int, seed: int, tail_drop: float, tag: str, grid: bool = False,
          kind: str | None = None) -> dict:
    from dcdit.evaluation import classifier_accuracy

    kind = kind or ctx.s.extractor
    imgs, labels, st, secs = generate(model, n, ctx.s, seed, tail_drop)
    fs = ctx.features(imgs, labels, tag, kind)
    res = {"n": int(n), "tail_drop": tail_drop, "features": kind, "fid": ctx.fid(fs.features, kind),
           "class_acc": classifier_accuracy(ctx.classifier(), imgs, labels),
           "gflops_per_image": st.gflops_per_image, "ddim_steps": ctx.s.ddim_steps,
           "gflops_by_component": {k: v / 1e9 for k, v in st.flops_by_component.items()},
           "sampling_seconds": round(secs, 1), **kept_summary(st)}
    # FID of the first k samples too, so points scored with fewer samples can be compared at equal n
    res["fid_at"] = {str(k): ctx.fid(fs.features[:k], kind) for k in sorted({250, 500, 1000, ctx.s.n_small}) if k < n}
    if n > ctx.s.n_small:
        res["fid_small"] = res["fid_at"][str(ctx.s.n_small)]
    if grid:
        from dcdit.viz.plots import plot_class_grid

        plot_class_grid(imgs[:200], labels[:200], ctx.out / f"samples_{tag}.png", per_class=10,
                        title=f"{tag}: DDIM {ctx.s.ddim_steps} steps")
    if st.kept_share is not None:
        np.savez(ctx.out / f"cost_{tag}.npz", timesteps=np.asarray(st.timesteps), kept_share=st.kept_share,
                 flops=st.flops_per_step if st.flops_per_step is not None else np.zeros(0))
    return res


def load(run: Path, ckpt: str | None = None):
    from dcdit.checkpoint import load_model

    return load_model(run / ckpt if ckpt else run, which="ema").eval()


# --------------------------------------------------------------------------- stages


def stage_classifier(ctx: Ctx, seed: int) -> dict:
    def run():
        from dcdit.evaluation import save_classifier, train_classifier
        from dcdit.evaluation.classifier import dataset_accuracy

        clf = train_classifier(dataset(ctx.s, "train"), steps=ctx.s.classifier_steps, batch_size=128, seed=seed,
                               log=log, log_every=100)
        acc = dataset_accuracy(clf, dataset(ctx.s, "test"))
        save_classifier(clf, ctx.clf_dir, extra={"test_accuracy": acc})
        return {"test_accuracy": acc, "steps": ctx.s.classifier_steps, "batch": 128, "path": str(ctx.clf_dir)}

    return cached(ctx.out / "classifier.json", run)


def stage_reference(ctx: Ctx) -> dict:
    def run():
        ref = ctx.reference()
        return {"n": int(ref.n), "extractor": ref.extractor, "stats": str(ref.path)}

    return cached(ctx.out / "reference.json", run)


# One change at a time to the shapes DC-DiT, to find what sets which cells its router marks
# (v1's 600-step epsilon run: AUC 0.86 at t = 25; v2's 2000-step v run: 0.37). Run on request only.
SHAPES_VARIANTS = {
    "epsilon": ("predicts epsilon (DiT's objective) instead of v", {"diffusion": {"prediction": "epsilon"}}),
    "no_multibudget": ("no multi-budget (tail-drop) training", {"multibudget": {"enabled": False}}),
}


def stage_shapes(ctx: Ctx, seed: int, variant: str | None = None) -> dict:
    """A DC-DiT trained on shapes; ROC-AUC of its router's p against the detail map, per timestep t."""
    tag = f"shapes_{variant}" if variant else "shapes"

    def run():
        from dcdit.analysis import routing_vs_detail
        from dcdit.data import DataConfig, build_dataset
        from dcdit.diffusion import create_diffusion

        d = shapes_dict(ctx.s, seed)
        for section, changes in (SHAPES_VARIANTS[variant][1] if variant else {}).items():
            d[section].update(changes)
        run_dir = ctx.out / "runs" / f"{tag}_dcdit_s{seed}"
        tr = train_run(d, run_dir, ctx.s.shapes_steps)
        held_out = build_dataset(DataConfig(source="shapes", num_samples=max(ctx.s.shapes_images, 64),
                                            seed=12345, image_size=32))
        rows = routing_vs_detail(load(run_dir), create_diffusion(""), held_out, ctx.s.shapes_timesteps,
                                 ctx.s.shapes_images, seed=seed)
        late = [r["auc"] for r in rows if r["t"] <= 250]
        noisy = [r["auc"] for r in rows if r["t"] >= 500]
        return {"train": tr, "variant": variant, "per_t": rows,
                "auc_late_mean": float(np.mean(late)) if late else None,
                "auc_noisy_mean": float(np.mean(noisy)) if noisy else None}

    return cached(ctx.out / f"{tag}_s{seed}.json", run)


def stage_train(ctx: Ctx, name: str, seed: int) -> dict:
    return cached(ctx.out / f"train_{name}_s{seed}.json",
                  lambda: train_run(train_dict(ctx.s, name, seed), ctx.out / "runs" / f"{name}_s{seed}", ctx.s.steps))


def stage_eval(ctx: Ctx, name: str, seed: int) -> dict:
    def run():
        model = load(ctx.out / "runs" / f"{name}_s{seed}")
        res = score(ctx, model, ctx.s.n_fid, seed, 0.0, f"{name}_s{seed}", grid=True)
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        return res

    return cached(ctx.out / f"eval_{name}_s{seed}.json", run)


def stage_speed(ctx: Ctx, seed: int) -> dict:
    def run():
        from dcdit.sampling import resolve_precision, sample, sampling_diffusion_for

        names = list(MODELS)
        models = {n: load(ctx.out / "runs" / f"{n}_s{seed}") for n in names}
        diffusions = {n: sampling_diffusion_for(m, "ddim", ctx.s.ddim_steps) for n, m in models.items()}
        labels = np.arange(ctx.s.speed_batch) % 10
        times: dict[str, list] = {n: [] for n in names}
        for rnd in range(3):
            for n in (names if rnd % 2 == 0 else names[::-1]):
                t0 = time.time()
                sample(models[n], diffusions[n], labels, seed=seed, measure_flops=False, clip_denoised=True,
                       precision=SAMPLE_PRECISION)
                times[n].append(time.time() - t0)
        return {"batch": ctx.s.speed_batch, "ddim_steps": ctx.s.ddim_steps,
                "precision": resolve_precision(SAMPLE_PRECISION),
                "threads": torch.get_num_threads(), "round_seconds": {n: t for n, t in times.items()},
                "images_per_sec": {n: ctx.s.speed_batch / float(np.median(t)) for n, t in times.items()}}

    if any(run_step(ctx.out / "runs" / f"{n}_s{seed}") < ctx.s.steps for n in MODELS):
        log(f"speed: not every model of seed {seed} is trained yet: stage skipped")
        return {}
    return cached(ctx.out / f"speed_s{seed}.json", run)


def stage_elastic(ctx: Ctx, seed: int) -> dict:
    """The trained DC-DiT N=4 at each tail-drop fraction (f = 0 is the eval stage's first n_small samples)."""
    out, model = {}, None
    for f in ctx.s.elastic:
        def run(f=f):
            nonlocal model
            model = model or load(ctx.out / "runs" / f"dcdit_n4_s{seed}")
            return score(ctx, model, ctx.s.n_small, seed, f, f"dcdit_n4_s{seed}_f{f:g}")

        out[f"{f:g}"] = cached(ctx.out / f"elastic_f{f:g}_s{seed}.json", run)
    return out


def train_gflops_from_sampling(e: dict) -> float:
    """Training FLOPs per image: 3x a forward at an average timestep, from an evaluation's sampling run
    (GFLOPs per step on real trajectories; learning_curve.train_gflops_per_image counts a forward on
    pure noise instead, which routes a trained DC-DiT differently)."""
    return 3.0 * e["gflops_per_image"] / e["ddim_steps"]


def stage_curve(ctx: Ctx, seed: int) -> dict:
    """FID@n_small of each model at 1/4, 1/2 and all of its run, against training GFLOPs per image seen."""
    s, out = ctx.s, {}
    for n in MODELS:
        final = read_json(ctx.out / f"eval_{n}_s{seed}.json")
        if final is None:
            continue
        pts = []
        for step in sorted({max(1, s.steps // 4), max(1, s.steps // 2)}):
            def run(n=n, step=step):
                model = load(ctx.out / "runs" / f"{n}_s{seed}", f"ckpt-{step:07d}")
                return score(ctx, model, s.n_small, seed, 0.0, f"{n}_step{step}_s{seed}")

            # DC-DiT's early checkpoints are the upcycling comparison's scratch points
            path = ctx.out / (f"upcycle_scratch_step{step}_s{seed}.json" if n == "dcdit_n4" and
                              step in checkpoint_steps(s) else f"curve_{n}_step{step}_s{seed}.json")
            r = cached(path, run)
            pts.append({"steps": step, "fid": r["fid"], "class_acc": r["class_acc"]})
        pts.append({"steps": s.steps, "fid": small(final, s.n_small), "class_acc": final["class_acc"]})
        g = train_gflops_from_sampling(final)
        for p in pts:
            p["train_gflops"] = p["steps"] * s.batch * g
        out[n] = {"train_gflops_per_image": g, "points": pts}
    write_json(ctx.out / f"curve_s{seed}.json", out)
    return out


def stage_upcycle(ctx: Ctx, seed: int) -> dict:
    """DC-DiT N=4 started from the trained DiT/4 vs the same model from scratch (its main run's checkpoints)."""
    s = ctx.s
    steps = upcycle_steps(s)
    init_dir = ctx.out / "runs" / f"dcdit_n4_upcycled_init_s{seed}"
    run_dir = ctx.out / "runs" / f"dcdit_n4_upcycled_s{seed}"

    def make_init():
        from dcdit.checkpoint import save_model_dir
        from dcdit.data import DataConfig
        from dcdit.training.upcycle import upcycle

        # The library's one upcycling path (as `dcdit upcycle --data-source mnist`): blocks and t/y
        # embedders copied, the DiT's prediction carried over, the router calibrated on noised MNIST
        # training images to keep 1/N of the tokens at init. (Runs cached before issue 29 were
        # upcycled without the calibration: their router started at ~0.8 % kept.)
        model, summary = upcycle(ctx.out / "runs" / f"dit4_s{seed}", model_section(s, "dcdit_n4")["preset"],
                                 dcdit_overrides(s), data=DataConfig(source="mnist", split="train", image_size=32),
                                 seed=seed)
        save_model_dir(init_dir, model, model)
        return {k: v for k, v in summary.items() if k != "dit"}

    info = cached(ctx.out / f"upcycle_init_s{seed}.json", make_init)

    def train_up():
        d = train_dict(s, "dcdit_n4_upcycled", seed, steps=steps)
        d["model"] = {"arch": "dcdit", "init_from": str(init_dir), "init_which": "ema"}
        return train_run(d, run_dir, steps)

    tr = cached(ctx.out / f"train_dcdit_n4_upcycled_s{seed}.json", train_up)
    points = []
    for init, rdir in (("scratch", ctx.out / "runs" / f"dcdit_n4_s{seed}"), ("upcycled", run_dir)):
        for step in checkpoint_steps(s):
            def run(rdir=rdir, step=step, init=init):
                model = load(rdir, f"ckpt-{step:07d}")
                return score(ctx, model, s.n_small, seed, 0.0, f"dcdit_n4_{init}_step{step}_s{seed}")

            r = cached(ctx.out / f"upcycle_{init}_step{step}_s{seed}.json", run)
            points.append({"init": init, "steps": step, **{k: r[k] for k in ("fid", "class_acc", "n")}})
    final = read_json(ctx.out / f"eval_dcdit_n4_s{seed}.json")
    if final is not None and small(final, s.n_small) is not None:
        points.append({"init": "scratch", "steps": s.steps, "fid": small(final, s.n_small),
                       "class_acc": final["class_acc"], "n": s.n_small})
    return {"source": "dit4", "target": "dcdit_n4", "init": info, "train": tr, "points": points}


# --------------------------------------------------------------------------- report


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{nd}f}"


def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def ms(vals, nd=2):
    m, sd = mean_sd(vals)
    return fmt(m, nd) + (f" ± {sd:.{nd}f}" if sd is not None else "")


def small(e: dict, n: int):
    """FID of the first n samples of an evaluation (None if not recorded)."""
    return (e.get("fid_at") or {}).get(str(n), e.get("fid_small"))


def scaffold_share(e: dict) -> float | None:
    """Share of a DC-DiT's sampling FLOPs outside its main network (stem, encoder, router, dechunk, decoder)."""
    comp = e.get("gflops_by_component") or {}
    total = sum(comp.values())
    return 1.0 - comp["main network"] / total if "main network" in comp and total else None


def claims(R: dict, s: Settings, seeds: list[int]) -> list[dict]:
    """Issue 14's goals, each measured per seed: {claim, per_seed values, mean, held}."""
    def per_seed(fn):
        vals = []
        for i in range(len(seeds)):
            try:
                vals.append(fn(i))
            except (KeyError, TypeError, IndexError, ZeroDivisionError, StopIteration):
                vals.append(None)
        return vals

    ev = lambda n, i: R["eval"][n][i]
    ips = lambda n, i: R["speed"][i]["images_per_sec"][n]
    rows = []

    def add(name, goal, fn, test):
        vals = per_seed(fn)
        got = [v for v in vals if v is not None]
        m = float(np.mean(got, axis=0)) if got and not isinstance(got[0], (list, tuple)) else None
        rows.append({"claim": name, "goal": goal, "per_seed": vals, "mean": m,
                     "held": (all(test(v) for v in got) if got else None)})

    add("DC-DiT N=4 FID / DiT/2 FID", "<= 0.8", lambda i: ev("dcdit_n4", i)["fid"] / ev("dit2", i)["fid"],
        lambda v: v <= 0.8)
    add("DC-DiT N=4 sampling GFLOPs / DiT/2's", "<= 0.6",
        lambda i: ev("dcdit_n4", i)["gflops_per_image"] / ev("dit2", i)["gflops_per_image"], lambda v: v <= 0.6)
    add("DC-DiT N=4 sampling time / DiT/2's", "<= 0.6", lambda i: ips("dit2", i) / ips("dcdit_n4", i),
        lambda v: v <= 0.6)
    add(f"FID@{s.n_small} at tail drop 0.2 / at 0", "<= 1.1",
        lambda i: R["elastic"]["0.2"][i]["fid"] / small(ev("dcdit_n4", i), s.n_small), lambda v: v <= 1.1)
    add("kept share at the noisiest step / at the cleanest", "<= 0.6",
        lambda i: ev("dcdit_n4", i)["kept_share_noisiest"] / ev("dcdit_n4", i)["kept_share_cleanest"],
        lambda v: v <= 0.6)
    add("segmentation ROC-AUC, shapes, t <= 250", ">= 0.85", lambda i: R["shapes"][i]["auc_late_mean"],
        lambda v: v >= 0.85)

    def upcycle_steps_to_scratch(i):
        pts = R["upcycle"][i]["points"]
        final = next(p["fid"] for p in pts if p["init"] == "scratch" and p["steps"] == s.steps)
        reach = [p["steps"] for p in sorted(pts, key=lambda p: p["steps"]) if p["init"] == "upcycled" and p["fid"] <= final]
        return reach[0] / s.steps if reach else float("inf")

    add(f"upcycled: steps to scratch's final FID@{s.n_small} / scratch's steps", "<= 0.25",
        upcycle_steps_to_scratch, lambda v: v <= 0.25)
    return rows


def section_models(R: dict, s: Settings) -> list[str]:
    tokens = {"dit2": "256", "dit4": "64", "dcdit_n4": "~64 of 256 (N = 4)"}
    t0 = R["train"]["dit4"][0]
    L = [f"MNIST 32x32, {s.steps} steps x batch {s.batch} (bf16) per model, seed(s) {R['seeds']}; main network "
         f"{s.depth} DiT blocks at width {s.hidden}; DDIM {s.ddim_steps} steps, no guidance; FID: {s.extractor} "
         f"features, {s.n_fid} samples vs {s.n_ref} MNIST test images (FID@{s.n_small}: the first {s.n_small} of "
         f"the same samples); GFLOPs = 2 x MACs per image over the whole sampling run; training minutes: "
         f"each run's steps at the median of its logged rates ({t0['threads'] if t0 else '?'} threads; the "
         "plain sum of its logged intervals, pauses included, is train_seconds in results.json).\n",
         f"| model | main-net tokens | params (M) | train min | FID@{s.n_fid} | FID@{s.n_small} | class acc | "
         "GFLOPs/img | scaffold share | img/s | kept share noisiest → cleanest |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in MODELS:
        ev = [e for e in R["eval"][n] if e]
        if not ev:
            L.append(f"| {LABEL[n]} | {tokens[n]} | not run | | | | | | | | |")
            continue
        sp = [x["images_per_sec"][n] for x in R["speed"] if x]
        tm = [m for m in map(train_minutes, R["train"][n]) if m]
        kept = (f"{ms([e.get('kept_share_noisiest') for e in ev], 3)} → {ms([e.get('kept_share_cleanest') for e in ev], 3)}"
                f" (t={ev[0]['t_noisiest']} → {ev[0]['t_cleanest']})" if ev[0].get("kept_share_noisiest") is not None
                else "1 (fixed)")
        sc = [scaffold_share(e) for e in ev] if n.startswith("dcdit") else [None]
        L.append(f"| {LABEL[n]} | {tokens[n]} | {ev[0]['params_m']:.2f} | {ms(tm, 1) if tm else '-'} | "
                 f"{ms([e['fid'] for e in ev], 1)} | {ms([small(e, s.n_small) for e in ev], 1)} | "
                 f"{ms([e['class_acc'] for e in ev], 3)} | {ms([e['gflops_per_image'] for e in ev], 2)} | "
                 f"{ms(sc, 3) if sc[0] is not None else '-'} | {ms(sp, 1) if sp else '-'} | {kept} |")
    L.append("")
    if R["classifier"]:
        L.append(f"Classifier (SmallCNN, {R['classifier']['steps']} steps x 128 on MNIST train): "
                 f"test accuracy {R['classifier']['test_accuracy']:.4f}.\n")
    return L


def section_elastic(R: dict, s: Settings) -> tuple[list[str], list[dict]]:
    """The tail-drop table, and the FID-vs-GFLOPs records of it and of the other models."""
    ev4 = [e for e in R["eval"]["dcdit_n4"] if e]
    L = [f"Elastic inference, one DC-DiT N=4 checkpoint (multi-budget from step {int(s.steps * s.multibudget_start)}), "
         f"the same {s.n_small} labels and noise per point:\n",
         f"| tail-drop f | FID@{s.n_small} | class acc | GFLOPs/img | kept share (mean over steps) |",
         "|---|---:|---:|---:|---:|"]
    records = []
    rows = ([(0.0, [dict(e, fid=small(e, s.n_small)) for e in ev4])] if ev4 else []) + \
        [(f, [e for e in R["elastic"][f"{f:g}"] if e]) for f in s.elastic]
    for f, el in rows:
        if not el:
            L.append(f"| {f:g} | not run | | | |")
            continue
        L.append(f"| {f:g} | {ms([e['fid'] for e in el], 1)} | {ms([e['class_acc'] for e in el], 3)} | "
                 f"{ms([e['gflops_per_image'] for e in el])} | {ms([e.get('kept_share_mean') for e in el], 3)} |")
        records.append({"model": "DC-DiT N=4, tail drop f", "gflops": np.mean([e["gflops_per_image"] for e in el]),
                        "fid": np.mean([e["fid"] for e in el]), "tail_drop": f})
    for n in MODELS:
        ev = [e for e in R["eval"][n] if e]
        if ev and n != "dcdit_n4":
            records.append({"model": LABEL[n], "gflops": np.mean([e["gflops_per_image"] for e in ev]),
                            "fid": np.mean([small(e, s.n_small) for e in ev]), "tail_drop": None})
    return L + [""], records


def same_point(up: list[dict], p: dict) -> list[dict]:
    """The upcycling point ``p`` (same init, same steps) of every seed run."""
    return [q for u in up for q in u["points"] if (q["init"], q["steps"]) == (p["init"], p["steps"])]


def section_upcycle(R: dict, s: Settings) -> list[str]:
    up = [x for x in R["upcycle"] if x]
    if not up:
        return []
    L = [f"Upcycling: DC-DiT N=4 from the trained DiT/4 (its {s.depth} blocks and t/y embedders copied; both "
         f"main networks see ~64 tokens) vs from scratch, same config and data order; FID@{s.n_small} "
         "against training steps:\n",
         f"| init | steps | FID@{s.n_small} | class acc |", "|---|---:|---:|---:|"]
    for p in sorted(up[0]["points"], key=lambda p: (p["init"], p["steps"])):
        same = same_point(up, p)
        L.append(f"| {p['init']} | {p['steps']} | {ms([q['fid'] for q in same], 1)} | "
                 f"{ms([q['class_acc'] for q in same], 3)} |")
    return L + [""]


def section_curve(R: dict, s: Settings) -> list[str]:
    cv = [c for c in R["curve"] if c]
    if not cv:
        return []
    steps = [p["steps"] for p in next(iter(cv[0].values()))["points"]]
    L = [f"Quality against training compute (FID@{s.n_small} of each model's EMA at 1/4, 1/2 and all of "
         "its run; training FLOPs = 3 x the forward FLOPs per image at the model's own routing x images):\n",
         "| model | train GFLOPs/img | " + " | ".join(f"step {k}" for k in steps) + " |",
         "|---|---:|" + "---:|" * len(steps)]
    for n in cv[0]:
        pts = cv[0][n]["points"]
        cells = [f"{ms([c[n]['points'][i]['fid'] for c in cv if n in c], 1)} ({pts[i]['train_gflops'] / 1e3:.0f} TF)"
                 for i in range(len(pts))]
        L.append(f"| {LABEL[n]} | {cv[0][n]['train_gflops_per_image']:.2f} | " + " | ".join(cells) + " |")
    return L + [""]


def section_shapes(R: dict, s: Settings) -> list[str]:
    sh = [x for x in R["shapes"] if x]
    if not sh:
        return []
    per_t = sh[0]["per_t"]
    L = [f"Emergent segmentation (shapes, the shapes_dcdit_cpu.yaml DC-DiT, {s.shapes_steps} steps x batch "
         f"{s.batch}; {s.shapes_images} held-out images): ROC-AUC of the router's boundary probability vs "
         "the ground-truth detail map (0.5 = chance), and the kept share, per noising timestep t:\n",
         "| t | " + " | ".join(str(r["t"]) for r in per_t) + " |", "|---|" + "---:|" * len(per_t)]
    for key, label in (("auc", "ROC-AUC"), ("kept_share", "kept share"), ("detail_share", "detail share")):
        L.append(f"| {label} | " + " | ".join(ms([x["per_t"][i][key] for x in sh], 3) for i in range(len(per_t))) + " |")
    ab = {v: [x for x in R["shapes_ablation"][v] if x] for v in SHAPES_VARIANTS}
    if any(ab.values()):
        L += ["", "The same shapes DC-DiT with one change (ROC-AUC per t; `--only shapes-ablation`):\n",
              "| change | " + " | ".join(str(r["t"]) for r in per_t) + " |", "|---|" + "---:|" * len(per_t)]
        for v, runs in ab.items():
            if runs:
                L.append(f"| {SHAPES_VARIANTS[v][0]} | " +
                         " | ".join(ms([x["per_t"][i]["auc"] for x in runs], 3) for i in range(len(per_t))) + " |")
    return L + [""]


def section_claims(R: dict) -> list[str]:
    L = ["The paper's claims at this scale (each measured per seed; held = held for every seed measured):\n",
         "| claim | goal | per seed | mean ± sd | held |", "|---|---|---|---|---|"]
    for c in R["claims"]:
        vals = ", ".join("-" if v is None else f"{v:.3g}" for v in c["per_seed"])
        got = [v for v in c["per_seed"] if v is not None]
        spread = "inf" if any(math.isinf(v) for v in got) else ms(got, 3)
        L.append(f"| {c['claim']} | {c['goal']} | {vals} | {spread} | "
                 f"{'not measured' if c['held'] is None else ('yes' if c['held'] else 'no')} |")
    return L


def report_plots(R: dict, s: Settings, out: Path, records: list[dict]) -> dict:
    from dcdit.viz.plots import plot_cost_over_time, plot_quality_vs_compute

    plots = {}
    if records:
        plots["fid_vs_gflops"] = str(plot_quality_vs_compute(
            records, out / "fid_vs_gflops.png", ylabel=f"FID@{s.n_small} ({s.extractor})",
            title=f"MNIST: FID@{s.n_small} vs sampling GFLOPs/image (DDIM {s.ddim_steps}); f = tail drop").path)
    up = [x for x in R["upcycle"] if x]
    if up:
        recs = [{"init": p["init"], "steps": p["steps"], "fid": float(np.mean([q["fid"] for q in same_point(up, p)]))}
                for p in up[0]["points"]]
        plots["upcycling"] = str(plot_quality_vs_compute(
            recs, out / "upcycling.png", x="steps", group="init", annotate=None, xlabel="training steps",
            ylabel=f"FID@{s.n_small}", title="DC-DiT N=4 on MNIST: upcycled from DiT/4 vs from scratch").path)
    cv = [c for c in R["curve"] if c]
    if cv:
        recs = [{"model": LABEL[n], "train_gflops": p["train_gflops"] / 1e3, "fid": float(np.mean(
                    [q["fid"] for c in cv if n in c for q in c[n]["points"] if q["steps"] == p["steps"]]))}
                for n in cv[0] for p in cv[0][n]["points"]]
        plots["fid_vs_train_flops"] = str(plot_quality_vs_compute(
            recs, out / "fid_vs_train_flops.png", x="train_gflops", annotate=None,
            xlabel="training TFLOPs (3 x forward, per image seen, x images)", ylabel=f"FID@{s.n_small}",
            title=f"MNIST: FID@{s.n_small} against training compute ({s.batch} images per step)").path)
    p = out / f"cost_dcdit_n4_s{R['seeds'][0]}.npz"
    if p.is_file():
        z = np.load(p)
        plots["cost_dcdit_n4"] = str(plot_cost_over_time(
            z["timesteps"], out / "cost_over_time_dcdit_n4.png", kept_share=z["kept_share"],
            flops=z["flops"] if z["flops"].size else None, title="DC-DiT N=4 on MNIST: cost per sampling step").path)
    return plots


def stage_report(ctx: Ctx, seeds: list[int], meta: dict) -> dict:
    """Everything cached in ``ctx.out`` for ``seeds`` -> results.json, table.md and the plots."""
    s, out = ctx.s, ctx.out
    R = {"settings": asdict(s), "seeds": seeds, "meta": meta}
    R["classifier"] = read_json(out / "classifier.json")
    R["reference"] = read_json(out / "reference.json")
    R["train"] = {n: [read_json(out / f"train_{n}_s{sd}.json") for sd in seeds] for n in MODELS}
    R["eval"] = {n: [read_json(out / f"eval_{n}_s{sd}.json") for sd in seeds] for n in MODELS}
    R["speed"] = [read_json(out / f"speed_s{sd}.json") for sd in seeds]
    R["elastic"] = {f"{f:g}": [read_json(out / f"elastic_f{f:g}_s{sd}.json") for sd in seeds]
                    for f in s.elastic}
    R["shapes"] = [read_json(out / f"shapes_s{sd}.json") for sd in seeds]
    R["shapes_ablation"] = {v: [read_json(out / f"shapes_{v}_s{sd}.json") for sd in seeds] for v in SHAPES_VARIANTS}
    R["upcycle"] = [read_json(out / f"upcycle_result_s{sd}.json") for sd in seeds]
    R["curve"] = [read_json(out / f"curve_s{sd}.json") for sd in seeds]
    R["claims"] = claims(R, s, seeds)
    R["total_stage_seconds"] = round(sum(float((read_json(p) or {}).get("seconds", 0.0) or 0.0)
                                         for p in out.glob("*.json") if p.name != "results.json"), 1)
    elastic, records = section_elastic(R, s)
    L = (section_models(R, s) + elastic + section_upcycle(R, s) + section_curve(R, s) + section_shapes(R, s)
         + section_claims(R))
    R["table_md"] = "\n".join(L)
    (out / "table.md").write_text(R["table_md"] + "\n")
    R["plots"] = report_plots(R, s, out, records)
    write_json(out / "results.json", R)
    return R


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
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
    ap.add_argument("--variants", default=",".join(SHAPES_VARIANTS),
                    help=f"with --only shapes-ablation: which of {', '.join(SHAPES_VARIANTS)}")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    ctx = Ctx(out, s, args.smoke)
    t0 = time.time()
    want = (lambda st: args.only is None or args.only == st)

    if want("classifier"):
        stage_classifier(ctx, 0)
    if want("reference"):
        stage_reference(ctx)
    models = [n for n in MODELS if n in args.models.split(",")]
    for seed in seeds:
        # what later stages need comes first: DiT/4 and DC-DiT (upcycling, elastic), then DiT/2, then speed
        for n in [m for m in models if m != "dit2"]:
            if want("train"):
                stage_train(ctx, n, seed)
            if want("eval"):
                stage_eval(ctx, n, seed)
        if want("upcycle") and {"dit4", "dcdit_n4"} <= set(models):
            write_json(out / f"upcycle_result_s{seed}.json", stage_upcycle(ctx, seed))
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
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "this_invocation_seconds": round(time.time() - t0, 1)}
    R = stage_report(ctx, seeds, meta)
    print(R["table_md"])
    print(f"\nresults: {out / 'results.json'}; table: {out / 'table.md'}; plots: {', '.join(R['plots'].values())}")
    print(f"sum of stage wall times (s): {R['total_stage_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
