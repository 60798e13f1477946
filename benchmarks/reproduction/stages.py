"""The reproduction's stages: each computes one result and caches it as JSON in the output directory."""
from __future__ import annotations

import numpy as np

from dcdit.analysis import routing_vs_detail
from dcdit.checkpoint import save_model_dir
from dcdit.data import DataConfig, build_dataset
from dcdit.diffusion import create_diffusion
from dcdit.evaluation import dataset_accuracy, save_classifier, train_classifier
from dcdit.training.upcycle import upcycle

from .report import small
from .runs import cached, dataset, load, log, read_json, run_step, train_run, write_json
from .scoring import Ctx, sampling_speed, score
from .settings import MODELS, SHAPES_VARIANTS, checkpoint_steps, dcdit_overrides, model_section, shapes_dict, \
    train_dict, upcycle_steps


def stage_classifier(ctx: Ctx, seed: int) -> dict:
    def run():
        clf = train_classifier(dataset(ctx.s, "train"), steps=ctx.s.classifier_steps, batch_size=128, seed=seed,
                               log=log, log_every=100)
        acc = dataset_accuracy(clf, dataset(ctx.s, "test"))
        save_classifier(clf, ctx.clf_dir, extra={"test_accuracy": acc})
        return {"test_accuracy": acc, "steps": ctx.s.classifier_steps, "batch": 128, "path": str(ctx.clf_dir)}

    return cached(ctx.out / "classifier.json", run)


def stage_reference(ctx: Ctx) -> dict:
    def run():
        ref = ctx.scorer().reference
        return {"n": int(ref.n), "extractor": ref.extractor, "stats": str(ref.path)}

    return cached(ctx.out / "reference.json", run)


def stage_shapes(ctx: Ctx, seed: int, variant: str | None = None) -> dict:
    """A DC-DiT trained on shapes; ROC-AUC of its router's p against the detail map, per timestep t."""
    tag = f"shapes_{variant}" if variant else "shapes"

    def run():
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
    """Sampling images/s of every trained model of ``seed``, in this one process."""
    if any(run_step(ctx.out / "runs" / f"{n}_s{seed}") < ctx.s.steps for n in MODELS):
        log(f"speed: not every model of seed {seed} is trained yet: stage skipped")
        return {}
    return cached(ctx.out / f"speed_s{seed}.json",
                  lambda: sampling_speed({n: load(ctx.out / "runs" / f"{n}_s{seed}") for n in MODELS}, ctx.s, seed))


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


