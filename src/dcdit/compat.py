"""Checkpoints of the reference DC-DiT implementation (AMD-AGI/DynamicChunkingDiT), both ways.

The reference nests its stages in an H-Net module: ``hnet.encoder.*``,
``hnet.routing_module.*``, ``hnet.residual_proj.*``, ``hnet.decoder.*`` and
the innermost blocks under ``hnet.main_network.main_network.layers.{i}.*``;
embedders, ``pos_embed`` and ``final_layer`` sit at the top. Here the
stage-0 parts are top-level modules and the innermost block stack is
``main_network`` itself, so the mapping drops the ``hnet.`` prefix and one
``main_network.`` level at the innermost stage. Sub-module names are the same.

Its configuration is a nested dict (``model.hnet.*`` plus data/training
fields, see :func:`config_from_reference`). Its training checkpoints
(``{"model", "ema", "opt", "config"}``) pickle the config as a dataclass;
:func:`read_reference_checkpoint` reads them with ``torch.load(weights_only=True)``,
admitting only inert stand-ins for the config classes.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Optional, Union

import torch

from dcdit.models.config import DCDiTConfig
from dcdit.models.dcdit import DCDiT
from dcdit.utils import unwrap

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_INNER = ("layers.", "rmsnorm.")
_HNET_FIELDS = ("arch_layout", "d_model", "num_heads", "enc_dec_dim_factor", "dechunk_kernel_sigma", "fp32_router_dechunk")


# --------------------------------------------------------------------------- #
#                                   Config                                    #
# --------------------------------------------------------------------------- #

def config_from_reference(ref: Union[dict, DCDiTConfig], reference_numerics: bool = True) -> DCDiTConfig:
    """A :class:`DCDiTConfig` from the reference's config as a plain dict.

    Accepts the fixture/flat form (``{"model": {"hnet": ..., "mlp_ratio"},
    "input_size", "in_channels", "num_classes", "class_dropout_prob",
    "learn_sigma", "downsample_factor"}``), the reference's full ``Config``
    as a dict (``model``/``data``/``training`` sections; latent size =
    ``data.image_size // 8``, 4 channels), or a DC-DiT config (returned as is).
    ``reference_numerics`` sets ``attn_qkv_bf16`` (the reference rounds q, k, v
    to bf16 before attention even in fp32 runs).
    """
    if isinstance(ref, DCDiTConfig):
        return ref
    if not isinstance(ref, dict):
        raise ValueError(f"reference config must be a dict, got {type(ref).__name__}")
    if "model" not in ref:  # already one of ours
        return DCDiTConfig.from_dict(ref)
    model = ref["model"] or {}
    hnet = model.get("hnet") or {}
    if not isinstance(model, dict) or not isinstance(hnet, dict):
        raise ValueError("reference config: 'model' and 'model.hnet' must be dicts")
    unknown = sorted(set(hnet) - set(_HNET_FIELDS) - {"tie_embeddings"})
    if unknown:
        raise ValueError(f"unknown reference hnet config key(s): {', '.join(unknown)}")
    kw: dict[str, Any] = {k: hnet[k] for k in _HNET_FIELDS if k in hnet}
    kw["attn_qkv_bf16"] = bool(reference_numerics)
    if "mlp_ratio" in model:
        kw["mlp_ratio"] = model["mlp_ratio"]
    data, training = ref.get("data") or {}, ref.get("training") or {}
    if "image_size" in data:
        kw["input_size"] = int(data["image_size"]) // 8
    if "num_classes" in data:
        kw["num_classes"] = data["num_classes"]
    for k in ("class_dropout_prob", "learn_sigma", "downsample_factor"):
        if k in training:
            kw[k] = training[k]
    for k in ("input_size", "in_channels", "num_classes", "class_dropout_prob", "learn_sigma", "downsample_factor"):
        if k in ref:
            kw[k] = ref[k]
    return DCDiTConfig(**kw)


def config_to_reference(config: Union[DCDiTConfig, dict]) -> dict:
    """The reference's flat config dict (fixture form) for a DC-DiT config; raises if it has no equivalent."""
    cfg = config if isinstance(config, DCDiTConfig) else DCDiTConfig.from_dict(config)
    default = DCDiTConfig()
    for k in ("patch_size", "norm_groups", "router_norm_groups"):
        if getattr(cfg, k) != getattr(default, k):
            raise ValueError(f"the reference has no equivalent of {k} = {getattr(cfg, k)!r}")
    if cfg.input_hw[0] != cfg.input_hw[1]:
        raise ValueError(f"the reference supports square inputs only, got {cfg.input_hw}")
    return {
        "model": {
            "name": "DC-DiT",
            "hnet": {**{k: getattr(cfg, k) for k in _HNET_FIELDS}, "tie_embeddings": False},
            "mlp_ratio": cfg.mlp_ratio,
        },
        "input_size": cfg.input_hw[0], "in_channels": cfg.in_channels, "num_classes": cfg.num_classes,
        "class_dropout_prob": cfg.class_dropout_prob, "learn_sigma": cfg.learn_sigma,
        "downsample_factor": cfg.downsample_factor,
    }


# --------------------------------------------------------------------------- #
#                                 State dicts                                 #
# --------------------------------------------------------------------------- #

def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _from_reference_key(key: str, n_chunk: int) -> str:
    key = _strip_wrappers(key)
    if not key.startswith("hnet."):
        return key
    rest = key[len("hnet."):]
    if "pad_dimension" in rest:
        raise ValueError(f"reference key {key!r}: stages that widen with pad_dimension are not supported")
    k = 0
    while rest.startswith("main_network."):
        rest, k = rest[len("main_network."):], k + 1
    if rest.startswith(_INNER) and k == n_chunk + 1:  # innermost Isotropic: one level less here
        k -= 1
    return "main_network." * k + rest


def _to_reference_key(key: str, n_chunk: int) -> Optional[str]:
    if key.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "final_layer.")) or key == "pos_embed":
        return key
    rest, k = key, 0
    while rest.startswith("main_network."):
        rest, k = rest[len("main_network."):], k + 1
    if rest.startswith(_INNER) and k == n_chunk:
        k += 1
    return "hnet." + "main_network." * k + rest


