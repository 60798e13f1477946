"""The reproduction's files (stage JSONs cached in its output directory), data and training runs."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.checkpoint import load_model
from dcdit.data import DataConfig, build_dataset
from dcdit.data.transforms import to_uint8_images
from dcdit.training import config_from_dict, train
from dcdit.training.rundir import training_seconds
from dcdit.training.state import find_checkpoint

from .settings import Settings


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
    """MNIST 32x32, split ``split`` (the reproduction's data)."""
    return dataset(Settings(), split)


def dataset(s: Settings, split: str):
    """The run's data (``s.source`` at ``s.image_size``), split ``split``."""
    return build_dataset(DataConfig(source=s.source, split=split, image_size=s.image_size))


def dataset_uint8(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of ``ds`` as uint8 NHWC, and their labels."""
    n = min(n, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    return to_uint8_images(x), np.asarray(ds.labels[:n])


def run_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0: none yet)."""
    ck = find_checkpoint(run_dir) if run_dir.exists() else None
    return int(ck.name.split("-")[1]) if ck is not None else 0


def train_run(d: dict, run_dir: Path, steps: int) -> dict:
    """Train config ``d`` into ``run_dir`` to ``steps`` (resuming it), and summarise the run from its log."""
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
    if not t:
        return None
    secs = t.get("train_seconds_at_median_rate") or training_seconds(t["run_dir"], upto=t["steps"], at_median_rate=True)
    return secs / 60 if secs else None


def load(run: Path, ckpt: str | None = None):
    """The EMA weights of a run (its latest checkpoint, or ``ckpt``), in eval mode."""
    return load_model(run / ckpt if ckpt else run, which="ema").eval()

