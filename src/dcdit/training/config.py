"""Training configuration: one YAML file read into typed dataclasses.

A config file has one mapping per section::

    model:       {arch: dcdit, preset: DC-DiT-S-N4, overrides: {...}, init_from: null}
    data:        dcdit.data.DataConfig fields (source, path, image_size, ...)
    diffusion:   {noise_schedule: linear, diffusion_steps: 1000}
    optim:       {lr: 1.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], grad_clip: 1.0}
    train:       {steps, global_batch_size, grad_accum, seed, intervals, precision, ...}
    ratio:       {weight: 0.03, target_N: 4.0, group_size: 16, start_N: null, warmup_steps: 0}
    multibudget: {enabled: false, start_step: 0, fractions: [0.0, 0.1, ..., 0.6]}
    samples:     {interval: 0, num: 16, steps: 25, ...}

Every key is checked: an unknown key or a value of the wrong type raises a
ValueError naming it ("unknown config key 'train.stpes'", "train.steps:
expected int, got 'abc'"). ``_base_: other.yaml`` inherits from another file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dcdit.data.config import DataConfig
from dcdit.models.config import PREDICTIONS
from dcdit.sampling.budget import parse_tail_drop
from dcdit.sampling.guidance import check_cfg_scale
from dcdit.utils import atomic_write

PRECISIONS = ("fp32", "bf16")
ARCHS = ("dit", "dcdit")


@dataclass
class ModelSection:
    # "dit" or "dcdit".
    arch: str = "dcdit"
    # Registry name: "DiT-S/2".."DiT-XL/8" or a DC-DiT preset such as "DC-DiT-S-N4".
    preset: str = "DC-DiT-S-N4"
    # Constructor keyword overrides (e.g. {depth: 2, hidden_size: 64}). input_size,
    # in_channels and num_classes default to the data set's values.
    overrides: dict = field(default_factory=dict)
    # Start from these weights: a model directory (e.g. `dcdit upcycle` output),
    # a run directory or a weights file. Its config.json replaces preset; overrides still apply.
    init_from: Optional[str] = None
    # Which weights of init_from to start from: "ema" (falls back to "model") or "model".
    init_which: str = "ema"
    # Std of the class-label embedding table at init (null: the preset's 0.02, as DiT).
    # 1.0 makes the label as loud as the timestep embedding from step 0, so small
    # models learn class conditioning within a CPU budget (BENCHMARKS.md "Learning speed").
    label_init_std: Optional[float] = None


@dataclass
class DiffusionSection:
    # "linear" (DiT) or "cosine".
    noise_schedule: str = "linear"
    # Training diffusion length T.
    diffusion_steps: int = 1000
    # Weight the MSE term by min(SNR, gamma) / SNR (Min-SNR-gamma, Hang et al. 2023);
    # null: DiT's unweighted MSE. 5.0 is the paper's value.
    min_snr_gamma: Optional[float] = None
    # Clamp that weight, taken on the x0 error (min(SNR, gamma)), from below: clip(SNR, floor,
    # gamma). Under v-prediction Min-SNR leaves the noisiest steps ~1e-4 of the loss, so they
    # hardly train the router; 1.0 gives them v's plain MSE weight there. null: none.
    min_snr_floor: Optional[float] = None
    # What the network predicts: "epsilon" (DiT: the noise), "x0" (the clean image) or
    # "v" (sqrt(abar) * eps - sqrt(1 - abar) * x0). Stored in the model's config, so
    # `dcdit sample` reads the output the same way. null: model.init_from's, else epsilon.
    prediction: Optional[str] = None


@dataclass
class OptimConfig:
    # AdamW peak learning rate (reached after warm-up).
    lr: float = 1e-4
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW epsilon.
    eps: float = 1e-8
    # Clip the global gradient norm to this value (0 or null: no clipping).
    grad_clip: Optional[float] = 1.0
    # Linear learning-rate warm-up from 0 over this many steps (0: none, as DiT).
    warmup_steps: int = 0
    # After warm-up: "constant" (DiT) or "cosine" (decays to lr * min_lr_ratio at train.steps).
    schedule: str = "constant"
    # Final learning rate of the cosine schedule as a fraction of lr.
    min_lr_ratio: float = 0.1


@dataclass
class TrainLoopConfig:
    # Optimizer steps to train for (total, counting steps before a resume).
    steps: int = 400_000
    # Samples per optimizer step over all processes and accumulation micro-steps.
    global_batch_size: int = 256
    # Micro-steps per optimizer step (the global batch is split across them).
    grad_accum: int = 1
    # Seed of the model init, data order, noise, timesteps and label dropout.
    seed: int = 0
    # EMA decay per step (EMA is kept in fp32).
    ema_decay: float = 0.9999
    # Warm the EMA decay up as min(ema_decay, (1 + step) / (10 + step)), so a short
    # run's EMA does not still hold the (zero-initialised) start. false: DiT's constant decay.
    ema_warmup: bool = False
    # Steps between log lines / metrics.jsonl records.
    log_interval: int = 100
    # Steps between checkpoints (a final one is always written).
    ckpt_interval: int = 10_000
    # Keep only the newest k checkpoints (0: keep all).
    keep_last_k: int = 3
    # A step whose loss or gradient norm is NaN or inf is skipped (no optimizer, EMA or
    # schedule update) and counted; this many skipped steps in a row stop the run with an
    # error, keeping its last (finite) checkpoint.
    max_nonfinite_steps: int = 10
    # "fp32" or "bf16" (autocast on CPU and GPU; the model keeps router/dechunk in fp32).
    precision: str = "fp32"
    # Wrap the model with torch.compile.
    compile: bool = False
    # Stop cleanly (with a checkpoint) after this many minutes of training.
    max_minutes: Optional[float] = None
    # "auto" (cuda when available), "cpu", "cuda" or "cuda:K".
    device: str = "auto"
    # CPU threads for torch (null: torch's default). On a machine shared with
    # other jobs, 1 avoids the large slow-down of oversubscribed OpenMP threads.
    num_threads: Optional[int] = None
    # DataLoader worker processes (0: load in the training process).
    num_workers: int = 0
    # Run directory (overridden by --out). null: runs/<config file name>.
    out_dir: Optional[str] = None
    # Show a tqdm progress bar (rank 0).
    progress: bool = True
    # Also log to TensorBoard when it is installed.
    tensorboard: bool = True
    # Also log to Weights & Biases (needs wandb installed); project name.
    wandb: bool = False
    wandb_project: str = "dcdit"
    # DDP: tolerate parameters that get no gradient in a step.
    find_unused_parameters: bool = False


@dataclass
class RatioConfig:
    # Weight of the ratio loss (DC-DiT only; 0 disables it).
    weight: float = 0.03
    # Target compression N per stage (one number for all stages, or a list);
    # null: the model's own downsample_factor (DC-DiT-*-N16 presets: 16).
    target_N: Optional[Union[float, list[float]]] = None
    # Samples per ratio-loss group (null: the whole local batch).
    group_size: Optional[int] = 16
    # Ramp N linearly from this value to target_N over warmup_steps (null: no ramp).
    start_N: Optional[Union[float, list[float]]] = None
    # Length of the N ramp in steps.
    warmup_steps: int = 0


@dataclass
class MultiBudgetConfig:
    # Train with a tail-dropping fraction drawn per step (DC-DiT only).
    enabled: bool = False
    # First step that uses it.
    start_step: int = 0
    # The set the fraction is drawn from, uniformly, identically on all ranks.
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


@dataclass
class SamplesConfig:
    # Steps between EMA sample grids (0: never).
    interval: int = 0
    # Images per grid (classes cycle 0, 1, 2, ...).
    num: int = 16
    # DDIM steps.
    steps: int = 25
    # Classifier-free guidance scale (1.0: none).
    cfg_scale: float = 1.0
    # For latent data: a local VAE folder (diffusers AutoencoderKL, e.g. a copy of
    # stabilityai/sd-vae-ft-ema) to decode with; null skips the grid.
    vae: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    ratio: RatioConfig = field(default_factory=RatioConfig)
    multibudget: MultiBudgetConfig = field(default_factory=MultiBudgetConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    # Name of the run (default: the config file's stem).
    name: Optional[str] = None

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------- validation


def _err(key: str, msg: str) -> ValueError:
    return ValueError(f"{key}: {msg}")


def validate(cfg: TrainConfig) -> None:
    """Range checks across fields; each error names the key."""
    m, t, o, r, mb, s = cfg.model, cfg.train, cfg.optim, cfg.ratio, cfg.multibudget, cfg.samples
    if m.arch not in ARCHS:
        raise _err("model.arch", f"expected one of {', '.join(ARCHS)}, got {m.arch!r}")
    if m.init_which not in ("ema", "model"):
        raise _err("model.init_which", f"expected 'ema' or 'model', got {m.init_which!r}")
    if t.precision not in PRECISIONS:
        raise _err("train.precision", f"expected one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    for key in ("steps", "global_batch_size", "grad_accum", "log_interval", "ckpt_interval", "max_nonfinite_steps"):
        if getattr(t, key) <= 0:
            raise _err(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    for key in ("keep_last_k", "num_workers"):
        if getattr(t, key) < 0:
            raise _err(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if not 0.0 <= t.ema_decay <= 1.0:
        raise _err("train.ema_decay", f"must lie in [0, 1], got {t.ema_decay}")
    if t.num_threads is not None and t.num_threads <= 0:
        raise _err("train.num_threads", f"must be positive, got {t.num_threads}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise _err("train.max_minutes", f"must be positive, got {t.max_minutes}")
    if not 0 < o.lr < float("inf"):
        raise _err("optim.lr", f"must be positive and finite, got {o.lr}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise _err("optim.betas", f"expected two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0:
        raise _err("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.schedule not in ("constant", "cosine"):
        raise _err("optim.schedule", f"expected 'constant' or 'cosine', got {o.schedule!r}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise _err("optim.min_lr_ratio", f"must lie in [0, 1], got {o.min_lr_ratio}")
    if m.label_init_std is not None and not m.label_init_std > 0:
        raise _err("model.label_init_std", f"must be positive or null, got {m.label_init_std}")
    if cfg.diffusion.prediction is not None and cfg.diffusion.prediction not in PREDICTIONS:
        raise _err("diffusion.prediction", f"expected one of {', '.join(PREDICTIONS)}, got {cfg.diffusion.prediction!r}")
    g = cfg.diffusion.min_snr_gamma
    if g is not None and not g > 0:
        raise _err("diffusion.min_snr_gamma", f"must be positive or null, got {g}")
    f = cfg.diffusion.min_snr_floor
    if f is not None and not (g is not None and 0 < f <= g):
        raise _err("diffusion.min_snr_floor", f"must lie in (0, diffusion.min_snr_gamma] (which must be set), got {f}")
    if cfg.diffusion.noise_schedule not in ("linear", "cosine"):
        raise _err("diffusion.noise_schedule", f"expected 'linear' or 'cosine', got {cfg.diffusion.noise_schedule!r}")
    if cfg.diffusion.diffusion_steps <= 0:
        raise _err("diffusion.diffusion_steps", f"must be positive, got {cfg.diffusion.diffusion_steps}")
    if r.weight < 0:
        raise _err("ratio.weight", f"must be >= 0, got {r.weight}")
    for key in ("target_N", "start_N"):
        v = getattr(r, key)
        if v is not None and any(n <= 1 for n in (v if isinstance(v, list) else [v])):
            raise _err(f"ratio.{key}", f"every N must be > 1, got {v}")
    if r.group_size is not None and r.group_size <= 0:
        raise _err("ratio.group_size", f"must be positive, got {r.group_size}")
    if not mb.fractions:
        raise _err("multibudget.fractions", "expected a non-empty list of tail-drop fractions in [0, 1)")
    for i, tail_drop in enumerate(mb.fractions):
        parse_tail_drop(tail_drop, f"multibudget.fractions[{i}]")
    validate_samples(s, cfg.diffusion.diffusion_steps)


def validate_samples(s: SamplesConfig, diffusion_steps: int) -> None:
    """Every ``samples`` key, checked at load as the sampler would check it at the first grid, mid-run."""
    if s.interval < 0:
        raise _err("samples.interval", f"must be >= 0 (0: no grids), got {s.interval}")
    if s.num <= 0:
        raise _err("samples.num", f"must be positive, got {s.num}")
    if not 1 <= s.steps <= diffusion_steps:
        raise _err("samples.steps", f"must be an integer in 1..{diffusion_steps} (diffusion.diffusion_steps), "
                                    f"got {s.steps}")
    check_cfg_scale(s.cfg_scale, "samples.cfg_scale")


# ---------------------------------------------------------------- typed conversion


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (ints widen to float; "1e-4" reads as a float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ValueError as e:
                if "unknown config key" in str(e):
                    raise
                continue
        raise _err(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp)
            return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, key + ".")
    raise _err(key, f"expected {_type_name(tp)}, got {value!r}")


def did_you_mean(key: Any, names, prefix: str = "") -> str:
    """``"; did you mean 'train.steps'?"`` for the closest of ``names`` to a misspelt ``key`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _to_dataclass(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _err(prefix.rstrip(".") or "config", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ValueError(f"unknown config key '{prefix}{k}'{did_you_mean(k, names, prefix)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    """A checked :class:`TrainConfig` from nested plain data."""
    return _to_dataclass(TrainConfig, d)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- files and --set


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"config {path}: _base_ inheritance loops")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(d).__name__}")
    base = d.pop("_base_", None)
    if base is not None:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        d = deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), d)
    return d


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def apply_override(d: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to the nested dict ``d`` in place."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValueError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = d
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"--set {key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def load_train_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    d = _read_yaml(Path(path)) if path is not None else {}
    for assignment in overrides or []:
        apply_override(d, assignment)
    if path is not None and not d.get("name"):
        d["name"] = Path(path).stem
    return config_from_dict(d)


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
