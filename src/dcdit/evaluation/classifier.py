"""A small in-domain CNN classifier for the built-in 32x32 data sets.

Inception features mean little on 32x32 shapes or digits, so small-data runs
are scored with a classifier trained on the same data: its penultimate
feature vector (``feature_dim``, 256 by default) gives an in-domain FID, and
its predictions give a class-accuracy score for conditional samples.

Architecture (``SmallCNN``): three stages of two 3x3 convs (GroupNorm, SiLU;
the second conv of each stage has stride 2) with widths w, 2w, 4w, global
average pooling (or global max pooling, ``pool="max"``: for objects anywhere on a
mostly empty image, such as the ``canvas`` source, where an average is diluted by
the background; its convs then pad by replication, so the image border looks like
the background: zero padding of a -1 background makes an edge at the border that a
max finds in every image, and such a classifier stays at chance),
``Linear(4w -> feature_dim) + ReLU`` = the features, then
``Linear(feature_dim -> num_classes)`` = the logits.  Inputs are float NCHW
in [-1, 1], as ``dcdit.data`` datasets return them.

Checkpoints: ``classifier.safetensors`` (weights) + ``classifier.json``
(the :class:`ClassifierConfig` and training notes) in one directory.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.evaluation.io import check_images, check_labels, to_gray, to_rgb

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"
POOLS = ("mean", "max")


@dataclass
class ClassifierConfig:
    """Shape of a :class:`SmallCNN`."""

    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32
    width: int = 32
    feature_dim: int = 256
    pool: str = "mean"  # global pooling of the last feature map: "mean" or "max"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"ClassifierConfig.pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        for f in fields(self):
            if f.name == "pool":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ClassifierConfig.{f.name} must be a positive integer, got {v!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"ClassifierConfig.in_channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 8:
            raise ValueError(f"ClassifierConfig.image_size must be at least 8, got {self.image_size}")


def _block(cin: int, cout: int, stride: int, padding_mode: str = "zeros") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding_mode),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class SmallCNN(nn.Module):
    """The in-domain classifier; ``features(x)`` is the penultimate vector."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w, pad = config.width, "replicate" if config.pool == "max" else "zeros"
        self.body = nn.Sequential(
            _block(config.in_channels, w, 1, pad), _block(w, w, 2, pad),
            _block(w, 2 * w, 1, pad), _block(2 * w, 2 * w, 2, pad),
            _block(2 * w, 4 * w, 1, pad), _block(4 * w, 4 * w, 2, pad),
        )
        self.proj = nn.Linear(4 * w, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim) non-negative features."""
        h = self.body(x)
        h = h.amax(dim=(2, 3)) if self.config.pool == "max" else h.mean(dim=(2, 3))
        return F.relu(self.proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


# --------------------------------------------------------------------------- save / load


def save_classifier(model: SmallCNN, out_dir, extra: dict | None = None) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.suffix in (".safetensors", ".json"):
        raise ValueError(f"{out}: give a directory for the classifier, not a file name")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "kind": "dcdit-classifier"})
    meta = {"kind": "dcdit-classifier", "config": asdict(model.config)}
    if extra:
        meta.update(extra)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _resolve_paths(path) -> tuple[Path, Path]:
    """(weights file, config file) for a checkpoint directory or weights file."""
    p = Path(path)
    if p.is_dir():
        weights, config = p / WEIGHTS_NAME, p / CONFIG_NAME
        if not weights.is_file():
            cands = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.pt")) + list(p.glob("*.pth")))
            if len(cands) != 1:
                raise FileNotFoundError(f"{p}: no {WEIGHTS_NAME} in this directory")
            weights = cands[0]
    else:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such classifier file or directory")
        weights = p
        config = p.with_suffix(".json")
        if not config.is_file():
            config = p.parent / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{config}: classifier config (JSON) not found next to {weights}")
    return weights, config


def load_classifier(path, device="cpu") -> SmallCNN:
    """Load a classifier saved by :func:`save_classifier` (directory or weights file).

    The weights may be ``.safetensors`` or a torch ``state_dict`` file
    (``.pt``/``.pth``); the JSON config is ``classifier.json`` or ``<stem>.json``.
    """
    weights, config_path = _resolve_paths(path)
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    cfg_dict = meta.get("config", meta)
    known = {f.name for f in fields(ClassifierConfig)}
    unknown = set(cfg_dict) - known
    if unknown and "config" not in meta:
        cfg_dict = {k: v for k, v in cfg_dict.items() if k in known}
    elif unknown:
        raise ValueError(f"{config_path}: unknown classifier config keys {sorted(unknown)}")
    model = SmallCNN(ClassifierConfig(**cfg_dict))
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:  # safetensors / pickle / zip errors of many kinds
        raise ValueError(f"{weights}: unreadable classifier weights ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{weights}: weights do not match the config in {config_path.name}: {first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------- input


def images_to_input(images, config: ClassifierConfig, device="cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] at the classifier's channels and size.

    RGB images meet a 1-channel classifier as luma; gray images meet an RGB
    classifier repeated over three channels; other sizes are resized
    (bilinear, antialiased).
    """
    images = check_images(images)
    images = to_gray(images) if config.in_channels == 1 else to_rgb(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    if x.shape[-2:] != (config.image_size, config.image_size):
        x = F.interpolate(x, size=(config.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def predict(classifier: SmallCNN, images, batch_size: int = 256) -> np.ndarray:
    """Predicted class per image (uint8 NHWC input)."""
    device = next(classifier.parameters()).device
    classifier.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_input(images[i : i + batch_size], classifier.config, device)
        out.append(classifier(x).argmax(dim=1).cpu().numpy())
    return np.concatenate(out)


def classifier_accuracy(classifier, images_uint8, labels, batch_size: int = 256) -> float:
    """Fraction of images (uint8 NHWC) whose predicted class equals ``labels``.

    ``classifier``: a :class:`SmallCNN` or a path :func:`load_classifier` accepts.
    """
    if not isinstance(classifier, SmallCNN):
        classifier = load_classifier(classifier)
    images_uint8 = check_images(images_uint8)
    labels = check_labels(labels, images_uint8.shape[0])
    if labels.min() < 0 or labels.max() >= classifier.config.num_classes:
        raise ValueError(
            f"labels must lie in [0, {classifier.config.num_classes - 1}], "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return float((predict(classifier, images_uint8, batch_size) == labels).mean())


# --------------------------------------------------------------------------- training


def dataset_info(dataset) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of a dataset of (x CHW, y int) pairs.

    Uses the ``channels``/``image_size``/``num_classes`` attributes when present
    (as ``dcdit.data`` datasets have), else looks at the data.
    """
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    x, _ = dataset[0]
    x = torch.as_tensor(x)
    if x.ndim != 3:
        raise ValueError(f"dataset items must be (x CHW, y), got x of shape {tuple(x.shape)}")
    channels = int(getattr(dataset, "channels", x.shape[0]))
    image_size = getattr(dataset, "image_size", x.shape[-1])
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        ys = [int(dataset[i][1]) for i in range(len(dataset))]
        num_classes = max(ys) + 1
    return channels, image_size, int(num_classes)


def train_classifier(
    dataset,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    feature_dim: int = 256,
    pool: str | None = None,
    device="cpu",
    seed: int = 0,
    num_workers: int = 0,
    log_every: int = 100,
    log: Callable[[str], None] | None = None,
) -> SmallCNN:
    """Train a :class:`SmallCNN` on any Dataset of (x float CHW in [-1, 1], y int).

    AdamW with a cosine learning-rate decay to 0 over ``steps``, cross-entropy
    loss, a random circular shift of up to 2 pixels per batch as augmentation.
    ``pool``: the global pooling (:class:`ClassifierConfig`); None takes the
    dataset's ``classifier_pool`` attribute (canvas: "max"), else "mean".
    Returns the model in eval mode.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    channels, image_size, num_classes = dataset_info(dataset)
    torch.manual_seed(seed)
    if pool is None:
        pool = getattr(dataset, "classifier_pool", "mean")
    cfg = ClassifierConfig(channels, num_classes, image_size, width, feature_dim, pool)
    model = SmallCNN(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
        generator=gen, num_workers=num_workers,
    )
    model.train()
    step, t0, run_loss, run_acc = 0, time.time(), 0.0, 0.0
    while step < steps:
        for x, y in loader:
            x = torch.as_tensor(x, dtype=torch.float32).to(device)
            y = torch.as_tensor(y, dtype=torch.long).to(device)
            if x.shape[1] != channels or x.shape[-1] != image_size:
                raise ValueError(f"batch of shape {tuple(x.shape)} does not match {channels}x{image_size}x{image_size}")
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            run_acc += (logits.argmax(1) == y).float().mean().item()
            if log and (step % log_every == 0 or step == steps):
                n = log_every if step % log_every == 0 else step % log_every
                log(f"step {step}/{steps}  loss {run_loss / n:.4f}  acc {run_acc / n:.3f}  {time.time() - t0:.1f}s")
                run_loss = run_acc = 0.0
            if step >= steps:
                break
    return model.eval()


@torch.no_grad()
def dataset_accuracy(model: SmallCNN, dataset, batch_size: int = 256, limit: int | None = None) -> float:
    """Accuracy on (the first ``limit`` items of) a Dataset of (x float CHW, y)."""
    device = next(model.parameters()).device
    n = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    correct = 0
    model.eval()
    for x, y in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        pred = model(torch.as_tensor(x, dtype=torch.float32).to(device)).argmax(1).cpu()
        correct += int((pred == torch.as_tensor(y)).sum())
    return correct / max(n, 1)
