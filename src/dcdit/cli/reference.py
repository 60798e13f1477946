"""``dcdit reference``: a data set as an ADM-format reference batch (3-channel uint8 npz), with Inception statistics."""
from __future__ import annotations

import argparse

from dcdit.cli.options import DEVICE_HELP, add_device, add_seed

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = ("Write a data set as an ADM-format reference .npz (arr_0 uint8 NHWC RGB, arr_1 labels), "
        "optionally with Inception statistics (mu/sigma, sFID mu_s/sigma_s).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dcdit.data.config import MNIST_SPLITS

    p.add_argument("--source", required=True, choices=("shapes", "mnist", "canvas", "folder", "npz"),
                   help="data source, as data.source in a training config")
    p.add_argument("--path", default=None, help="folder / .npz (mnist, canvas: optional mnist.pkl.gz)")
    p.add_argument("--split", default="test", choices=MNIST_SPLITS, help="mnist / canvas split (default: test)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the source's natural size)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images to write (default: all; shapes: 10000); a seeded random subset")
    add_seed(p, "seed of the subset / shapes generator / canvas placement")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="channels written (default: 3, which ADM's evaluator requires; gray is repeated)")
    p.add_argument("--out", required=True, metavar="NPZ", help="output .npz")
    p.add_argument("--stats", action="store_true",
                   help="also store Inception statistics: mu/sigma (FID) and mu_s/sigma_s (sFID), as ADM's "
                        "reference batches do, so `dcdit evaluate` need not recompute them")
    p.add_argument("--batch-size", type=int, default=50, help="--stats: images per Inception pass (default: 50)")
    add_device(p, "--stats: " + DEVICE_HELP)


def run(args) -> int:
    import sys
    from pathlib import Path

    import numpy as np
    from tqdm.auto import tqdm

    from dcdit.utils import atomic_write
    from dcdit.data import DataConfig, build_dataset, to_uint8_images
    from dcdit.data.transforms import convert_channels

    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    cfg = DataConfig(source=args.source, path=args.path, image_size=args.image_size, num_samples=args.num_samples,
                     seed=args.seed, split=args.split)
    ds = build_dataset(cfg)
    n = len(ds)
    images = np.empty((n, ds.image_size, ds.image_size, args.channels), dtype=np.uint8)
    for i in tqdm(range(n), desc="images", unit="img", file=sys.stderr, leave=False):
        x, _ = ds[i]
        images[i] = convert_channels(to_uint8_images(x)[0], args.channels)
    arrays = {"arr_0": images, "arr_1": np.asarray(ds.labels, dtype=np.int64)}
    if args.stats:
        from dcdit.cli.options import resolve_device
        from dcdit.evaluation import InceptionV3
        from dcdit.evaluation.features import InceptionSpatial
        from dcdit.evaluation.metrics import feature_statistics

        inception = InceptionV3(batch_size=args.batch_size, device=resolve_device(args.device))
        spatial = InceptionSpatial(inception)
        if n <= spatial.dim:
            print(f"warning: {n} images for 2048-d (FID) and 2023-d (sFID) features: the covariances have "
                  "deficient rank, so scores against these statistics are biased upward (use more images)",
                  file=sys.stderr)
        pools, spats = [], []
        for i in tqdm(range(0, n, args.batch_size), desc=f"{inception.name} (pool_3 + mixed_6/conv)",
                      unit="batch", file=sys.stderr, leave=False):
            pool, sp = spatial.pool_and_spatial(images[i:i + args.batch_size])
            pools.append(pool.double().cpu().numpy())
            spats.append(sp.double().cpu().numpy())
        arrays["mu"], arrays["sigma"] = feature_statistics(np.concatenate(pools))
        arrays["mu_s"], arrays["sigma_s"] = feature_statistics(np.concatenate(spats))
        arrays["extractor"] = np.str_(inception.name)
        arrays["n"] = np.int64(n)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    what = " with Inception statistics (mu, sigma, mu_s, sigma_s)" if args.stats else ""
    print(f"wrote {out}: {n} images {ds.image_size}x{ds.image_size}x{args.channels}, "
          f"{len(np.unique(arrays['arr_1']))} classes{what}")
    return 0
