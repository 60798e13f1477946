#!/usr/bin/env python
"""Upcycling as a user runs it: fine-tune an upcycled DC-DiT vs the same DC-DiT from scratch (issue 29).

Every step goes through the command line, exactly as the README shows it:

    dcdit upcycle --dit pretrained:mnist-dit4 --preset DC-DiT-MNIST-N4 --data-source mnist --out OUT/upcycled
    dcdit train --config OUT/config.yaml --set model.init_from=OUT/upcycled --out OUT/upcycled_run
    dcdit train --config OUT/config.yaml --out OUT/scratch_run            # same config, same seed
    dcdit sample --ckpt OUT/<run> --num-samples 500 --steps 25 --npz ...   # then class accuracy

and reports each model's sample class accuracy (an independent in-domain
classifier, ``dcdit train-classifier --source mnist``; trained here when
``--classifier`` does not exist) and the kept token share at init and after
training. Both runs use one config (the reproduction's recipe: v-prediction,
Min-SNR-5, lr 1e-3, EMA 0.999 with warm-up, batch 64, bf16, ratio loss N = 4)
and one seed; they differ only in ``model.init_from``.

    python benchmarks/upcycle_finetune.py --out runs/upcycle_ft                  # 500 steps each (~2 x 5 min quiet)
    python benchmarks/upcycle_finetune.py --out /tmp/upcycle_ft_smoke --smoke    # 5 steps, tiny sampling (the test)

Re-running skips what is done (the runs, the classifier, the scores in OUT/results.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml


def config(steps: int, batch: int, seed: int) -> dict:
    """The one training config of both runs (the reproduction's recipe; model.init_from is set per run)."""
    return {
        "name": "upcycle_finetune",
        "model": {"arch": "dcdit", "preset": "DC-DiT-MNIST-N4", "label_init_std": 1.0},
        "data": {"source": "mnist", "split": "train", "image_size": 32},
        "diffusion": {"min_snr_gamma": 5.0, "prediction": "v"},
        "optim": {"lr": 1e-3, "warmup_steps": min(200, max(1, steps // 5))},
        "train": {"steps": steps, "global_batch_size": batch, "seed": seed, "ema_decay": 0.999, "ema_warmup": True,
                  "precision": "bf16", "device": "cpu", "log_interval": max(1, min(50, steps)),
                  "ckpt_interval": steps, "keep_last_k": 1, "progress": False, "tensorboard": False},
        "ratio": {"weight": 0.03, "target_N": 4.0, "group_size": min(16, batch)},
        "samples": {"interval": 0},
    }


def cli(argv: list[str]) -> None:
    from dcdit.cli import main

    print("$ dcdit " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"dcdit {argv[0]} failed with exit code {code}")


def score(ckpt: Path, out: Path, n: int, steps: int, classifier: Path) -> dict:
    """Class accuracy and mean kept share of ``n`` class-balanced DDIM samples (guidance 1, fixed seed)."""
    from dcdit.evaluation import classifier_accuracy

    npz, stats = out / "samples.npz", out / "sample_stats.json"
    if not npz.is_file():
        cli(["sample", "--ckpt", str(ckpt), "--num-samples", str(n), "--steps", str(steps), "--batch-size",
             str(min(n, 250)), "--seed", "1234", "--npz", str(npz), "--stats-json", str(stats), "--no-progress"])
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    st = json.loads(stats.read_text())["stats"]
    return {"class_acc": float(classifier_accuracy(classifier, images, labels)), "n": int(len(images)),
            "kept_share": st["mean_kept_share"][0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dit", default="pretrained:mnist-dit4")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--classifier", default="runs/mnist-classifier",
                    help="in-domain classifier dir (trained into OUT/classifier when missing)")
    ap.add_argument("--smoke", action="store_true", help="5 steps, batch 8, 10 samples of 2 steps")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.batch, a.num_samples, a.sample_steps = 5, 8, 10, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    clf = Path(a.classifier)
    if not (clf / "classifier.json").is_file():  # what save_classifier / dcdit train-classifier write
        clf = out / "classifier"
        if not (clf / "classifier.json").is_file():
            cli(["train-classifier", "--source", "mnist", "--steps", "10" if a.smoke else "600", "--out", str(clf)])

    up = out / "upcycled"
    if not (up / "upcycle.json").is_file():
        cli(["upcycle", "--dit", a.dit, "--preset", "DC-DiT-MNIST-N4", "--data-source", "mnist", "--out", str(up)])
    init = json.loads((up / "upcycle.json").read_text())

    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(a.steps, a.batch, a.seed), sort_keys=False))
    results: dict = {"dit": a.dit, "steps": a.steps, "batch": a.batch, "seed": a.seed,
                     "init_kept_share": init["router"]["kept_share"], "runs": {}}
    for name, extra in (("upcycled", ["--set", f"model.init_from={up}"]), ("scratch", [])):
        run = out / f"{name}_run"
        if not (run / "latest").exists():
            cli(["train", "--config", str(cfg_path), *extra, "--out", str(run)])
        results["runs"][name] = score(run, run, a.num_samples, a.sample_steps, clf)
    # the upcycled model before any training, for scale
    results["runs"]["upcycled_init"] = score(up, up, a.num_samples, a.sample_steps, clf)
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))

    r = results["runs"]
    print(f"\nafter {a.steps} steps x {a.batch} images, seed {a.seed}, {a.num_samples} samples DDIM-{a.sample_steps}:")
    for name in ("upcycled_init", "upcycled", "scratch"):
        print(f"  {name:<14} class accuracy {r[name]['class_acc']:.3f}, kept share {r[name]['kept_share']:.3f}")
    held = r["upcycled"]["class_acc"] >= r["scratch"]["class_acc"]
    print(f"upcycled >= scratch: {'yes' if held else 'no'} (router at init kept {results['init_kept_share']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
