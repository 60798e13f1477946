"""One call from sample/reference files to a dict of metrics (used by ``dcdit evaluate``).

Samples and reference may each be an ADM ``.npz`` (``arr_0`` images), an image
folder, a statistics ``.npz`` (``mu``/``sigma``, see :mod:`.stats`), a uint8
NHWC array or an :class:`~dcdit.evaluation.io.ImageSource`.

Metrics: ``fid``; ``sfid`` (FID on Inception's spatial mixed_6/conv
features, as ADM's evaluator; Inception only); ``is`` (samples only, needs an
extractor with class probabilities); ``pr`` (precision and recall, k = 3);
``kid``; ``acc`` (share of conditional samples the classifier assigns to
their own label; needs labels in the samples file).

Warnings (``warnings.warn``) flag sets smaller than the feature dimension
(rank-deficient covariance: FID biased upward); sample and reference images
of different size or channel count are an error (ValueError naming both).

As ADM's evaluator does, a reference ``.npz`` that holds both images and
``mu``/``sigma`` uses the stored statistics for FID (when they belong to the
same feature network: the file's ``extractor`` entry matches, or, for
files without one such as ADM's reference batches, the extractor is the
standard Inception) and its images for the other metrics.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from dcdit.evaluation import inception
from dcdit.evaluation.features import FeatureExtractor, InceptionSpatial, InceptionV3, build_extractor
from dcdit.evaluation.io import ArrayImages, ImageSource, npz_keys, open_images
from dcdit.evaluation.metrics import (
    class_accuracy,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    kid_subset_plan,
    precision_recall,
)
from dcdit.evaluation.stats import FeatureSet, compute_feature_set, load_stats

METRICS = ("fid", "sfid", "is", "pr", "kid", "acc")


def parse_metrics(spec) -> list[str]:
    """``"fid,is"`` or a list -> validated list of metric names, in order."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {', '.join(bad) or '(none)'}: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


class _Side:
    """One operand: images and/or stored statistics."""

    def __init__(self, obj, role: str, limit: int | None):
        self.role = role
        self.has_spatial = False
        self.images: ImageSource | None = None
        self.stored: FeatureSet | None = None
        if isinstance(obj, ImageSource):
            self.images = obj
        elif isinstance(obj, (str, Path)):
            p = Path(obj)
            if not p.exists():
                raise FileNotFoundError(f"{p}: {role} not found")
            keys = npz_keys(p) if p.is_file() else []
            self.has_spatial = "mu_s" in keys and "sigma_s" in keys
            if "mu" in keys and "sigma" in keys:
                self.stored = load_stats(p)
            if p.is_dir() or "arr_0" in keys or not self.stored:
                self.images = open_images(p, limit=limit)
        else:
            self.images = ArrayImages(obj, name=role)
        if limit is not None and self.stored is not None and self.images is None:
            raise ValueError(f"{role}: --limit cannot apply to a statistics file")

    @property
    def labels(self):
        return self.images.labels if self.images is not None else None

    def stored_matches(self, extractor: FeatureExtractor) -> bool:
        s = self.stored
        if s is None:
            return False
        if s.extractor is not None:
            return s.extractor == extractor.name
        return extractor.name == inception.NAME  # foreign files (ADM, pytorch-fid): Inception stats


def _shape(src: ImageSource) -> str:
    h, w = src.image_size
    return f"{h}x{w}, {src.channels} channel{'s' if src.channels != 1 else ''}"


GRAY_CHECK_IMAGES = 64  # images of a 3-channel set read to tell gray-repeated-to-RGB from colour


def is_gray_rgb(src: ImageSource, n: int = GRAY_CHECK_IMAGES) -> bool:
    """True when the first ``n`` images of a 3-channel set have R == G == B (gray repeated to RGB)."""
    if src.channels != 3:
        return False
    for batch in src.iter_batches(n):
        return bool((batch[..., 0] == batch[..., 1]).all() and (batch[..., 0] == batch[..., 2]).all())
    return True


