"""Safe, atomic model checkpoints.

Format (a *model directory*)::

    config.json          {"arch": ..., ...}  (see dcdit.models.factory)
    model.safetensors    raw weights
    ema.safetensors      EMA weights (optional; preferred for sampling)

Pickled ``.pt`` files (the released DiT checkpoints, reference DC-DiT
training checkpoints) are read with ``torch.load(weights_only=True)``; only
``trust_pickle=True`` lifts that.

Weights holding NaN or inf (the output of a diverged run) are refused with
one line naming the file and the first bad tensor; ``allow_nonfinite=True``
(the CLI's ``--allow-nonfinite``) loads them anyway, e.g. to inspect them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dcdit.models.dit import describe_dit, registry_num_heads
from dcdit.models.factory import build_model, model_config
from dcdit.pretrained import resolve_pretrained
from dcdit.utils import NonFiniteError, atomic_write, first_nonfinite, save_json, unwrap

CONFIG_NAME = "config.json"
ALLOW_HINT = "; pass --allow-nonfinite to load it anyway (e.g. to inspect it)"


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_safetensors(path: str | os.PathLike, state_dict: dict, metadata: Optional[dict] = None) -> None:
    atomic_write(path, lambda tmp: save_file(_contiguous(state_dict), tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from None


def check_finite(state: dict, source, hint: str = ALLOW_HINT) -> None:
    """Raise :class:`NonFiniteError` naming ``source`` and the first tensor of ``state`` holding NaN or inf."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteError(f"{source} holds non-finite weights (NaN or inf), first in {bad}: it comes from a "
                             f"diverged run; use an earlier checkpoint{hint}")


def save_model_dir(directory: str | os.PathLike, model: nn.Module, ema: Optional[nn.Module] = None) -> Path:
    """Write config.json + model.safetensors (+ ema.safetensors) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / "model.safetensors", unwrap(model).state_dict())
    if ema is not None:
        save_safetensors(directory / "ema.safetensors", unwrap(ema).state_dict())
    save_json(directory / CONFIG_NAME, model_config(model))
    return directory


def load_pickle_state_dict(path: str | os.PathLike, trust_pickle: bool = False, prefer: str = "ema") -> dict:
    """State dict from a ``.pt``: bare, or under "ema"/"model"/"state_dict" (``prefer`` first)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # truncated zip, unpickling refused, ...
        raise ValueError(f"cannot read checkpoint {path}: {_torch_load_problem(e, trust_pickle)}") from None
    if isinstance(obj, dict):
        for key in (prefer, "ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path} holds no recognisable state dict (expected tensors, or an 'ema'/'model' entry)")


def _torch_load_problem(e: Exception, trust_pickle: bool) -> str:
    """One line for why ``torch.load`` refused a file (PyTorch's own text is a page that advises
    ``weights_only=False``, which dcdit never does on its own)."""
    text = str(e)
    if "Weights only load failed" in text:  # a pickle holding more than tensors and plain containers
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please|\n\n|$)", text, re.S)
        what = " ".join(m.group(1).split()) if m else "objects beyond tensors"
        return (f"it is a pickle holding more than tensors ({what}), which dcdit reads only with "
                "weights_only=True: re-save its state dict of tensors (or pass --trust-pickle where a command "
                "takes it, only for files you trust)")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return f"not a PyTorch checkpoint ({type(e).__name__}: {first[:200]})"


def infer_config(state: dict, path: str | os.PathLike = "weights") -> dict:
    """A model config read off a DiT state dict in the original (facebookresearch/DiT) format.

    Widths, depth, patch size, channels, input size (from ``pos_embed``),
    ``learn_sigma`` and ``mlp_ratio`` come from the tensor shapes; the class
    count is the label table's rows minus the null-class row; the head count,
    which no shape carries, is the DiT registry's for that width (S/B/L/XL).
    Raises ValueError saying what is missing for anything else.
    """
    try:
        info = describe_dit(state)
    except ValueError as e:
        raise ValueError(f"no model config for {path} and its weights are {str(e)[0].lower() + str(e)[1:]}: "
                         f"put a {CONFIG_NAME} beside it (dcdit model directories carry one)") from None
    hidden = info["hidden_size"]
    heads = registry_num_heads(hidden)
    if heads is None:
        raise ValueError(f"no model config for {path}: a DiT of width {hidden} is no registry size "
                         f"(S/B/L/XL), so its head count is unknown; put a {CONFIG_NAME} beside it")
    if "input_size" not in info:
        raise ValueError(f"no model config for {path}: the DiT state dict has no pos_embed to read the "
                         f"input size from; put a {CONFIG_NAME} beside it")
    final = state.get("final_layer.linear.weight")
    out_channels = 2 * info["in_channels"] if final is None else final.shape[0] // info["patch_size"] ** 2
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return {
        "arch": "dit", "input_size": info["input_size"], "patch_size": info["patch_size"],
        "in_channels": info["in_channels"], "hidden_size": hidden, "depth": info["depth"], "num_heads": heads,
        "mlp_ratio": 4.0 if fc1 is None else fc1.shape[0] / hidden, "class_dropout_prob": 0.1,
        "num_classes": info["table_rows"] - 1, "learn_sigma": out_channels == 2 * info["in_channels"],
    }


def load_model(
    path: str | os.PathLike,
    which: str = "ema",
    config: Optional[dict] = None,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a model from a model directory, a run directory, a weights file, or ``pretrained:NAME``.

    ``which`` = "ema" (falls back to "model" when no EMA was saved) or "model".
    A lone weights file takes ``config``, else a config.json beside it, else
    a config inferred from the weights (:func:`infer_config`: original-format
    DiT state dicts such as the released ``DiT-XL-2-256x256.pt``).
    Weights holding NaN or inf raise :class:`~dcdit.utils.NonFiniteError` unless ``allow_nonfinite``.
    """
    if str(path).startswith("pretrained:"):  # a checkpoint shipped with the package
        path = resolve_pretrained(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        # A run directory points at its latest checkpoint, or is itself a model directory.
        latest = path / "latest"
        if not (path / CONFIG_NAME).exists() and latest.exists():
            path = path / latest.read_text().strip() if latest.is_file() else latest.resolve()
        cfg_path = path / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a dcdit model or run directory")
        weights = path / f"{which}.safetensors"
        if not weights.exists():
            weights = path / "model.safetensors"
        state = load_safetensors(weights)
    else:
        cfg_path, weights = path.parent / CONFIG_NAME, path
        state = load_safetensors(path) if path.suffix == ".safetensors" else load_pickle_state_dict(path, trust_pickle, which)
    if not allow_nonfinite:
        check_finite(state, weights)
    if config is None and cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt config file {cfg_path}: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"corrupt config file {cfg_path}: expected a JSON object, got {type(config).__name__}")
    elif config is None:  # a bare weights file, e.g. the released DiT-XL-2-256x256.pt
        config = infer_config(state, path)
    try:
        model = build_model(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot build the model of {path} from its config: {str(e).splitlines()[0]}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every one of them
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        n = len(lines)
        raise ValueError(f"checkpoint {path} does not match its {config.get('arch')} config: "
                         f"{lines[0] if lines else str(e).splitlines()[0]}"
                         + (f" (and {n - 1} more mismatched tensors)" if n > 1 else "")) from None
    missing = [k for k in missing if k != "pos_embed"]  # fixed table, regenerated
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the {config.get('arch')} config: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    return model.to(map_location).eval()
