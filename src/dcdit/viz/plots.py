"""The four standard figures (matplotlib, Agg, PNG). Each returns a :class:`Plot` (path, panel count).

(a) :func:`plot_boundary_maps` - routing maps over the denoising steps beside
    the noisy input and the x_0 prediction;
(b) :func:`plot_cost_over_time` - kept-token share and FLOPs against the timestep;
(c) :func:`plot_quality_vs_compute` - FID against GFLOPs (the elastic curve);
(d) :func:`plot_class_grid` - samples in rows by class.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state),
so they are safe to draw from any thread or process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dcdit.utils import atomic_write

__all__ = ["Plot", "default_display", "upsample_map", "plot_boundary_maps", "plot_cost_over_time",
           "plot_quality_vs_compute", "plot_class_grid", "choose_steps"]


@dataclass
class Plot:
    """A written figure: its path and how many panels (axes with content) it has."""

    path: Path
    panels: int


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | Path) -> Plot:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: plots are written as .png")
    panels = sum(1 for ax in fig.axes if ax.get_label() != "<colorbar>" and (ax.has_data() or ax.images))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return Plot(path, panels)


def default_display(x: torch.Tensor) -> np.ndarray:
    """Model-space images (n, C, H, W) -> uint8 (n, H, W, 3) for display.

    1 or 3 channels are read as [-1, 1] images; other channel counts (latents)
    show their first three channels, each image stretched to its own range.
    """
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected (n, C, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3):
        u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        v = x[:, :3]
        lo = v.amin(dim=(1, 2, 3), keepdim=True)
        hi = v.amax(dim=(1, 2, 3), keepdim=True)
        u = ((v - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8)
    u = u.permute(0, 2, 3, 1).numpy()
    return np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) token-grid map -> (H, W) by nearest-neighbour (each token covers its patch)."""
    m = np.asarray(m)
    h, w = m.shape
    H, W = size
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    return m[rows][:, cols]


def choose_steps(num_steps: int, count: int) -> list[int]:
    """``count`` step positions spread evenly over 0..num_steps-1 (first and last included)."""
    count = max(1, min(count, num_steps))
    return sorted({int(round(v)) for v in np.linspace(0, num_steps - 1, count)})