def _check_same_kind(smp: _Side, ref: _Side) -> None:
    """Same image size and channels, where gray and gray repeated to RGB count as the same images.

    Every feature network sees gray images repeated to RGB (Inception) or RGB
    as gray (a 1-channel classifier), so a 1-channel set (``dcdit sample
    --npz`` of an MNIST model) and a 3-channel one whose channels are equal
    (``dcdit reference``'s ADM-format file) give the same features.
    """
    a, b = smp.images, ref.images
    if a is None or b is None:
        return
    if tuple(a.image_size) == tuple(b.image_size) and {a.channels, b.channels} == {1, 3}:
        rgb = a if a.channels == 3 else b
        if is_gray_rgb(rgb):
            return
        raise ValueError(f"samples {a.name} ({_shape(a)}) and reference {b.name} ({_shape(b)}) differ in "
                         f"channels and {rgb.name} is in colour (its first images are not gray repeated to RGB): "
                         "compare sets of the same kind")
    if tuple(a.image_size) != tuple(b.image_size) or a.channels != b.channels:
        raise ValueError(f"samples {a.name} ({_shape(a)}) and reference {b.name} ({_shape(b)}) differ in image "
                         "size or channels: compare sets of the same kind")


def check_comparable(samples, reference, limit: int | None = None) -> None:
    """Raise ValueError when two image sets differ in image size or channel count (cheap: headers only)."""
    if reference is not None:
        _check_same_kind(_Side(samples, "samples", limit), _Side(reference, "reference", None))


def evaluate(
    samples,
    reference=None,
    metrics=("fid",),
    extractor: FeatureExtractor | str = "inception",
    *,
    batch_size: int = 50,
    device="cpu",
    cache_dir=None,
    use_cache: bool = True,
    limit: int | None = None,
    is_splits: int = 10,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    use_reference_stats: bool = True,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    allow_mismatch: bool = False,
) -> dict:
    """Compute ``metrics`` for ``samples`` against ``reference``; returns a flat dict.

    ``progress``: a tqdm bar (stderr) per feature extraction. Sets of different image
    size or channel count are refused unless ``allow_mismatch`` (then a warning: the
    feature network resizes and gray images are repeated to RGB, which is rarely what
    a comparison means).

    Keys: ``fid``, ``sfid``, ``is``/``is_std``, ``precision``/``recall``, ``kid``/``kid_std``,
    ``acc`` for the requested metrics, plus ``feature``, ``n_samples``,
    ``n_reference`` and ``reference_stats`` (``stored`` or ``computed``).
    """
    metrics = parse_metrics(metrics)
    smp = _Side(samples, "samples", limit)
    ref = _Side(reference, "reference", None) if reference is not None else None
    if ref is not None:
        _check_sides_comparable(smp, ref, allow_mismatch)
    if isinstance(extractor, str):
        extractor = build_extractor(extractor, batch_size=batch_size, device=device)
    spatial = _check_request(metrics, smp, ref, extractor)
    _warn_about_sets(smp, ref, metrics, extractor)
    features = _FeatureReader(spatial, cache_dir, use_cache, log or (lambda s: None), progress)

    result: dict = {"feature": extractor.name}
    s_fs = features(smp, extractor, any(m in ("is", "acc") for m in metrics))
    result["n_samples"] = int(s_fs.n)
    r_fs = None
    use_stored = (ref is not None and use_reference_stats and ref.stored is not None and ref.stored_matches(extractor))
    if ref is not None and (not use_stored or any(m in metrics for m in ("pr", "kid"))):
        r_fs = features(ref, extractor, False)
    if ref is not None:
        result["n_reference"] = int((r_fs or ref.stored).n)
        result["reference_stats"] = "stored" if use_stored else "computed"

    for m in metrics:
        if m == "fid":
            result["fid"] = _fid(s_fs, ref.stored if use_stored else r_fs)
        elif m == "sfid":
            s_sp = features(smp, spatial, False)
            use_stored_s = ref.images is None or (use_reference_stats and ref.has_spatial
                                                  and ref.stored_matches(extractor))
            r_sp = load_stats(ref.stored.path, spatial=True) if use_stored_s else features(ref, spatial, False)
            result["sfid"] = frechet_distance(s_sp.mu, s_sp.sigma, r_sp.mu, r_sp.sigma)
        elif m == "is":
            result["is"], result["is_std"] = inception_score(s_fs.probs, splits=is_splits)
        elif m == "pr":
            result["precision"], result["recall"] = precision_recall(r_fs.features, s_fs.features, k=k)
        elif m == "kid":
            result.update(_kid(s_fs.features, r_fs.features, kid_subsets, kid_subset_size))
        elif m == "acc":
            result["acc"] = class_accuracy(s_fs.probs, smp.labels[: s_fs.n])
    return result


