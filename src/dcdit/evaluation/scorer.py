"""FID of many sample sets against one set of reference statistics, with one feature extractor.

A reproduction scores dozens of sample sets (every model, checkpoint and tail-drop fraction) against
the same held-out images. :class:`ReferenceScorer` holds the extractor and the reference's Gaussian
statistics, so each set costs one feature pass::

    scorer = ReferenceScorer.from_images(build_extractor("inception"), test_images, name="mnist-test")
    fid, fid_at = scorer.fid(samples, first=(250, 500))   # all samples, and their first 250 / 500
    acc = classifier_accuracy(classifier, samples, labels)  # the class half of the protocol

Features go through :func:`~dcdit.evaluation.stats.compute_feature_set`, so a set seen before
(same pixels, same extractor) is read back from the statistics cache.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from dcdit.evaluation.features import FeatureExtractor
from dcdit.evaluation.io import ArrayImages
from dcdit.evaluation.metrics import feature_statistics, frechet_distance
from dcdit.evaluation.stats import FeatureSet, compute_feature_set

__all__ = ["ReferenceScorer"]


class ReferenceScorer:
    """FID of uint8 NHWC image arrays against fixed reference statistics.

    Args:
        extractor: the feature network (Inception for FID; an in-domain classifier's features work too).
        reference: the reference set's statistics (``mu``, ``sigma``), e.g. from :func:`load_stats`.
        cache_dir: statistics cache of the scored sets (None: the default cache, ``$DCDIT_CACHE``).
        cache_samples: read and write the scored sets' features through that cache (False: extract every time;
            the cache stores float32 features, so a set read back scores a hair differently from a fresh one).
    """

    def __init__(self, extractor: FeatureExtractor, reference: FeatureSet, cache_dir=None, cache_samples: bool = True):
        self.extractor, self.reference = extractor, reference
        self.cache_dir, self.cache_samples = cache_dir, cache_samples

    @classmethod
    def from_images(cls, extractor: FeatureExtractor, images: np.ndarray, labels=None, name: str = "reference",
                    cache_dir=None, cache_samples: bool = True) -> "ReferenceScorer":
        """A scorer whose reference is ``images`` (uint8 NHWC), its statistics cached in ``cache_dir``."""
        return cls(extractor, compute_feature_set(ArrayImages(images, labels, name=name), extractor,
                                                  cache_dir=cache_dir), cache_dir, cache_samples)

    def features(self, images: np.ndarray, labels=None, name: str = "samples") -> np.ndarray:
        """(n, D) features of ``images`` (uint8 NHWC)."""
        return compute_feature_set(ArrayImages(images, labels, name=name), self.extractor, cache_dir=self.cache_dir,
                                   use_cache=self.cache_samples).features

    def fid_of_features(self, features: np.ndarray) -> float:
        """FID of a feature array (n, D) against the reference."""
        mu, sigma = feature_statistics(features)
        return float(frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma))

    def fid(self, images: np.ndarray, labels=None, name: str = "samples",
            first: Iterable[int] = ()) -> tuple[float, dict[int, float]]:
        """(FID of all ``images``, {k: FID of the first k images} for each k in ``first`` below their number).

        The prefixes make sets scored with different numbers of samples comparable at equal n; they share
        one feature pass with the whole set.
        """
        feats = self.features(images, labels, name)
        return self.fid_of_features(feats), {k: self.fid_of_features(feats[:k])
                                             for k in sorted(set(first)) if k < len(feats)}
