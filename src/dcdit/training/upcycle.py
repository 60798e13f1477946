"""Upcycling: start a DC-DiT's main network from a trained DiT.

With the innermost stage as wide and deep as the DiT, the DiT's
``blocks.{i}.*`` become the main network's i-th DiT block (same parameter
names and shapes), and the timestep / label embedders copy over. Everything
else (stem, encoder, router, residual projection, decoder, norms, final
layer) keeps its fresh initialisation; the positional table is regenerated
for DC-DiT's full token grid.

Sources: a released DiT ``.pt`` (bare state dict or with an ``ema`` entry,
read with ``weights_only=True``), a ``.safetensors`` file, or a dcdit model /
run directory holding a DiT.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
COPIED_PREFIXES = ("t_embedder.", "y_embedder.")


def load_dit_state(path: str | Path, which: str = "ema", trust_pickle: bool = False,
                   allow_nonfinite: bool = False) -> tuple[dict, Optional[dict]]:
    """(DiT state dict, its dcdit config if known) from a .pt / .safetensors file or a model/run dir.

    Weights holding NaN or inf are refused (NonFiniteError) unless ``allow_nonfinite``.
    """
    from dcdit.checkpoint import CONFIG_NAME, check_finite, load_pickle_state_dict, load_safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    if path.is_dir():
        from dcdit.checkpoint import load_model
        from dcdit.models import model_config

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


def describe_dit(state: dict) -> dict:
    """Shape facts of a DiT state dict: hidden, depth, num_classes, in_channels, patch_size, input_size."""
    need = ("t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "x_embedder.proj.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict: missing {', '.join(missing)}")
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError("not a DiT state dict: no contiguous blocks.{i}.* entries")
    proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
    out = {
        "hidden_size": int(state["t_embedder.mlp.0.weight"].shape[0]),
        "depth": len(blocks),
        "in_channels": int(proj.shape[1]),
        "patch_size": int(proj.shape[-1]),
        "table_rows": int(state["y_embedder.embedding_table.weight"].shape[0]),
    }
    if "pos_embed" in state:
        out["input_size"] = int(round(math.sqrt(state["pos_embed"].shape[1]))) * out["patch_size"]
    return out


def main_network_blocks(model: nn.Module) -> tuple[str, list[int]]:
    """(module path of the innermost block stack, indices of its DiT blocks)."""
    from dcdit.models.dcdit import DCStage
    from dcdit.models.layers import DiTBlock

    prefix, node = "", model
    while isinstance(node, DCStage):
        prefix += "main_network."
        node = node.main_network
    layers = getattr(node, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the main network's block stack in {type(model).__name__}")
    return prefix + "layers.", [j for j, layer in enumerate(layers) if isinstance(layer, DiTBlock)]


def _expected_heads(hidden: int) -> Optional[int]:
    from dcdit.models.dit import DIT_CONFIGS

    heads = {c["hidden_size"]: c["num_heads"] for c in DIT_CONFIGS.values()}
    return heads.get(hidden)


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
    heads = (dit_config or {}).get("num_heads") or _expected_heads(info["hidden_size"])
    if heads is not None and main_heads is not None and heads != main_heads:
        raise ValueError(f"head count mismatch: the DiT uses {heads} heads, the DC-DiT main network {main_heads}")

    mapping = {}
    for key in dit_state:
        m = _BLOCK_RE.match(key)
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


def upcycle(dit_path: str | Path, preset: str, overrides: Optional[dict] = None, which: str = "ema",
            trust_pickle: bool = False, allow_nonfinite: bool = False) -> tuple[nn.Module, dict]:
    """A DC-DiT from ``preset`` (+ ``overrides``) whose main network starts from the DiT at ``dit_path``.

    input_size, in_channels and num_classes default to the DiT's. Returns (model, summary).
    A DiT holding NaN or inf is refused unless ``allow_nonfinite``.
    """
    from dcdit.models.dcdit import build_dcdit

    state, dit_cfg = load_dit_state(dit_path, which=which, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite)
    info = describe_dit(state)
    defaults = {"in_channels": info["in_channels"]}
    if "input_size" in info:
        defaults["input_size"] = info["input_size"]
    if dit_cfg is not None:
        defaults["num_classes"] = dit_cfg["num_classes"]
        defaults["class_dropout_prob"] = dit_cfg.get("class_dropout_prob", 0.1)
    else:  # released DiTs: one extra (null) row in the label table
        defaults["num_classes"] = info["table_rows"] - 1
    model = build_dcdit(preset, **{**defaults, **(overrides or {})})
    summary = upcycle_into(model, state, dit_cfg)
    return model, summary
