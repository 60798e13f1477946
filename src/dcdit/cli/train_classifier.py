"""``dcdit train-classifier``: train the in-domain CNN used for small-data FID and accuracy."""
from __future__ import annotations

import argparse

from dcdit.cli.options import add_device, add_seed

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Train the small in-domain classifier (features for in-domain FID, class accuracy)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="shapes", choices=["shapes", "mnist", "canvas", "npz", "folder"],
                   help="data source (default: shapes)")
    p.add_argument("--data-path", default=None, help="file or folder for the npz / folder / mnist / canvas sources")
    p.add_argument("--image-size", type=int, default=None, help="image size (default: the source's, 32 for shapes/mnist, 64 for canvas)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="image channels (default: the source's)")
    p.add_argument("--num-samples", type=int, default=None, help="training images (default: the source's)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default: 2e-3)")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage (default: 32)")
    p.add_argument("--feature-dim", type=int, default=256, help="penultimate feature size (default: 256)")
    p.add_argument("--pool", default=None, choices=["mean", "max"],
                   help="global pooling of the last feature map (default: max for canvas, else mean)")
    add_seed(p, "random seed")
    add_device(p)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--out", default=None, help="output directory (default: runs/classifier-<source>)")


def build_data(source: str, path=None, image_size=None, channels=None, num_samples=None,
               seed: int = 0, split: str | None = None):
    """A ``dcdit.data`` Dataset (x float CHW in [-1, 1], y int); None keeps the source's default."""
    import dataclasses

    try:
        from dcdit.data import DataConfig, build_dataset
    except ImportError as e:
        raise ValueError(f"the dcdit.data package is not available ({e})") from None
    want = {"source": source, "path": path, "image_size": image_size, "channels": channels,
            "num_samples": num_samples, "seed": seed, "split": split}
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    missing = [k for k, v in want.items() if v is not None and k not in fields]
    if missing:
        raise ValueError(f"dcdit.data.DataConfig has no field(s) {', '.join(missing)}")
    return build_dataset(DataConfig(**{k: v for k, v in want.items() if v is not None}))


class _Part:
    """Items ``indices`` of a dataset, keeping its channels / image_size / num_classes."""

    def __init__(self, base, indices):
        self.base, self.indices = base, [int(i) for i in indices]
        self.channels = base.channels
        self.image_size = base.image_size
        self.num_classes = base.num_classes
        self.classifier_pool = getattr(base, "classifier_pool", "mean")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def train_and_heldout(args):
    """(training set, held-out set or None, description of the held-out set).

    mnist, canvas: the test split; shapes: 2000 images drawn with another seed;
    npz/folder: a seeded 5% of the data (at most 2000 items) kept out of training.
    """
    import numpy as np

    common = dict(path=args.data_path, image_size=args.image_size, channels=args.channels)
    if args.source in ("mnist", "canvas"):
        train = build_data(args.source, num_samples=args.num_samples, seed=args.seed, split="train", **common)
        return train, build_data(args.source, split="test", seed=args.seed, **common), f"{args.source} test split"
    if args.source == "shapes":
        train = build_data("shapes", num_samples=args.num_samples, seed=args.seed, **common)
        held = build_data("shapes", num_samples=2000, seed=args.seed + 1, **common)
        return train, held, f"2000 shapes drawn with seed {args.seed + 1}"
    full = build_data(args.source, num_samples=args.num_samples, seed=args.seed, **common)
    n_held = min(2000, len(full) // 20)
    if n_held == 0:
        return full, None, "none (fewer than 20 items)"
    perm = np.random.default_rng(args.seed).permutation(len(full))
    return _Part(full, perm[n_held:]), _Part(full, perm[:n_held]), f"a seeded 5% of the data ({n_held} items)"


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    from dcdit.cli.options import resolve_device
    from dcdit.evaluation.classifier import dataset_accuracy, save_classifier, train_classifier

    if args.source in ("npz", "folder") and not args.data_path:
        raise ValueError(f"--source {args.source} needs --data-path")
    if args.data_path and not Path(args.data_path).exists():
        raise FileNotFoundError(f"{args.data_path}: no such file or directory")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    train, held, held_desc = train_and_heldout(args)
    log(f"data: {args.source}, {len(train)} training images, held out: {held_desc}")
    t0 = time.time()
    model = train_classifier(
        train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
        feature_dim=args.feature_dim, pool=args.pool, device=resolve_device(args.device), seed=args.seed, num_workers=args.workers,
        log_every=max(1, min(100, args.steps // 10)), log=log,
    )
    meta = {"source": args.source, "data_path": args.data_path, "steps": args.steps, "seed": args.seed,
            "train_seconds": round(time.time() - t0, 1), "heldout": held_desc}
    meta["train_accuracy"] = round(dataset_accuracy(model, train, limit=5000), 4)
    if held is not None and len(held):
        meta["heldout_accuracy"] = round(dataset_accuracy(model, held, limit=5000), 4)
    out = Path(args.out or f"runs/classifier-{args.source}")
    save_classifier(model, out, extra=meta)
    acc = f"train accuracy {meta['train_accuracy']:.4f}"
    if "heldout_accuracy" in meta:
        acc += f", held-out accuracy {meta['heldout_accuracy']:.4f}"
    print(f"{acc}; saved {out}/ (use with: dcdit evaluate --feature classifier:{out})")
    return 0
