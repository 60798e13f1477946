"""Training checkpoints: everything needed to continue a run exactly.

A run directory holds::

    config.yaml                 the resolved training config
    metrics.jsonl               one JSON record per log interval
    latest                      text file naming the newest checkpoint, e.g. "ckpt-0001000"
    ckpt-0001000/
        config.json             model config        } a dcdit model directory:
        model.safetensors       raw weights         } `dcdit sample --ckpt` and
        ema.safetensors         EMA weights (fp32)  } `load_model` read it directly
        train_state.safetensors optimizer tensors + RNG state tensors
        train_state.json        step, optimizer hyper-parameters, RNG scalars, data position
        train_config.yaml       the training config at save time

No pickles: tensors go to safetensors, the rest to JSON. A checkpoint is
written into a hidden temporary directory and renamed into place, and only
then does ``latest`` move (also an atomic rename), so a crash mid-save leaves
the previous checkpoint intact and ``latest`` pointing at it.

A checkpoint holding NaN or inf is never written (:func:`save_checkpoint`
raises before touching the run directory) and never resumed from
(:func:`load_checkpoint` raises), so ``latest`` always names a finite one, and
pruning, which keeps ``latest`` and the newest, never trades the newest finite
checkpoint for a broken one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from dcdit.checkpoint import check_finite, load_safetensors, save_model_dir, save_safetensors
from dcdit.utils import NonFiniteError, atomic_write, first_nonfinite, save_json, unwrap

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
LATEST = "latest"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:07d}"


# ---------------------------------------------------------------- RNG state


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json-able scalars) of the torch CPU/CUDA, numpy and python RNGs."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))


# ---------------------------------------------------------------- optimizer state


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors named ``optim.<param>.<name>``, JSON for the rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    config_yaml: str,
    extra: Optional[dict] = None,
    keep_last_k: int = 0,
) -> Path:
    """Write ``run_dir/ckpt-{step:07d}`` atomically, move ``latest`` onto it, prune old checkpoints.

    Raises :class:`~dcdit.utils.NonFiniteError`, writing nothing, when the weights, EMA or
    optimizer state hold NaN or inf.
    """
    run_dir = Path(run_dir)
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    check_state_finite(run_dir, step, model, ema, opt_tensors)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / ckpt_name(step)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model_dir(tmp, model, ema)
        rng_tensors, rng_meta = capture_rng()
        save_safetensors(tmp / STATE_TENSORS, {**opt_tensors, **rng_tensors})
        atomic_write(tmp / "train_config.yaml", lambda p: Path(p).write_text(config_yaml))
        # The JSON goes last: a checkpoint directory without it is incomplete.
        save_json(tmp / STATE_JSON, {"step": int(step), "optimizer": opt_meta, "rng": rng_meta, **(extra or {})})
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old copy aside first
            old = run_dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(run_dir / LATEST, lambda p: Path(p).write_text(final.name + "\n"))
    if keep_last_k > 0:
        prune_checkpoints(run_dir, keep_last_k)
    return final


def check_state_finite(run_dir: str | os.PathLike, step: int, model: nn.Module, ema: nn.Module,
                       optimizer: torch.optim.Optimizer | dict) -> None:
    """Raise :class:`~dcdit.utils.NonFiniteError` when the weights, EMA or optimizer state (an optimizer,
    or its tensors as :func:`flatten_optimizer` gives them) hold NaN or inf: the checkpoint is not written."""
    opt = flatten_optimizer(optimizer.state_dict())[0] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    for what, tensors in (("model", unwrap(model).state_dict()), ("ema", unwrap(ema).state_dict()), ("optimizer", opt)):
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise NonFiniteError(f"step {step}: the {what} state holds NaN or inf (first in {bad}): not saving "
                                 f"a checkpoint; {Path(run_dir) / LATEST} still names the last finite one")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_JSON).exists()]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last_k: int) -> None:
    """Delete all but the newest ``keep_last_k`` checkpoints (never the one ``latest`` names)."""
    run_dir = Path(run_dir)
    latest = _read_latest(run_dir)
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last_k)]:
        if p.name != latest:
            _remove_dir(p)


def _remove_dir(p: Path) -> None:
    """Rename to a hidden ``.old-`` name, then delete: a kill mid-delete leaves what clean_stale removes."""
    old = p.parent / f".old-{p.name}-{os.getpid()}"
    try:
        os.replace(p, old)
    except OSError:
        old = p
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a crashed save or prune left: temporary directories, and checkpoint
    directories without their train_state.json (a checkpoint is renamed into place
    complete, so such a directory can only be one whose deletion was cut short).
    Returns the paths removed. Call it only while holding the run directory's lock.
    """
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if not p.is_dir() or p.is_symlink():
                continue
            if p.name.startswith((".tmp-ckpt-", ".old-ckpt-")) or (CKPT_RE.match(p.name) and not (p / STATE_JSON).exists()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------- load


def _read_latest(run_dir: Path) -> Optional[str]:
    p = run_dir / LATEST
    if p.is_symlink():
        return Path(os.readlink(p)).name
    if p.is_file():
        return p.read_text().strip() or None
    return None


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a path means: a checkpoint dir itself, or a run dir's ``latest`` (else its newest).

    None when there is none (also when ``path`` does not exist).
    """
    path = Path(path)
    if not path.exists():
        return None
    if (path / STATE_JSON).exists():
        return path
    name = _read_latest(path)
    if name is not None:
        ckpt = path / name
        if not (ckpt / STATE_JSON).exists():
            raise FileNotFoundError(f"{path / LATEST} names {name}, but {ckpt} is missing or incomplete")
        return ckpt
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt_dir: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Read a checkpoint directory: model config and weights, EMA, optimizer and RNG state, step.

    Truncated or corrupt files raise ValueError naming the file; weights, EMA or optimizer
    state holding NaN or inf raise :class:`~dcdit.utils.NonFiniteError` naming the file and
    tensor (unless ``allow_nonfinite``).
    """
    ckpt_dir = Path(ckpt_dir)
    for name in ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON):
        if not (ckpt_dir / name).exists():
            raise FileNotFoundError(f"incomplete checkpoint {ckpt_dir}: {name} is missing")

    def read_json(p: Path) -> dict:
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt checkpoint file {p}: {e}") from None

    meta = read_json(ckpt_dir / STATE_JSON)
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint file {ckpt_dir / STATE_JSON}: expected a JSON object, "
                         f"got {type(meta).__name__}")
    missing = [k for k in ("step", "optimizer", "rng") if k not in meta]
    if missing:
        raise ValueError(f"corrupt checkpoint file {ckpt_dir / STATE_JSON}: no {', '.join(map(repr, missing))} entry")
    if not isinstance(meta["step"], int) or meta["step"] < 0:
        raise ValueError(f"corrupt checkpoint file {ckpt_dir / STATE_JSON}: 'step' must be an integer >= 0, "
                         f"got {meta['step']!r}")
    model_config = read_json(ckpt_dir / "config.json")
    if not isinstance(model_config, dict):
        raise ValueError(f"corrupt checkpoint file {ckpt_dir / 'config.json'}: expected a JSON object, "
                         f"got {type(model_config).__name__}")
    tensors = load_safetensors(ckpt_dir / STATE_TENSORS)
    ema_path = ckpt_dir / "ema.safetensors"
    try:
        optimizer = unflatten_optimizer(tensors, meta["optimizer"])
        rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        if "rng.torch" not in rng_tensors or not {"numpy", "python"} <= set(meta["rng"]):
            raise KeyError("rng")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"corrupt checkpoint {ckpt_dir}: optimizer or RNG state in {STATE_JSON} / "
                         f"{STATE_TENSORS} is incomplete ({what})") from None
    model = load_safetensors(ckpt_dir / "model.safetensors")
    ema = load_safetensors(ema_path) if ema_path.exists() else None
    if not allow_nonfinite:
        hint = f"; resume from an earlier checkpoint of {ckpt_dir.parent} (its ckpt-* directories)"
        for path, tensors in ((ckpt_dir / "model.safetensors", model), (ema_path, ema or {}),
                              (ckpt_dir / STATE_TENSORS, {k: v for k, v in tensors.items() if k.startswith("optim.")})):
            check_finite(tensors, path, hint)
    return {
        "dir": ckpt_dir,
        "step": int(meta["step"]),
        "meta": meta,
        "model_config": model_config,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "rng_tensors": rng_tensors,
        "rng_meta": meta["rng"],
    }
