"""Evaluation: sample I/O, feature extractors, FID / IS / precision-recall / KID.

Typical use::

    from dcdit.evaluation import evaluate, save_samples_npz
    save_samples_npz("samples.npz", images_uint8_nhwc, labels)
    print(evaluate("samples.npz", "reference.npz", metrics="fid,pr"))

Modules: :mod:`.io` (ADM ``.npz`` and image folders), :mod:`.features`
(extractor interface; :mod:`.inception` documents the FID network's input
contract), :mod:`.metrics`, :mod:`.stats` (statistics files and cache),
:mod:`.classifier` (in-domain CNN), :mod:`.evaluate` (the whole pipeline), :mod:`.scorer`
(FID of many sample sets against one reference, as a reproduction scores them).
"""
from dcdit.evaluation.classifier import (
    ClassifierConfig,
    SmallCNN,
    classifier_accuracy,
    dataset_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from dcdit.evaluation.evaluate import METRICS, evaluate, format_table, parse_metrics
from dcdit.evaluation.features import (
    ClassifierExtractor,
    FeatureExtractor,
    InceptionV3,
    TorchScriptExtractor,
    build_extractor,
)
from dcdit.evaluation.io import (
    ArrayImages,
    FolderImages,
    ImageSource,
    NpzImages,
    check_images,
    load_image_folder,
    load_samples_npz,
    open_images,
    save_samples_npz,
    to_uint8,
)
from dcdit.evaluation.metrics import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from dcdit.evaluation.scorer import ReferenceScorer
from dcdit.evaluation.stats import FeatureSet, compute_feature_set, load_stats, save_stats

__all__ = [
    "ArrayImages", "ClassifierConfig", "ClassifierExtractor", "FeatureExtractor", "FeatureSet",
    "FolderImages", "ImageSource", "InceptionV3", "METRICS", "NpzImages", "ReferenceScorer", "SmallCNN",
    "TorchScriptExtractor", "build_extractor", "check_images", "classifier_accuracy",
    "compute_feature_set", "dataset_accuracy", "evaluate", "feature_statistics", "fid_from_features", "format_table",
    "frechet_distance", "inception_score", "kernel_inception_distance", "load_classifier",
    "load_image_folder", "load_samples_npz", "load_stats", "open_images", "parse_metrics",
    "precision_recall", "save_classifier", "save_samples_npz", "save_stats", "to_uint8",
    "train_classifier",
]
