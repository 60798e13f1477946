"""One call from sample/reference files to a dict of metrics (used by ``dcdit evaluate``).

Samples and reference may each be an ADM ``.npz`` (``arr_0`` images), an image
folder, a statistics ``.npz`` (``mu``/``sigma``, see :mod:`.stats`), a uint8
NHWC array or an :class:`~dcdit.evaluation.io.ImageSource`.

Metrics: ``fid``; ``is`` (samples only, needs an extractor with class
probabilities); ``pr`` (precision and recall, k = 3); ``kid``; ``acc``
(share of conditional samples the classifier assigns to their own label;
needs labels in the samples file).

As ADM's evaluator does, a reference ``.npz`` that holds both images and
``mu``/``sigma`` uses the stored statistics for FID (when they belong to the
same feature network: the file's ``extractor`` entry matches, or, for
files without one such as ADM's reference batches, the extractor is the
standard Inception) and its images for the other metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dcdit.evaluation import inception
from dcdit.evaluation.features import FeatureExtractor, build_extractor
from dcdit.evaluation.io import ArrayImages, ImageSource, npz_keys, open_images
from dcdit.evaluation.metrics import (
    class_accuracy,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from dcdit.evaluation.stats import FeatureSet, compute_feature_set, load_stats

METRICS = ("fid", "is", "pr", "kid", "acc")


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
        self.images: ImageSource | None = None
        self.stored: FeatureSet | None = None
        if isinstance(obj, ImageSource):
            self.images = obj
        elif isinstance(obj, (str, Path)):
            p = Path(obj)
            if not p.exists():
                raise FileNotFoundError(f"{p}: {role} not found")
            keys = npz_keys(p) if p.is_file() else []
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
) -> dict:
    """Compute ``metrics`` for ``samples`` against ``reference``; returns a flat dict.

    Keys: ``fid``, ``is``/``is_std``, ``precision``/``recall``, ``kid``/``kid_std``,
    ``acc`` for the requested metrics, plus ``feature``, ``n_samples``,
    ``n_reference`` and ``reference_stats`` (``stored`` or ``computed``).
    """
    metrics = parse_metrics(metrics)
    log = log or (lambda s: None)
    if isinstance(extractor, str):
        extractor = build_extractor(extractor, batch_size=batch_size, device=device)
    smp = _Side(samples, "samples", limit)
    ref = _Side(reference, "reference", None) if reference is not None else None

    need_ref = [m for m in metrics if m in ("fid", "pr", "kid")]
    need_probs = [m for m in metrics if m in ("is", "acc")]
    if need_ref and ref is None:
        raise ValueError(f"metric(s) {', '.join(need_ref)} need a reference")
    if need_probs and not extractor.has_probs:
        raise ValueError(
            f"metric(s) {', '.join(need_probs)} need class probabilities, which {extractor.name} does not give "
            "(the fid-helper InceptionV3 file has no classification head): use --feature classifier:PATH "
            "or a torchscript:PATH network with logits"
        )
    if "acc" in metrics and smp.labels is None:
        raise ValueError("metric acc needs class labels in the samples file (arr_1 or labels)")
    for side in (smp, ref):
        if side is not None and side.stored is not None and side.images is None:
            if not side.stored_matches(extractor):
                if side.stored.extractor is not None:
                    raise ValueError(
                        f"{side.role} statistics were computed with {side.stored.extractor}, not {extractor.name}"
                    )
                raise ValueError(
                    f"{side.role} statistics file names no extractor, so it is taken as Inception "
                    "statistics: use --feature inception"
                )
            if side is ref and any(m in metrics for m in ("pr", "kid")) and side.stored.features is None:
                raise ValueError(f"{side.role} statistics file has no features: pr and kid need images or a file with features")
            if side is smp and need_probs and side.stored.probs is None:
                raise ValueError(f"samples statistics file has no probabilities for {', '.join(need_probs)}")

    def features_of(side: _Side, want_probs: bool) -> FeatureSet:
        if side.images is None:
            return side.stored
        n = len(side.images)
        log(f"{side.role}: extracting {extractor.name} features of {n} images from {side.images.name}")
        return compute_feature_set(side.images, extractor, want_probs=want_probs, cache_dir=cache_dir, use_cache=use_cache)

    result: dict = {"feature": extractor.name}
    s_fs = features_of(smp, bool(need_probs))
    result["n_samples"] = int(s_fs.n)
    r_fs = None
    use_stored = (ref is not None and use_reference_stats and ref.stored is not None and ref.stored_matches(extractor))
    if ref is not None and (not use_stored or any(m in metrics for m in ("pr", "kid"))):
        r_fs = features_of(ref, False)
    if ref is not None:
        result["n_reference"] = int((r_fs or ref.stored).n)
        result["reference_stats"] = "stored" if use_stored else "computed"

    for m in metrics:
        if m == "fid":
            r_stats = ref.stored if use_stored else r_fs
            if r_stats.mu.shape != s_fs.mu.shape:
                raise ValueError(f"feature sizes differ: samples {s_fs.mu.shape[0]}, reference {r_stats.mu.shape[0]}")
            result["fid"] = frechet_distance(s_fs.mu, s_fs.sigma, r_stats.mu, r_stats.sigma)
        elif m == "is":
            result["is"], result["is_std"] = inception_score(s_fs.probs, splits=is_splits)
        elif m == "pr":
            result["precision"], result["recall"] = precision_recall(r_fs.features, s_fs.features, k=k)
        elif m == "kid":
            result["kid"], result["kid_std"] = kernel_inception_distance(
                s_fs.features, r_fs.features, num_subsets=kid_subsets, max_subset_size=kid_subset_size
            )
        elif m == "acc":
            labels = smp.labels[: s_fs.n]
            result["acc"] = class_accuracy(s_fs.probs, labels)
    return result


def format_table(result: dict) -> str:
    """A small two-column text table of an :func:`evaluate` result."""
    rows = []
    for key in ("fid", "is", "precision", "recall", "kid", "acc"):
        if key in result:
            val = result[key]
            text = f"{val:.6f}" if key == "kid" else f"{val:.4f}"
            if key + "_std" in result:
                text += f" ± {result[key + '_std']:.{6 if key == 'kid' else 4}f}"
            rows.append((key.upper() if key in ("fid", "is", "kid") else key, text))
    for key in ("feature", "n_samples", "n_reference", "reference_stats"):
        if key in result:
            rows.append((key, str(result[key])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