def plot_boundary_maps(
    record: dict,
    path: str | Path,
    samples: Optional[Sequence[int]] = None,
    steps: Optional[Sequence[int]] = None,
    display: Callable[[torch.Tensor], np.ndarray] = default_display,
    max_samples: int = 3,
    max_steps: int = 6,
    title: Optional[str] = None,
) -> Plot:
    """(a) Rows = samples x [noisy input x_t, prediction x_0, boundary prob p, kept tokens]; columns = steps.

    ``record``: stacked arrays as from :meth:`RoutingRecord.stacked` (``timesteps``,
    ``x_t``, ``pred_xstart`` (steps, n, C, H, W), ``boundary_prob``, ``keep_mask``
    (steps, n, h, w)). The maps are drawn at token-grid resolution upsampled to
    the displayed image size; the kept panel's caption gives the kept share.
    """
    if record.get("boundary_prob") is None or record.get("keep_mask") is None:
        raise ValueError("boundary maps need routing (a DC-DiT run); this record has none")
    probs, keeps = np.asarray(record["boundary_prob"]), np.asarray(record["keep_mask"])
    if probs.ndim != 4:
        raise ValueError(f"boundary maps must be (steps, n, h, w) grids, got shape {probs.shape}")
    S, n = probs.shape[:2]
    samples = list(range(min(n, max_samples))) if samples is None else list(samples)
    steps = choose_steps(S, max_steps) if steps is None else list(steps)
    if not samples or any(not 0 <= s < n for s in samples):
        raise ValueError(f"sample rows must lie in 0..{n - 1}, got {samples}")
    if not steps or any(not 0 <= s < S for s in steps):
        raise ValueError(f"steps must lie in 0..{S - 1}, got {steps}")
    ts = np.asarray(record["timesteps"])
    xt = record.get("x_t")
    x0 = record.get("pred_xstart")
    kinds = [k for k, v in (("x_t", xt), ("x0", x0)) if v is not None] + ["prob", "keep"]
    rows, cols = len(samples) * len(kinds), len(steps)
    fig = _figure(1.6 * cols + 1.2, 1.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    row_names = {"x_t": "noisy input $x_t$", "x0": r"prediction $\hat{x}_0$", "prob": "boundary prob. p",
                 "keep": "kept tokens"}
    im = None
    for si, s in enumerate(samples):
        shown = {}
        for kind, data in (("x_t", xt), ("x0", x0)):
            if data is not None:
                shown[kind] = display(torch.as_tensor(data)[steps, s])
        size = next(iter(shown.values())).shape[1:3] if shown else probs.shape[2:]
        for ci, step in enumerate(steps):
            for ki, kind in enumerate(kinds):
                ax = axes[si * len(kinds) + ki, ci]
                ax.set_xticks([])
                ax.set_yticks([])
                if kind in shown:
                    ax.imshow(shown[kind][ci], interpolation="nearest")
                elif kind == "prob":
                    im = ax.imshow(upsample_map(probs[step, s], size), cmap="magma", vmin=0, vmax=1,
                                   interpolation="nearest")
                else:
                    keep = keeps[step, s]
                    ax.imshow(upsample_map(keep.astype(float), size), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
                    ax.set_xlabel(f"{keep.mean():.0%} kept", fontsize=8)
                if si == 0 and ki == 0:
                    ax.set_title(f"t = {int(ts[step])}", fontsize=9)
                if ci == 0:
                    ax.set_ylabel(f"#{s}: {row_names[kind]}" if ki == 0 else row_names[kind], fontsize=8)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        cbar.ax.set_label("<colorbar>")
        cbar.set_label("boundary probability p", fontsize=8)
    fig.suptitle(title or "DC-DiT routing over the denoising steps (first stage)", fontsize=10)
    return _save(fig, path)


def _band(ax, x, values: np.ndarray, label: str, color=None) -> None:
    """Mean line and a +-1 std band (min/max clipped) of values (steps, n)."""
    mean, std = values.mean(axis=1), values.std(axis=1)
    lo, hi = np.maximum(mean - std, values.min(axis=1)), np.minimum(mean + std, values.max(axis=1))
    (line,) = ax.plot(x, mean, label=label, color=color, lw=1.5)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.25, lw=0)


def plot_cost_over_time(
    timesteps: Sequence[int],
    path: str | Path,
    kept_share: Optional[np.ndarray] = None,
    flops: Optional[np.ndarray] = None,
    title: Optional[str] = None,
    flops_unit: str = "GFLOPs",
) -> Plot:
    """(b) Kept-token share per stage and FLOPs per image against the timestep (mean +- std band).

    ``kept_share``: (steps, stages, n) or (steps, n); ``flops``: (steps, n) FLOPs
    per image (2 per MAC). The x axis runs from noisy (large t) to clean (t = 0).
    """
    t = np.asarray(timesteps)
    panels = [k for k, v in (("kept", kept_share), ("flops", flops)) if v is not None]
    if not panels:
        raise ValueError("nothing to plot: give kept_share and/or flops")
    fig = _figure(5.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, kind in zip(axes, panels):
        if kind == "kept":
            ks = np.asarray(kept_share, dtype=float)
            ks = ks[:, None, :] if ks.ndim == 2 else ks
            if ks.shape[0] != len(t):
                raise ValueError(f"kept_share has {ks.shape[0]} steps, timesteps {len(t)}")
            for stage in range(ks.shape[1]):
                _band(ax, t, ks[:, stage], f"stage {stage}")
            ax.set_ylabel("share of tokens kept")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=8)
            ax.set_title("kept-token share", fontsize=10)
        else:
            fl = np.asarray(flops, dtype=float)
            fl = fl[:, None] if fl.ndim == 1 else fl
            if fl.shape[0] != len(t):
                raise ValueError(f"flops has {fl.shape[0]} steps, timesteps {len(t)}")
            scale = {"GFLOPs": 1e9, "MFLOPs": 1e6, "GMACs": 2e9}[flops_unit]
            _band(ax, t, fl / scale, "per image", color="tab:red")
            ax.set_ylabel(f"{flops_unit} per image per step")
            ax.set_ylim(bottom=0)
            ax.set_title("network cost", fontsize=10)
        ax.set_xlabel("timestep t (denoising runs left to right)")
        ax.set_xlim(max(t.max(), 1), min(t.min(), 0))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_quality_vs_compute(
    records: Sequence[dict],
    path: str | Path,
    x: str = "gflops",
    y: str = "fid",
    group: str = "model",
    annotate: Optional[str] = "tail_drop",
    xlabel: Optional[str] = None,
    ylabel: Optional[str] = None,
    title: Optional[str] = None,
) -> Plot:
    """(c) Quality against compute: one line per ``group`` (e.g. model), points sorted by ``x``.

    ``records``: dicts with at least ``x``, ``y`` and ``group`` keys, e.g.
    ``{"model": "DC-DiT-B-N4", "tail_drop": 0.2, "gflops": 41.0, "fid": 38.2}``;
    a point's ``annotate`` value (the drop fraction) is written next to it.
    Groups with a single point (e.g. a DiT baseline) are drawn as markers.
    """
    if not records:
        raise ValueError("no records to plot")
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(records):
        missing = [k for k in (x, y, group) if k not in r or r[k] is None]
        if missing:
            raise ValueError(f"record {i} lacks {', '.join(missing)}: {r}")
        groups.setdefault(str(r[group]), []).append(r)
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    markers = "osD^v<>px*"
    for gi, (name, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: float(r[x]))
        xs, ys = [float(r[x]) for r in rs], [float(r[y]) for r in rs]
        ax.plot(xs, ys, marker=markers[gi % len(markers)], ls="-" if len(rs) > 1 else "none", label=name, ms=6)
        if annotate:
            for r, xv, yv in zip(rs, xs, ys):
                if r.get(annotate) is not None:
                    text = f"f={float(r[annotate]):g}" if annotate == "tail_drop" else f"{float(r[annotate]):g}"
                    ax.annotate(text, (xv, yv), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
    ax.set_xlabel(xlabel or ("GFLOPs per image" if x == "gflops" else x))
    ax.set_ylabel(ylabel or y.upper())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    note = " (f = tail-drop fraction)" if annotate == "tail_drop" else (f" (labels: {annotate})" if annotate else "")
    ax.set_title(title or f"{ylabel or y.upper()} vs compute{note}", fontsize=10)
    return _save(fig, path)


def plot_class_grid(
    images: np.ndarray,
    labels: Sequence[int],
    path: str | Path,
    class_names: Optional[dict[int, str] | Sequence[str]] = None,
    per_class: int = 8,
    classes: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
) -> Plot:
    """(d) One row per class (label on the left), up to ``per_class`` samples of it per row.

    ``images``: uint8 (N, H, W, C); ``labels``: (N,). ``classes`` picks and
    orders the rows (default: the labels present, ascending).
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected uint8 (N, H, W, C) images with N labels, got {images.dtype} {images.shape} "
                         f"and {labels.shape[0]} labels")
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    if not classes:
        raise ValueError("no classes to show")
    cols = max(1, min(per_class, max(int((labels == c).sum()) for c in classes)))
    fig = _figure(1.2 * cols + 1.0, 1.2 * len(classes) + 0.4)
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for ri, c in enumerate(classes):
        picks = np.flatnonzero(labels == c)[:cols]
        name = (class_names.get(c) if isinstance(class_names, dict) else class_names[c]) if class_names else None
        for ci in range(cols):
            ax = axes[ri, ci]
            ax.set_xticks([])
            ax.set_yticks([])
            if ci < len(picks):
                img = images[picks[ci]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=255, interpolation="nearest")
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if ci == 0:
                ax.set_ylabel(f"{c}: {name}" if name else f"class {c}", fontsize=8)
    fig.suptitle(title or "samples by class", fontsize=10)
    return _save(fig, path)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str | Path, xlabel: str = "",
              title: Optional[str] = None) -> Plot:
    """Horizontal bars with their values written at the end (e.g. GFLOPs per image per model)."""
    if len(labels) != len(values) or not labels:
        raise ValueError(f"need one value per label, got {len(labels)} labels and {len(values)} values")
    fig = _figure(7.5, 0.45 * len(labels) + 1.2)
    ax = fig.subplots()
    y = np.arange(len(labels))[::-1]
    colors = ["tab:blue" if "DC-DiT" in lab else "tab:gray" for lab in labels]
    ax.barh(y, values, color=colors)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3g}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(values) * 1.18)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