def _check_sides_comparable(smp: _Side, ref: _Side, allow_mismatch: bool) -> None:
    """Refuse (or, with ``allow_mismatch``, warn about) sets of different image size or channel count."""
    try:
        _check_same_kind(smp, ref)
    except ValueError as e:
        if not allow_mismatch:
            raise ValueError(f"{e} (or pass --allow-mismatch)") from None
        warnings.warn(f"{e}; comparing anyway (--allow-mismatch)", stacklevel=3)


def _check_request(metrics: list[str], smp: _Side, ref: "_Side | None",
                   extractor: FeatureExtractor) -> "InceptionSpatial | None":
    """Check that every metric can be computed from what was given; returns the sFID extractor when asked for."""
    need_ref = [m for m in metrics if m in ("fid", "sfid", "pr", "kid")]
    need_probs = [m for m in metrics if m in ("is", "acc")]
    if need_ref and ref is None:
        raise ValueError(f"metric(s) {', '.join(need_ref)} need a reference")
    if need_probs and not extractor.has_probs:
        raise ValueError(
            f"metric(s) {', '.join(need_probs)} need class probabilities, which {extractor.name} does not give "
            "(the fid-helper InceptionV3 file has no classification head): use --feature classifier:PATH "
            "or a torchscript:PATH network with logits"
        )
    spatial = None
    if "sfid" in metrics:
        if not isinstance(extractor, InceptionV3):
            raise ValueError(f"metric sfid needs the Inception network (--feature inception), not {extractor.name}")
        spatial = InceptionSpatial(extractor)
        for side in (smp, ref):
            if side.images is None and not side.has_spatial:
                raise ValueError(f"metric sfid: the {side.role} statistics file has no spatial statistics "
                                 "(mu_s, sigma_s): give images, or write the file with `dcdit reference --stats`")
    if "acc" in metrics and smp.labels is None:
        raise ValueError("metric acc needs class labels in the samples file (arr_1 or labels)")
    for side in (smp, ref):
        if side is not None and side.stored is not None and side.images is None:
            _check_stored(side, side is ref, metrics, need_probs, extractor)
    return spatial


def _check_stored(side: _Side, is_ref: bool, metrics: list[str], need_probs: list[str],
                  extractor: FeatureExtractor) -> None:
    """A statistics file given instead of images: it must come from ``extractor`` and hold what the metrics read."""
    if not side.stored_matches(extractor):
        if side.stored.extractor is not None:
            raise ValueError(f"{side.role} statistics were computed with {side.stored.extractor}, not {extractor.name}")
        raise ValueError(f"{side.role} statistics file names no extractor, so it is taken as Inception "
                         "statistics: use --feature inception")
    if is_ref and any(m in metrics for m in ("pr", "kid")) and side.stored.features is None:
        raise ValueError(f"{side.role} statistics file has no features: pr and kid need images or a file with features")
    if not is_ref and need_probs and side.stored.probs is None:
        raise ValueError(f"samples statistics file has no probabilities for {', '.join(need_probs)}")


