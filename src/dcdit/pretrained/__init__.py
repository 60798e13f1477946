"""Small pretrained checkpoints shipped inside the package: ``--ckpt pretrained:NAME``.

Each name is a model directory beside this file (``config.json`` +
``ema.safetensors``, the final EMA weights of a benchmark run) listed in
``index.json`` with what it was trained on and how it scored. ``dcdit info``
prints the list; every command that takes a checkpoint accepts
``pretrained:NAME``, as does ``model.init_from`` in a training config.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PREFIX", "PRETRAINED_DIR", "list_pretrained", "resolve_pretrained"]

PREFIX = "pretrained:"
PRETRAINED_DIR = Path(__file__).resolve().parent


def list_pretrained() -> dict[str, dict]:
    """name -> its index entry (description, data, training, measured scores)."""
    index = PRETRAINED_DIR / "index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def resolve_pretrained(spec: str) -> Path:
    """The model directory of ``pretrained:NAME`` (ValueError naming the choices for an unknown name)."""
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    known = list_pretrained()
    if name not in known or not (PRETRAINED_DIR / name / "config.json").is_file():
        raise ValueError(f"unknown pretrained model {name!r}; shipped: {', '.join(sorted(known)) or 'none'}")
    return PRETRAINED_DIR / name
