"""Upcycling: start a DC-DiT's main network from a trained DiT.

With the innermost stage as wide and deep as the DiT, the DiT's
``blocks.{i}.*`` become the main network's i-th DiT block (same parameter
names and shapes), and the timestep / label embedders copy over. Everything
else (stem, encoder, router, residual projection, decoder, norms, final
layer) keeps its fresh initialisation; the positional table is regenerated
for DC-DiT's full token grid.

Two things make the result usable as it is (:func:`upcycle`, which both
``dcdit upcycle`` and ``benchmarks/reproduce.py`` call):

- **the router keeps ~1/N of the tokens at init.** A fresh router (last bias
  -1.1, small logit spread) keeps almost nothing but the two forced tokens
  (0.8 % of a 16x16 grid), so the pretrained main network would see almost
  no tokens and kept-share budgets would be out of reach.
  :func:`calibrate_router` sets the router's output bias so the natural
  kept share, averaged over timesteps spread across the diffusion, is 1/N
  (the ratio loss's target), on noised data images when given, else on noise.
- **the DiT's diffusion settings carry over**: ``prediction`` and
  ``learn_sigma`` into the DC-DiT's config (so `dcdit sample` and `dcdit
  train` read its output as the DiT's), and the noise schedule / T of the
  DiT's run (when it has a training config) into the summary.

Sources: a released DiT ``.pt`` (bare state dict or with an ``ema`` entry,
read with ``weights_only=True``), a ``.safetensors`` file, a dcdit model /
run directory holding a DiT, or ``pretrained:NAME``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from dcdit.checkpoint import CONFIG_NAME, check_finite, load_model, load_pickle_state_dict, load_safetensors
from dcdit.data import build_dataset
from dcdit.diffusion.schedules import get_named_beta_schedule
from dcdit.models.dcdit import DCStage, build_dcdit
from dcdit.models.dit import BLOCK_KEY, describe_dit, registry_num_heads
from dcdit.models.factory import model_config
from dcdit.models.layers import DiTBlock
from dcdit.pretrained import PREFIX as PRETRAINED_PREFIX
from dcdit.pretrained import resolve_pretrained
from dcdit.sampling.generate import read_train_config
from dcdit.sampling.guidance import model_info
from dcdit.utils import unwrap

__all__ = ["upcycle", "upcycle_into", "calibrate_router", "router_target_share", "calibration_images",
           "load_dit_state", "dit_diffusion_settings"]

COPIED_PREFIXES = ("t_embedder.", "y_embedder.")


def load_dit_state(path: str | Path, which: str = "ema", trust_pickle: bool = False,
                   allow_nonfinite: bool = False) -> tuple[dict, Optional[dict]]:
    """(DiT state dict, its dcdit config if known) from a .pt / .safetensors file or a model/run dir.

    Weights holding NaN or inf are refused (NonFiniteError) unless ``allow_nonfinite``.
    """
    if str(path).startswith(PRETRAINED_PREFIX):  # a DiT shipped with the package, as every --ckpt takes it
        path = resolve_pretrained(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    if path.is_dir():
        model = load_model(path, which=which, allow_nonfinite=allow_nonfinite)
        cfg = model_config(model)
        if cfg["arch"] != "dit":
            raise ValueError(f"{path} holds a {type(model).__name__}, not a DiT")
        return model.state_dict(), cfg
    cfg = None
    if (path.parent / CONFIG_NAME).exists():
        try:
            cfg = json.loads((path.parent / CONFIG_NAME).read_text())
        except json.JSONDecodeError:
            cfg = None
        if cfg is not None and cfg.get("arch") != "dit":
            cfg = None
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = load_pickle_state_dict(path, trust_pickle=trust_pickle, prefer=which)
    if not allow_nonfinite:
        check_finite(state, path)
    return state, cfg


def main_network_blocks(model: nn.Module) -> tuple[str, list[int]]:
    """(module path of the innermost block stack, indices of its DiT blocks)."""
    prefix, node = "", model
    while isinstance(node, DCStage):
        prefix += "main_network."
        node = node.main_network
    layers = getattr(node, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the main network's block stack in {type(model).__name__}")
    return prefix + "layers.", [j for j, layer in enumerate(layers) if isinstance(layer, DiTBlock)]


@torch.no_grad()
def upcycle_into(model: nn.Module, dit_state: dict, dit_config: Optional[dict] = None) -> dict:
    """Copy a DiT's blocks and t/y embedders into ``model`` (a DC-DiT) in place; returns a summary.

    Raises ValueError naming the mismatch when widths, depths, heads or class counts differ.
    """
    info = describe_dit(dit_state)
    prefix, dit_layers = main_network_blocks(model)
    target = model.state_dict()
    cfg = dict(getattr(model, "config", {}))
    main_width = cfg.get("d_model", [None])[-1] if isinstance(cfg.get("d_model"), list) else None
    main_heads = cfg.get("num_heads", [None])[-1] if isinstance(cfg.get("num_heads"), list) else None
    if len(dit_layers) != info["depth"]:
        raise ValueError(f"depth mismatch: the DiT has {info['depth']} blocks, the DC-DiT main network has "
                         f"{len(dit_layers)} DiT blocks")
    if main_width is not None and main_width != info["hidden_size"]:
        raise ValueError(f"width mismatch: the DiT is {info['hidden_size']} wide, the DC-DiT main network "
                         f"{main_width}")
    if cfg.get("d_model") and cfg["d_model"][0] != info["hidden_size"]:
        raise ValueError(f"width mismatch: the DiT's t/y embedders are {info['hidden_size']} wide, the DC-DiT's "
                         f"conditioning width is {cfg['d_model'][0]}")
    heads = (dit_config or {}).get("num_heads") or registry_num_heads(info["hidden_size"])
    if heads is not None and main_heads is not None and heads != main_heads:
        raise ValueError(f"head count mismatch: the DiT uses {heads} heads, the DC-DiT main network {main_heads}")

    mapping = {}
    for key in dit_state:
        m = BLOCK_KEY.match(key)
        if m:
            mapping[key] = f"{prefix}{dit_layers[int(m.group(1))]}.{m.group(2)}"
        elif key.startswith(COPIED_PREFIXES):
            mapping[key] = key
    new_state = {}
    for src, dst in mapping.items():
        if dst not in target:
            raise ValueError(f"DiT parameter {src} has no counterpart {dst} in the DC-DiT "
                             "(attention-only 'd' blocks or a different layout?)")
        if tuple(target[dst].shape) != tuple(dit_state[src].shape):
            what = "classes" if src.startswith("y_embedder") else "shape"
            raise ValueError(f"{what} mismatch at {src}: DiT {tuple(dit_state[src].shape)} vs DC-DiT "
                             f"{dst} {tuple(target[dst].shape)}")
        new_state[dst] = dit_state[src].to(target[dst].dtype)
    block_keys = [k for k in target if k.startswith(prefix) and
                  int(k[len(prefix):].split(".", 1)[0]) in dit_layers]
    uncovered = [k for k in block_keys if k not in new_state]
    if uncovered:
        raise ValueError(f"the DiT checkpoint does not cover main-network parameters {uncovered[:3]}")
    model.load_state_dict(new_state, strict=False)
    n_copied = sum(v.numel() for v in new_state.values())
    n_total = sum(p.numel() for p in model.parameters())
    return {"tensors_copied": len(new_state), "params_copied": n_copied, "params_total": n_total,
            "main_prefix": prefix, "dit": info}


def dit_diffusion_settings(dit_path: str | Path, state: dict, dit_config: Optional[dict]) -> dict:
    """How the DiT's output is read and what process it was trained on.

    ``prediction`` and ``learn_sigma`` from its config (released DiTs, which
    have none: epsilon, and learn_sigma read off the final layer's width);
    ``noise_schedule`` and ``diffusion_steps`` from the training config of its
    run when it has one (``dcdit.sampling.read_train_config``), else DiT's
    linear schedule over 1000 steps, marked ``"recorded": False`` (with
    ``"recorded": True`` also the run's ``data_source``).
    """
    cfg = dit_config or {}
    final = state.get("final_layer.linear.weight")
    info = describe_dit(state)
    learn_sigma = cfg.get("learn_sigma")
    if learn_sigma is None:
        learn_sigma = True if final is None else final.shape[0] // info["patch_size"] ** 2 == 2 * info["in_channels"]
    out = {"prediction": str(cfg.get("prediction", "epsilon")), "learn_sigma": bool(learn_sigma),
           "noise_schedule": "linear", "diffusion_steps": 1000, "recorded": False}
    if not str(dit_path).startswith(PRETRAINED_PREFIX):
        train_cfg = read_train_config(dit_path) or {}
        diff = train_cfg.get("diffusion") or {}
        if "noise_schedule" in diff or "diffusion_steps" in diff:
            out["noise_schedule"] = str(diff.get("noise_schedule", "linear"))
            out["diffusion_steps"] = int(diff.get("diffusion_steps", 1000))
            out["recorded"] = True
            out["data_source"] = (train_cfg.get("data") or {}).get("source")
    return out


def router_target_share(model: nn.Module) -> float:
    """1/N of the first chunking stage: the kept share the ratio loss trains towards."""
    n = dict(getattr(model, "config", {}) or {}).get("downsample_factor", 4.0)
    n = float(n[0] if isinstance(n, (list, tuple)) else n)
    if n <= 1:
        raise ValueError(f"downsample_factor must exceed 1 to calibrate the router, got {n}")
    return 1.0 / n


def calibration_images(data, model: nn.Module, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded random (image, label) pairs of the data source ``data`` (a DataConfig), in model space.

    The source is read at the model's input size and channel count (latent
    sources as stored); a data set whose shape still differs is a ValueError.
    """
    info = model_info(model)
    if data.source != "latents":
        data = dataclasses.replace(data, image_size=data.image_size or info["input_hw"][0],
                                   channels=data.channels or info["in_channels"])
    ds = build_dataset(data)
    if len(ds) == 0:
        raise ValueError(f"calibration data source {data.source!r} holds no images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([torch.as_tensor(it[0], dtype=torch.float32) for it in items])
    y = torch.tensor([int(it[1]) for it in items]) % info["num_classes"]
    want = (info["in_channels"], *info["input_hw"])
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"calibration data {data.source!r} gives {tuple(x.shape[1:])} images, the model takes "
                         f"{want}: set its image size / channels to the model's")
    return x, y


@torch.no_grad()
def calibrate_router(model: nn.Module, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                     target_share: Optional[float] = None, noise_schedule: str = "linear",
                     diffusion_steps: int = 1000, num_timesteps: int = 8, batch: int = 16, seed: int = 0) -> dict:
    """Set the first router's output bias so ``model`` keeps about ``target_share`` (default 1/N) of its tokens.

    The share is the natural kept share (before tail dropping) over
    ``num_timesteps`` timesteps evenly spread over [0, T-1], ``batch`` inputs
    each: data ``images`` noised to each timestep by the forward process when
    given (``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``), else pure noise.

    The bias of the router's last conv shifts every logit equally, so one
    forward pass per timestep gives each token's bias-free score ``s`` (a
    hook on that conv); a token is kept iff ``s + bias > 0`` (p > 0.5), the
    first and last always. The bias is set midway between the scores that
    keep the target count, and the share is then measured by a real forward
    pass: that measurement is the returned ``kept_share``. Returns
    ``{"target", "kept_share", "bias", "on", "timesteps"}``.
    """
    m = unwrap(model)
    conv = getattr(getattr(getattr(m, "routing_module", None), "residual_scorer", None), "__getitem__", None)
    if conv is None or getattr(m.routing_module, "spatial_dims", 2) != 2:
        raise ValueError(f"{type(m).__name__} has no 2D first-stage router to calibrate")
    conv = m.routing_module.residual_scorer[-1]
    target = router_target_share(m) if target_share is None else float(target_share)
    if not 0 < target < 1:
        raise ValueError(f"target kept share must lie in (0, 1), got {target}")
    info = model_info(m)
    device = next(m.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ts = np.unique(np.linspace(0, diffusion_steps - 1, num_timesteps).round().astype(int))
    abar = np.cumprod(1.0 - get_named_beta_schedule(noise_schedule, diffusion_steps))
    if images is not None and len(images) == 0:
        raise ValueError("no calibration images given")
    if labels is None and images is not None:
        labels = torch.arange(len(images)) % info["num_classes"]
    n = batch if images is None else min(batch, len(images))
    eps = torch.randn(len(ts), n, info["in_channels"], *info["input_hw"], generator=g)
    inputs = []
    for i, t in enumerate(ts):
        if images is None:
            x_t, y = eps[i], torch.arange(n) % info["num_classes"]
        else:  # each timestep noises its own slice of the images (all of them are used when there are enough)
            idx = (torch.arange(n) + i * n) % len(images)
            x0, y = images[idx].float(), labels[idx].long()
            x_t = float(np.sqrt(abar[t])) * x0 + float(np.sqrt(1.0 - abar[t])) * eps[i]
        inputs.append((x_t.to(device), torch.full((n,), int(t), device=device), y.to(device)))

    def kept_share() -> float:
        vals = [m(x_t, t, y)[1][0].kept_share(natural=True).mean().item() for x_t, t, y in inputs]
        return float(np.mean(vals))

    scores = []
    hook = conv.register_forward_hook(lambda mod, args, out: scores.append(
        (out.float() - mod.bias.float().view(1, -1, *([1] * (out.dim() - 2)))).reshape(out.shape[0], -1)))
    was_training = m.training
    m.eval()
    try:
        for x_t, t, y in inputs:
            m(x_t, t, y)
        hook.remove()
        s = torch.cat(scores)[:, 1:-1].reshape(-1).double()  # the first and last tokens are kept anyway
        L = scores[0].shape[1]
        k = int(round(min(max(target * L - 2, 0.0), L - 2) / (L - 2) * len(s)))  # free tokens to keep
        top = torch.sort(s, descending=True).values
        if k <= 0:
            bias = -float(top[0]) - 1.0
        elif k >= len(s):
            bias = -float(top[-1]) + 1.0
        else:
            bias = -0.5 * float(top[k - 1] + top[k])
        conv.bias.fill_(bias)
        reached = kept_share()
    finally:
        hook.remove()
        m.train(was_training)
    return {"target": target, "kept_share": reached, "bias": bias, "on": "noise" if images is None else "data",
            "timesteps": [int(t) for t in ts]}


def upcycle(dit_path: str | Path, preset: str, overrides: Optional[dict] = None, which: str = "ema",
            trust_pickle: bool = False, calibrate: bool = True, data=None, images: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None, target_share: Optional[float] = None,
            calibration_size: int = 64, seed: int = 0, allow_nonfinite: bool = False) -> tuple[nn.Module, dict]:
    """A DC-DiT from ``preset`` (+ ``overrides``) whose main network starts from the DiT at ``dit_path``.

    input_size, in_channels, num_classes and the diffusion settings
    (``prediction``, ``learn_sigma``) default to the DiT's. With ``calibrate``
    the router is set to keep ``target_share`` (default 1/N) of the tokens
    (:func:`calibrate_router`): on ``images`` / ``labels`` when given, else on
    ``calibration_size`` images of the data source ``data`` (a DataConfig)
    when given, else on noise. Returns (model, summary); the summary's
    ``diffusion`` says which settings were carried over (the noise schedule
    is the DiT run's when its training config records one) and ``router``
    what the calibration reached. A DiT holding NaN or inf is refused unless ``allow_nonfinite``.
    """
    state, dit_cfg = load_dit_state(dit_path, which=which, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite)
    info = describe_dit(state)
    diffusion = dit_diffusion_settings(dit_path, state, dit_cfg)
    defaults = {"in_channels": info["in_channels"], "prediction": diffusion["prediction"],
                "learn_sigma": diffusion["learn_sigma"]}
    if "input_size" in info:
        defaults["input_size"] = info["input_size"]
    if dit_cfg is not None:
        defaults["num_classes"] = dit_cfg["num_classes"]
        defaults["class_dropout_prob"] = dit_cfg.get("class_dropout_prob", 0.1)
    else:  # released DiTs: one extra (null) row in the label table
        defaults["num_classes"] = info["table_rows"] - 1
    model = build_dcdit(preset, **{**defaults, **(overrides or {})})
    summary = upcycle_into(model, state, dit_cfg)
    summary["diffusion"] = diffusion
    summary["router"] = None
    if calibrate:
        if images is None and data is not None:
            images, labels = calibration_images(data, model, calibration_size, seed)
        summary["router"] = calibrate_router(model, images, labels, target_share=target_share,
                                             noise_schedule=diffusion["noise_schedule"],
                                             diffusion_steps=diffusion["diffusion_steps"], seed=seed)
        if images is not None and data is not None:
            summary["router"]["data"] = data.source
    return model, summary