class _FeatureReader:
    """Features of one operand under one extractor: its stored statistics, or its images through the cache."""

    def __init__(self, spatial, cache_dir, use_cache: bool, log: Callable[[str], None], progress: bool):
        self.spatial, self.cache_dir, self.use_cache = spatial, cache_dir, use_cache
        self.log, self.progress = log, progress

    def __call__(self, side: _Side, ex: FeatureExtractor, want_probs: bool) -> FeatureSet:
        if side.images is None:
            return load_stats(side.stored.path, spatial=True) if ex is self.spatial else side.stored
        n = len(side.images)
        extracted = []

        def on_extract() -> None:
            extracted.append(True)
            self.log(f"{side.role}: extracting {ex.name} features of {n} images from {side.images.name}")

        with tqdm(total=n, desc=f"{side.role} {ex.name}", unit="img", disable=not self.progress, file=sys.stderr,
                  leave=False) as bar:
            fs = compute_feature_set(side.images, ex, want_probs=want_probs, cache_dir=self.cache_dir,
                                     use_cache=self.use_cache, progress=lambda done: bar.update(done - bar.n),
                                     on_extract=on_extract)
        if not extracted:
            self.log(f"{side.role}: {ex.name} features of {n} images from {side.images.name} read from the cache "
                     f"({fs.path})")
        return fs


def _fid(s_fs: FeatureSet, r_stats: FeatureSet) -> float:
    if r_stats.mu.shape != s_fs.mu.shape:
        raise ValueError(f"feature sizes differ: samples {s_fs.mu.shape[0]}, reference {r_stats.mu.shape[0]}")
    return frechet_distance(s_fs.mu, s_fs.sigma, r_stats.mu, r_stats.sigma)


def _kid(samples, reference, subsets: int, subset_size: int) -> dict:
    """``kid``, ``kid_std`` and the subset size used; warns when a set was too small for ``subset_size``."""
    kid, kid_std = kernel_inception_distance(samples, reference, num_subsets=subsets, max_subset_size=subset_size)
    plan = kid_subset_plan(len(samples), len(reference), subset_size)
    if plan["bootstrap"]:  # the subset size shrank to a set's size: say so, and what the ± then means
        sets = " and ".join(("samples", "reference")[i - 1] for i in plan["bootstrap"])
        warnings.warn(f"KID: subsets of {plan['subset_size']}, not {subset_size}: the {sets} "
                      f"{'have' if len(plan['bootstrap']) > 1 else 'has'} only {plan['subset_size']} "
                      f"images, resampled with replacement for each of the {subsets} subsets, so "
                      "± is a bootstrap spread (how much KID moves with another draw of that many images)",
                      stacklevel=3)
    return {"kid": kid, "kid_std": kid_std, "kid_subset_size": plan["subset_size"]}


def _warn_about_sets(smp: _Side, ref: "_Side | None", metrics: list[str], extractor: FeatureExtractor) -> None:
    """Warn about sets too small for their feature covariance."""
    dims = {"fid": extractor.dim, "sfid": InceptionSpatial.dim_of() if "sfid" in metrics else None}
    for side in (smp, ref):
        if side is None or side.images is None:
            continue
        n = len(side.images)
        for m in ("fid", "sfid"):
            d = dims[m]
            if m in metrics and d and n < d:
                warnings.warn(f"{side.role}: {n} images for {d}-d {m} features: the covariance has rank < {d}, "
                              f"so {m.upper()} is biased upward and only comparable at equal set sizes "
                              f"(use at least {d} images; the standard is 50000)", stacklevel=3)
                break
    # sets of different image size or channel count are refused earlier (_check_same_kind)


def format_table(result: dict) -> str:
    """A small two-column text table of an :func:`evaluate` result."""
    rows = []
    for key in ("fid", "sfid", "is", "precision", "recall", "kid", "acc"):
        if key in result:
            val = result[key]
            text = f"{val:.6f}" if key == "kid" else f"{val:.4f}"
            if key + "_std" in result:
                text += f" ± {result[key + '_std']:.{6 if key == 'kid' else 4}f}"
            rows.append(({"sfid": "sFID"}.get(key, key.upper() if key in ("fid", "is", "kid") else key), text))
    for key in ("feature", "n_samples", "n_reference", "kid_subset_size", "reference_stats"):
        if key in result:
            rows.append((key, str(result[key])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

