"""Feature statistics files and their on-disk cache.

A statistics file is an ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D) --
the format of pytorch-fid / ADM reference batches -- plus, when written here,
``extractor`` (name of the feature network), ``source`` (content hash of the
images), ``n`` and optionally ``features`` (N, D) float32 and ``probs``
(N, K) float32 so precision/recall, KID and IS can reuse them.

The cache (``$DCDIT_CACHE`` or ``~/.cache/dcdit/stats``) keys each file by a
SHA-1 of the image content (see ``ImageSource.fingerprint``) and the
extractor name, so the same images scored with the same network are read
back instead of recomputed; any cached file is itself a valid statistics file
to pass as a reference.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcdit.evaluation.features import SPATIAL_CHANNELS
from dcdit.evaluation.io import ImageSource, npz_keys
from dcdit.evaluation.metrics import feature_statistics


@dataclass
class FeatureSet:
    """Features (optional) and their Gaussian statistics for one image set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str | None = None
    source: str | None = None
    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    path: Path | None = None  # the stats/cache file it came from, if any


def default_cache_dir() -> Path:
    return Path(os.environ.get("DCDIT_CACHE") or Path.home() / ".cache" / "dcdit" / "stats")


def save_stats(path, fs: FeatureSet, include_features: bool = True) -> Path:
    """Write a :class:`FeatureSet` as a statistics ``.npz`` (atomically)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: statistics files must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": fs.mu, "sigma": fs.sigma, "n": np.int64(fs.n)}
    if fs.extractor:
        arrays["extractor"] = np.str_(fs.extractor)
    if fs.source:
        arrays["source"] = np.str_(fs.source)
    if include_features and fs.features is not None:
        arrays["features"] = fs.features.astype(np.float32)
    if include_features and fs.probs is not None:
        arrays["probs"] = fs.probs.astype(np.float32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_stats_file(path) -> bool:
    """True for an ``.npz`` that holds ``mu`` and ``sigma``."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return False
    keys = npz_keys(p)
    return "mu" in keys and "sigma" in keys


def load_stats(path, spatial: bool = False) -> FeatureSet:
    """Read a statistics ``.npz`` (ours, pytorch-fid's or an ADM reference batch's).

    ``spatial``: the sFID statistics ``mu_s``/``sigma_s`` of the same file instead (ADM reference batches
    and ``dcdit reference --stats`` files carry both).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such statistics file")
    mu_key, sigma_key = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    with np.load(p) as f:
        if mu_key not in f.files or sigma_key not in f.files:
            raise ValueError(f"{p}: not a statistics file (needs '{mu_key}' and '{sigma_key}', has {', '.join(f.files)})")
        mu, sigma = np.asarray(f[mu_key], np.float64), np.asarray(f[sigma_key], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{p}: mu {mu.shape} and sigma {sigma.shape} do not match (D,) and (D, D)")
        feats = np.asarray(f["features"], np.float64) if "features" in f.files and not spatial else None
        probs = np.asarray(f["probs"], np.float64) if "probs" in f.files and not spatial else None
        n = int(f["n"]) if "n" in f.files else (feats.shape[0] if feats is not None else 0)
        extractor = str(f["extractor"]) if "extractor" in f.files else None
        if spatial and extractor is not None:
            extractor = f"{extractor}-mixed6conv{SPATIAL_CHANNELS}"
        source = str(f["source"]) if "source" in f.files else None
    return FeatureSet(mu, sigma, n, extractor, source, feats, probs, p)


def cache_path(source: ImageSource | str, extractor_name: str, cache_dir=None) -> Path:
    """Where the statistics of ``source`` (or its fingerprint) under ``extractor_name`` are cached."""
    fingerprint = source if isinstance(source, str) else source.fingerprint()
    key = hashlib.sha1((fingerprint + "\0" + extractor_name).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in extractor_name)
    return Path(cache_dir or default_cache_dir()) / f"{safe}-{key}.npz"


def compute_feature_set(source: ImageSource, extractor, want_probs: bool = False, cache_dir=None,
                        use_cache: bool = True, progress=None, on_extract=None) -> FeatureSet:
    """Features, probabilities and statistics of ``source``, via the cache if possible.

    ``on_extract()`` is called just before the feature network runs (not on a cache hit).
    """
    fingerprint = source.fingerprint() if use_cache else None
    path = cache_path(fingerprint, extractor.name, cache_dir) if use_cache else None
    if path is not None and path.is_file():
        try:
            fs = load_stats(path)
        except (ValueError, OSError):
            fs = None  # unreadable cache entry: recompute and overwrite
        if fs is not None and fs.features is not None and (fs.probs is not None or not want_probs):
            return fs
    if on_extract is not None:
        on_extract()
    feats, probs = extractor.extract_batches(
        source.iter_batches(extractor.batch_size), want_probs=want_probs and extractor.has_probs, progress=progress
    )
    mu, sigma = feature_statistics(feats)
    fs = FeatureSet(mu, sigma, feats.shape[0], extractor.name, fingerprint, feats, probs, path)
    if path is not None:
        save_stats(path, fs)
    return fs