def convert_reference_state_dict(state_dict: dict, config: Union[DCDiTConfig, dict]) -> dict:
    """Reference key names -> this package's (wrapper prefixes such as ``module.`` are stripped)."""
    cfg = config_from_reference(config)
    return {_from_reference_key(k, cfg.num_chunk_stages): v for k, v in state_dict.items()}


def load_reference_dcdit(
    state_dict: dict,
    config: Union[DCDiTConfig, dict],
    strict: bool = True,
    reference_numerics: bool = True,
) -> DCDiT:
    """A :class:`DCDiT` holding the weights of a reference checkpoint.

    ``state_dict``: the reference's ``model.state_dict()`` (or a training
    checkpoint's ``model``/``ema`` entry); ``config``: its config as a plain
    dict (see :func:`config_from_reference`) or a :class:`DCDiTConfig`.
    Missing or unexpected keys raise ValueError naming them. With
    ``reference_numerics`` (default) attention rounds q, k, v to bf16 as the
    reference does, so outputs match it to ~1e-5 in fp32.
    """
    cfg = config_from_reference(config, reference_numerics)
    model = DCDiT(cfg)
    sd = convert_reference_state_dict(state_dict, cfg)
    own = model.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(
                "reference state dict does not match the config: "
                + (f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} " if missing else "")
                + (f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}" if unexpected else "")
            )
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=strict)
    return model


def export_reference_state_dict(model: DCDiT) -> dict:
    """The model's weights under the reference's key names (loadable by the reference with strict=True)."""
    model = unwrap(model)
    n_chunk = model.cfg.num_chunk_stages
    return {_to_reference_key(k, n_chunk): v for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- #
#                           Reference checkpoints                             #
# --------------------------------------------------------------------------- #

def _stub_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name})


def _plain(obj: Any) -> Any:
    """Stand-in objects -> nested plain dicts (their recorded attributes)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if hasattr(obj, "__dict__") and not torch.is_tensor(obj):
        return {k: _plain(v) for k, v in vars(obj).items()}
    return obj


def read_reference_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Read a reference ``.pt`` file with ``torch.load(weights_only=True)``.

    Returns ``{"model": ..., "ema": ..., "config": dict or None}`` for
    training checkpoints, ``{"model": state_dict, "ema": None, "config": None}``
    for a bare state dict. Pickled config dataclasses are read into plain
    dicts through inert stand-in classes (no code from the file runs); when
    even that fails, ``config`` is None and must be supplied by the caller.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            stubs = [_stub_class(n) for n in names]
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if obj is None:  # the config is an object we cannot stand in for: load the tensors only
            raise ValueError(
                f"{path}: the checkpoint pickles objects that weights_only loading refuses; "
                "export its state dict and pass the config separately"
            )
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "model" in obj or "ema" in obj:
        cfg = obj.get("config")
        cfg = _plain(cfg) if cfg is not None else None
        return {"model": obj.get("model"), "ema": obj.get("ema"), "config": cfg if isinstance(cfg, dict) else None}
    return {"model": obj, "ema": None, "config": None}


def load_reference_checkpoint(
    path: Union[str, os.PathLike],
    config: Union[DCDiTConfig, dict, None] = None,
    use_ema: bool = True,
    reference_numerics: bool = True,
) -> DCDiT:
    """Build a DCDiT from a reference checkpoint file (EMA weights by default, as the reference samples).

    ``config`` overrides the one stored in the file; it is required when the
    file has none that can be read safely.
    """
    ckpt = read_reference_checkpoint(path)
    config = config if config is not None else ckpt["config"]
    if config is None:
        raise ValueError(f"{path}: no readable config in the checkpoint; pass config= (the reference's config as a dict)")
    sd = ckpt["ema"] if use_ema and ckpt["ema"] is not None else ckpt["model"]
    if sd is None:
        raise ValueError(f"{path}: the checkpoint holds neither 'model' nor 'ema' weights")
    return load_reference_dcdit(sd, config, reference_numerics=reference_numerics)
