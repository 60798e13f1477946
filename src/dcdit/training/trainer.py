"""The training loop for DiT and DC-DiT.

One loop serves both: the diffusion loss, plus for DC-DiT the ratio loss on
the routing the model returns (the diffusion's ``extras``) and, from a start
step on, multi-budget tail dropping.

Randomness is organised so that runs are reproducible and independent of
how the global batch is split:

* data order: a pure function of ``(seed, step)`` (see ``training/data.py``);
* timesteps, noise and label dropout: drawn for the whole global batch from a
  generator seeded by ``(seed, step)``, each process taking its slice;
* the multi-budget drop fraction: one draw per step from ``(seed, step)``,
  hence identical on all ranks;
* the global torch RNG (anything else random, e.g. data flips) is reseeded
  from ``(seed, step, rank)`` at every step.

So "N steps, resume, M steps" reproduces "N + M steps" exactly on CPU, and
2 processes x batch 4 match 1 process x batch 8 up to float rounding.
Label dropout for classifier-free guidance is therefore applied here (the
model's label embedder's own random dropout is switched off in the training
copy, the probability taken from it), which is the same operation.

A step whose loss (diffusion or ratio term) or gradient norm is NaN or inf is
skipped: no optimizer, EMA or statistics update, its batch consumed and the
step number (of which the data, noise and learning rate are functions) moving
on, so the run equals one that never took that step's update. The decision
reads one number per step, the terms' sum (under DDP summed over the ranks
together with the stop request the loop already agreed on every step), so
every rank skips together; only a non-finite sum is looked at term by term.
``train.max_nonfinite_steps`` skipped steps in a row stop the run with a
:class:`~dcdit.utils.NonFiniteError`, writing nothing: its checkpoints, which
are never written with non-finite tensors, stay as they are.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from dcdit.checkpoint import ALLOW_HINT, load_model
from dcdit.chunking.ratio import ratio_group_size, ratio_targets
from dcdit.data import build_dataset
from dcdit.data.vae import load_vae
from dcdit.diffusion import create_diffusion
from dcdit.models import build_dcdit, build_dit, build_model, is_dcdit, model_config
from dcdit.training import distributed as D
from dcdit.training.config import TrainConfig, config_to_dict, save_train_config
from dcdit.training.data import RankBatchSampler, StepStream, ignore_stop_signals, local_slice
from dcdit.training.logging import MetricsLogger
from dcdit.training.rundir import RunDirLocked, RunLock, check_resume_config, truncate_metrics
from dcdit.training.samples import write_sample_grid
from dcdit.training.state import (
    check_state_finite,
    clean_stale,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from dcdit.training.step import train_step
from dcdit.utils import NonFiniteError, unwrap

# --------------------------------------------------------------------------- helpers


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, step, stream tag)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) & 0x7FFFFFFFFFFFFFFF


# stream tags for mix_seed
_NOISE, _BUDGET, _GLOBAL = 1, 2, 3


def take_over_label_dropout(model: nn.Module) -> tuple[float, Optional[int]]:
    """Switch off the label embedders' own random dropout; return (probability, null class)."""
    found = [m for m in model.modules() if hasattr(m, "token_drop") and hasattr(m, "dropout_prob")]
    probs = {float(m.dropout_prob) for m in found}
    if len(probs) > 1:
        raise ValueError(f"model has label embedders with different dropout probabilities {sorted(probs)}")
    if not found or not probs or max(probs) == 0:
        return 0.0, None
    for m in found:
        m.dropout_prob = 0.0
    return probs.pop(), int(found[0].num_classes)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in fp32."""
    ema_p = list(ema.parameters())
    model_p = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# what a step's non-finite check looks at, in the order of the flag vector (then: the stop request)
STEP_TERMS = ("loss_diffusion", "loss_ratio", "grad_norm")


def agree_on_step(step_stats: dict, grad_norm: torch.Tensor, stop: bool, info) -> tuple[list[str], bool]:
    """(the step's non-finite terms of STEP_TERMS, whether any rank asks to stop), the same on every rank.

    Fast path, every step: the terms' sum (NaN or inf when any term is) and, under DDP, the stop
    request, summed over ranks and read back once (the step's one host sync). Only when that sum is
    not finite are the terms told apart (a second small read, agreed on by all ranks alike); finite
    terms whose sum merely overflowed are then no reason to skip.
    """
    names = [k for k in STEP_TERMS[:2] if k in step_stats] + ["grad_norm"]  # the same keys on every rank
    terms = [step_stats[k] for k in names[:-1]] + [grad_norm.detach().float()]
    total = sum(terms[1:], terms[0])
    if info.distributed:
        total, stops = D.sum_over_ranks(torch.stack([total, torch.full_like(total, float(stop))]), info).tolist()
        stop = stops > 0
    else:
        total = total.item()
    if math.isfinite(total):
        return [], stop
    bad = D.max_over_ranks((~torch.isfinite(torch.stack(terms))).float(), info).tolist()
    return [k for k, b in zip(names, bad) if b > 0], stop


def divergence_message(step: int, streak: int, terms: list[str], run_dir: Path, lr: float, precision: str) -> str:
    """The one line a run stopped by non-finite steps ends with."""
    try:
        last = find_checkpoint(run_dir)
    except FileNotFoundError:
        last = None
    kept = f"its last checkpoint {last} is kept" if last is not None else "no checkpoint had been written"
    tries = [f"a lower optim.lr (this step's: {lr:g})"] + (["train.precision=fp32"] if precision != "fp32" else [])
    return (f"step {step}: {streak} steps in a row (from step {step - streak + 1}) had a non-finite "
            f"{' / '.join(terms)} (NaN or inf) and were skipped; the run is stopped and {kept}; "
            f"try --resume {run_dir} with {', '.join(tries)} or a smaller optim.grad_clip")


def compression(metrics: dict) -> tuple[Optional[float], Optional[float]]:
    """Overall compression L / kept (product over stages), natural and effective."""
    nat = [v for k, v in metrics.items() if k.startswith("keep_natural_")]
    eff = [v for k, v in metrics.items() if k.startswith("keep_effective_")]
    if not nat:
        return None, None
    return 1.0 / max(math.prod(nat), 1e-8), 1.0 / max(math.prod(eff), 1e-8)


class StopFlag:
    """Set by SIGTERM / the first Ctrl-C: the loop checkpoints and exits. A second Ctrl-C aborts."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def draw_global_batch(seed: int, step: int, global_batch: int, sample_shape: tuple, num_timesteps: int,
                      drop_prob: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timesteps, noise and label-drop flags for every global position of a step, from (seed, step)."""
    g = torch.Generator(device).manual_seed(mix_seed(seed, step, _NOISE))
    t = torch.randint(0, num_timesteps, (global_batch,), generator=g, device=device)
    noise = torch.randn((global_batch, *sample_shape), generator=g, device=device)
    drop = torch.rand((global_batch,), generator=g, device=device) < drop_prob
    return t, noise, drop


def multibudget_tail_drop(cfg: TrainConfig, seed: int, step: int) -> float:
    """Multi-budget tail drop of a step: uniform over ``multibudget.fractions``, a function of (seed, step) only."""
    mb = cfg.multibudget
    if not mb.enabled or step < mb.start_step:
        return 0.0
    return float(mb.fractions[np.random.default_rng(mix_seed(seed, step, _BUDGET)).integers(len(mb.fractions))])


def lr_at(o, step: int, total_steps: int) -> float:
    """Learning rate of a step: linear warm-up, then constant or cosine decay to lr * min_lr_ratio."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(total_steps - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / span, 1.0)
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ema_decay_at(tc, step: int) -> float:
    """EMA decay of a step: constant, or warmed up as min(decay, (1 + step) / (10 + step))."""
    return min(tc.ema_decay, (1.0 + step) / (10.0 + step)) if tc.ema_warmup else tc.ema_decay


def init_label_table(model: nn.Module, std: Optional[float]) -> None:
    """Re-draw the class-label embedding table(s) from N(0, std^2) (None: keep the model's own init)."""
    if std is None:
        return
    for m in unwrap(model).modules():
        if hasattr(m, "embedding_table") and hasattr(m, "token_drop"):
            nn.init.normal_(m.embedding_table.weight, std=std)


# --------------------------------------------------------------------------- model


def build_train_model(cfg: TrainConfig, dataset) -> nn.Module:
    """The model a config asks for, sized to the data unless overridden (or loaded from model.init_from)."""
    m = cfg.model
    data_keys = {"input_size": dataset.image_size, "in_channels": dataset.channels,
                 "num_classes": dataset.num_classes}
    # How the loss and the sampler read the output (null: init_from's own, or the model's default).
    objective = {} if cfg.diffusion.prediction is None else {"prediction": cfg.diffusion.prediction}
    if m.init_from:
        try:
            init = load_model(m.init_from, which=m.init_which)
        except NonFiniteError as e:  # training has no --allow-nonfinite: drop the hint
            raise NonFiniteError(f"model.init_from: {str(e).removesuffix(ALLOW_HINT)}") from None
        init_cfg = model_config(init)
        try:
            model = build_model({**init_cfg, **objective, **m.overrides})
        except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
            raise ValueError(f"model.overrides {m.overrides} do not fit model.init_from ({m.init_from}): "
                             f"{str(e).splitlines()[0]}") from None
        init_state, target = init.state_dict(), model.state_dict()
        bad = [k for k in target if k != "pos_embed" and (k not in init_state or init_state[k].shape != target[k].shape)]
        if bad or set(init_state) - set(target):
            raise ValueError(f"model.overrides {m.overrides} do not fit the weights of model.init_from "
                             f"({m.init_from}), e.g. at {(bad or sorted(set(init_state) - set(target)))[0]}; "
                             "keep only shape-preserving overrides (e.g. class_dropout_prob)")
        model.load_state_dict({k: v for k, v in init_state.items() if k != "pos_embed"}, strict=False)
    else:
        build = build_dit if m.arch == "dit" else build_dcdit
        try:
            model = build(m.preset, **{**data_keys, **objective, **m.overrides})
        except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
            if str(e).startswith(("unknown DiT model", "unknown DC-DiT preset")):
                raise ValueError(f"model.preset: {str(e).splitlines()[0]}") from None
            raise ValueError(f"model.overrides {m.overrides} do not make a valid {m.preset}: "
                             f"{str(e).splitlines()[0]}") from None
    check_model_fits_data(model, dataset)
    return model


def check_model_fits_data(model: nn.Module, dataset) -> None:
    c = dict(unwrap(model).config)
    if c.get("input_size", dataset.image_size) != dataset.image_size:
        raise ValueError(f"model input_size {c['input_size']} does not match the data's image size {dataset.image_size}")
    if c.get("in_channels", dataset.channels) != dataset.channels:
        raise ValueError(f"model in_channels {c['in_channels']} does not match the data's {dataset.channels} channels")
    if c.get("num_classes", dataset.num_classes) < dataset.num_classes:
        raise ValueError(f"model num_classes {c['num_classes']} < the data's {dataset.num_classes} classes")


def load_weights(model: nn.Module, state: dict, source) -> None:
    """Strict load with a one-line error naming the file."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ValueError(f"{source} does not match the model: {lines[0] if lines else e}") from None
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# --------------------------------------------------------------------------- setup


def resolve_run_dir(cfg: TrainConfig, out: Optional[str], resume,
                    check_existing: bool = True) -> tuple[Path, Optional[Path]]:
    """(run directory, checkpoint directory to resume from or None); refuses to train over checkpoints
    (``check_existing``; the trainer checks after taking the run directory's lock)."""
    tc = cfg.train
    default = Path(out or tc.out_dir or f"runs/{cfg.name or 'train'}")
    if not resume:
        if check_existing and list_checkpoints(default):
            raise ValueError(f"run directory {default} already holds checkpoints: "
                             "pass --resume to continue it or --out for a new run")
        return default, None
    where = default if resume is True else Path(resume)
    ckpt_dir = find_checkpoint(where)
    if ckpt_dir is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {where}")
    return (Path(out) if out else ckpt_dir.parent), ckpt_dir


@dataclass
class RunState:
    """Everything a run trains and checkpoints, and the objects wrapped around the model."""

    model: nn.Module  # the bare model (its weights are saved)
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    diffusion: object
    train_model: nn.Module  # model, DDP-wrapped and/or compiled: what the step calls
    ddp_model: nn.Module  # for no_sync() during gradient accumulation
    step: int = 0
    drop_prob: float = 0.0  # label dropout (classifier-free guidance), applied by the loop
    null_class: Optional[int] = None
    nonfinite_steps: int = 0  # steps skipped for a NaN / inf loss or gradient so far (across resumes)


def build_run(cfg: TrainConfig, dataset, ckpt_dir: Optional[Path], info) -> RunState:
    """Model, EMA, optimizer and diffusion, fresh or from ``ckpt_dir``; the same init on every rank."""
    tc, o, device = cfg.train, cfg.optim, info.device
    torch.manual_seed(tc.seed)
    ckpt = load_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None:
        model = build_model(ckpt["model_config"])
        load_weights(model, ckpt["model"], ckpt_dir / "model.safetensors")
        check_model_fits_data(model, dataset)
    else:
        model = build_train_model(cfg, dataset)
        if not cfg.model.init_from:
            init_label_table(model, cfg.model.label_init_std)
    model.to(device).train()
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    if ckpt is not None and ckpt["ema"] is not None:
        load_weights(ema, ckpt["ema"], ckpt_dir / "ema.safetensors")
    drop_prob, null_class = take_over_label_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel (one pass over all parameters; CPU and CUDA) is what bench_throughput.py times.
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    step, nonfinite = 0, 0
    if ckpt is not None:
        nonfinite = int(ckpt["meta"].get("nonfinite_steps", 0))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"optimizer state in {ckpt_dir / 'train_state.safetensors'} does not fit the "
                             f"model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        restore_rng(ckpt["rng_tensors"], ckpt["rng_meta"])
        step = ckpt["step"]
        del ckpt
    diffusion = create_diffusion("", noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=bool(model.config.get("learn_sigma", True)),
                                 diffusion_steps=cfg.diffusion.diffusion_steps,
                                 min_snr_gamma=cfg.diffusion.min_snr_gamma,
                                 min_snr_floor=cfg.diffusion.min_snr_floor,
                                 prediction=model.config.get("prediction", "epsilon"))
    train_model = ddp_model = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # a fixed router (router_mode grid / random) leaves the router's parameters without gradient
        fixed_router = model.config.get("router_mode", "learned") != "learned"
        train_model = ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=tc.find_unused_parameters or fixed_router)
    if tc.compile:
        train_model = torch.compile(train_model)
    return RunState(model, ema, optimizer, params, diffusion, train_model, ddp_model, step, drop_prob, null_class,
                    nonfinite)


# --------------------------------------------------------------------------- train


def train(cfg: TrainConfig, out: Optional[str] = None, resume: Optional[str | bool] = None) -> Path:
    """Train as ``cfg`` says; returns the run directory.

    ``out`` overrides ``train.out_dir``. ``resume``: a run or checkpoint
    directory to continue from, or ``True`` for the run directory's latest
    checkpoint. Launched under torchrun, every process calls this.
    """
    t_start = time.time()
    tc = cfg.train
    info = D.setup(tc.device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    lock, run, loop, done, created = None, None, None, False, None
    try:
        run_dir, ckpt_dir = resolve_run_dir(cfg, out, resume, check_existing=False)
        created = None if run_dir.exists() else run_dir  # removed again if this call fails leaving it empty
        lock = lock_run_dir(run_dir, info)
        if ckpt_dir is None and list_checkpoints(run_dir):
            raise ValueError(f"run directory {run_dir} already holds checkpoints: "
                             "pass --resume to continue it or --out for a new run")
        # A resume is checked in full before anything in the run directory is written.
        changed = check_resume_config(cfg, ckpt_dir) if ckpt_dir is not None else []
        dataset = build_dataset(cfg.data)
        micro = micro_batch_size(tc, info)
        ratio_group = ratio_group_size(cfg.ratio.group_size, micro)
        run = build_run(cfg, dataset, ckpt_dir, info)
        log = open_run_dir(cfg, run_dir, ckpt_dir, run.step, info)  # written only now that all is checked
        describe_run(log, cfg, run, dataset, run_dir, ckpt_dir, changed, micro, info)
        loop = TrainLoop(cfg, run, dataset, run_dir, log, info, micro, ratio_group, t_start,
                         resumed=ckpt_dir is not None)
        loop.run()
        log.close()
        done = True
        return run_dir
    finally:
        if lock is not None:
            lock.release()
            if not done and created is not None:
                try:  # a failed start leaves no empty run directory behind (only ever an empty one we made)
                    created.rmdir()
                except OSError:
                    pass
        # the DDP wrapper (in run, and in the loop that holds run) keeps the process group alive: teardown can
        # free the group only once both are gone
        run = loop = None
        D.teardown(info, sync=done)  # every rank, every exit path; the final barrier only on success


def lock_run_dir(run_dir: Path, info) -> Optional[RunLock]:
    """One training per run directory: rank 0 takes the lock (returned), every rank learns the outcome."""
    lock, lock_error = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except (RunDirLocked, OSError) as e:
            lock_error = e
    if D.any_rank(lock_error is not None, info):
        raise lock_error or RunDirLocked(f"rank 0 could not lock the run directory {run_dir}")
    return lock


def micro_batch_size(tc, info) -> int:
    """Per-process micro-batch: the global batch split over processes and gradient-accumulation steps."""
    world, accum = info.world_size, tc.grad_accum
    if tc.global_batch_size % (world * accum):
        raise ValueError(f"train.global_batch_size ({tc.global_batch_size}) must be divisible by "
                         f"processes x train.grad_accum ({world} x {accum})")
    return tc.global_batch_size // (world * accum)


def open_run_dir(cfg: TrainConfig, run_dir: Path, ckpt_dir: Optional[Path], step: int, info) -> MetricsLogger:
    """Create (or clean up, on resume) the run directory, write its config, and open its metrics log."""
    tc = cfg.train
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(run_dir)
        if ckpt_dir is not None:
            truncate_metrics(run_dir, step)  # records past the checkpoint are about to be written again
        save_train_config(cfg, run_dir / "config.yaml")
    return MetricsLogger(run_dir, info.is_main, tc.tensorboard, tc.wandb, tc.wandb_project, cfg.name,
                         config_to_dict(cfg), purge_step=step + 1 if ckpt_dir is not None else None)


def describe_run(log: MetricsLogger, cfg: TrainConfig, run: "RunState", dataset, run_dir: Path,
                 ckpt_dir: Optional[Path], changed: list[str], micro: int, info) -> None:
    """The run's opening lines: what changed on resume, the model, data and batch split, the ratio target."""
    tc, model, step = cfg.train, run.model, run.step
    if changed:
        log.info(f"resuming with changed settings: {', '.join(changed)}")
    if cfg.model.init_from and not step:
        log.info(f"model initialised from {cfg.model.init_from} ({cfg.model.init_which} weights"
                 + (f", overrides {cfg.model.overrides}" if cfg.model.overrides else "") + ")")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run {run_dir} | {type(model).__name__} {n_params / 1e6:.2f}M params | {dataset.describe()} | "
             f"{info.world_size} process(es) on {info.device}, batch {tc.global_batch_size} = {info.world_size} x "
             f"{tc.grad_accum} x {micro}" + (f" | resumed at step {step}" if step else ""))
    if is_dcdit(model):
        target = ratio_targets(cfg.ratio, tc.steps, model.cfg.num_chunk_stages, model.config.get("downsample_factor"))
        log.info("comp = compression L / kept tokens (product over stages): the router's own choice / "
                 f"after tail dropping; the ratio loss aims at ~{math.prod(target):g}x (N = {target})")
    if ckpt_dir is not None and step >= tc.steps:
        log.info(f"nothing to train: {run_dir} is at step {step} and train.steps is {tc.steps}; "
                 f"to train further, resume with --set train.steps=N (N > {step})")


@dataclass
class StepPlan:
    """What a step trains with, all functions of (seed, step): the global batch's timesteps, noise and
    label-drop flags, the multi-budget tail drop, the learning rate and the ratio loss's targets."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    tail_drop: float
    lr: float
    ratio_N: list[float]


class TrainLoop:
    """The loop of one run: plan a step, forward/backward its micro-batches, update (or skip a non-finite
    step), log, sample, stop, checkpoint. Its state (step, running statistics, skip streak) is the loop's."""

    def __init__(self, cfg: TrainConfig, run: "RunState", dataset, run_dir: Path, log: MetricsLogger, info,
                 micro: int, ratio_group: int, t_start: float, resumed: bool):
        tc = self.tc = cfg.train
        self.cfg, self.run_state, self.run_dir, self.log, self.info, self.micro = cfg, run, run_dir, log, info, micro
        self.t_start, self.step = t_start, run.step
        model = run.model
        self.dcdit = is_dcdit(model)
        self.ratio_weight = cfg.ratio.weight if self.dcdit else 0.0
        self.n_stages = model.cfg.num_chunk_stages if self.dcdit else 0
        self.ratio_group = ratio_group
        self.sample_shape = (dataset.channels, dataset.image_size, dataset.image_size)
        # data loader from the current step on
        self.stream = StepStream(len(dataset), tc.global_batch_size, tc.seed)
        sampler = RankBatchSampler(self.stream, self.step, tc.steps, info.rank, info.world_size, tc.grad_accum)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                                  pin_memory=info.device.type == "cuda",
                                                  persistent_workers=tc.num_workers > 0,
                                                  worker_init_fn=ignore_stop_signals if tc.num_workers > 0 else None)
        self.grids = SampleGrids(cfg, dataset, run_dir / "samples", info.device) if info.is_main else None
        self.bar = tqdm(total=tc.steps, initial=self.step, disable=not (info.is_main and tc.progress), desc="train",
                        unit="step", dynamic_ncols=True, smoothing=0.1)
        self.running: dict[str, torch.Tensor] = {}
        self.n_running, self.n_steps, self.t_log = 0, 0, time.time()
        self.last_saved = self.step if resumed else -1
        self.skipped, self.streak, self.ckpt_due = run.nonfinite_steps, 0, False
        self.ratio_N: list[float] = []

    def run(self) -> None:
        tc, info = self.tc, self.info
        stop_reason, diverged = None, None
        with StopFlag() as stop:
            batches = iter(self.loader)  # workers start under the handler: a stop signal never kills them first
            while self.step < tc.steps:
                plan = self.plan()
                step_stats = self.forward_backward(batches, plan)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.run_state.params,
                                                           self.cfg.optim.grad_clip or float("inf"))
                # non-finite terms and stop requests (signals, time budget), agreed on by all ranks
                local_stop = self.stop_request(stop)
                bad_terms, stop_any = agree_on_step(step_stats, grad_norm, local_stop is not None, info)
                self.update(bad_terms, step_stats, grad_norm, plan)
                self.log_metrics(plan)
                if self.streak >= tc.max_nonfinite_steps:
                    diverged = divergence_message(self.step, self.streak, bad_terms, self.run_dir, plan.lr,
                                                  tc.precision)
                    break
                self.write_sample_grid()
                if not info.distributed:  # alone, nothing to agree on: a request during this step's update counts now
                    local_stop = self.stop_request(stop)
                    stop_any = local_stop is not None
                if stop_any:
                    stop_reason = local_stop or "stop on another rank"
                    break
                self.checkpoint_if_due()
            self.bar.close()
            if diverged is not None:
                self.log.close()
                raise NonFiniteError(diverged)
            if self.last_saved != self.step:
                self.save(stop_reason or "final")
            if stop_reason:
                self.log.info(f"stopped at step {self.step}/{tc.steps}: {stop_reason}; "
                              f"resume with --resume {self.run_dir}")

    # ---- one step
    def plan(self) -> StepPlan:
        """The step's draws (and the global RNG reseeded from (seed, step, rank)); sets the learning rate."""
        tc, step, run = self.tc, self.step, self.run_state
        torch.manual_seed(mix_seed(tc.seed, step, self.info.rank, _GLOBAL))
        t, noise, drop = draw_global_batch(tc.seed, step, tc.global_batch_size, self.sample_shape,
                                           run.diffusion.num_timesteps, run.drop_prob, self.info.device)
        tail_drop = multibudget_tail_drop(self.cfg, tc.seed, step) if self.dcdit else 0.0
        lr = lr_at(self.cfg.optim, step, tc.steps)
        if self.ratio_weight > 0 and self.n_stages:
            self.ratio_N = ratio_targets(self.cfg.ratio, step, self.n_stages, run.model.config.get("downsample_factor"))
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        return StepPlan(t, noise, drop, tail_drop, lr, self.ratio_N)

    def forward_backward(self, batches, plan: StepPlan) -> dict[str, torch.Tensor]:
        """Loss and gradients of the step's micro-batches (accumulated); their statistics, summed."""
        tc, info, run = self.tc, self.info, self.run_state
        step_stats: dict[str, torch.Tensor] = {}
        for m in range(tc.grad_accum):
            x, y = next(batches)
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            sl = local_slice(m, info.rank, info.world_size, self.micro)
            if run.null_class is not None:
                y = torch.where(plan.drop[sl], torch.full_like(y, run.null_class), y)
            last = m == tc.grad_accum - 1 or not info.distributed
            with contextlib.nullcontext() if last else run.ddp_model.no_sync():
                loss, stats = train_step(run.train_model, run.diffusion, x, y, plan.t[sl], plan.noise[sl],
                                         tail_drop=plan.tail_drop, ratio_weight=self.ratio_weight,
                                         ratio_N=plan.ratio_N, ratio_group=self.ratio_group,
                                         bf16=tc.precision == "bf16")
                (loss / tc.grad_accum).backward()
            for k, v in stats.items():
                step_stats[k] = step_stats.get(k, 0.0) + v.float()
        return step_stats

    def update(self, bad_terms: list[str], step_stats: dict, grad_norm: torch.Tensor, plan: StepPlan) -> None:
        """Optimizer and EMA update and running statistics, or (non-finite terms) a skipped step; step += 1."""
        run, accum = self.run_state, self.tc.grad_accum
        if bad_terms:  # skip: weights, EMA, Adam state and statistics stay as they are
            run.optimizer.zero_grad(set_to_none=True)
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
        else:
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            update_ema(run.ema, run.model, ema_decay_at(self.tc, self.step))
            self.streak = 0
            for k, v in step_stats.items():
                self.running[k] = self.running.get(k, 0.0) + v
            self.running["grad_norm"] = self.running.get("grad_norm", 0.0) + grad_norm.detach().float() * accum
            if plan.tail_drop or self.cfg.multibudget.enabled:
                self.running["tail_drop"] = self.running.get("tail_drop", 0.0) + plan.tail_drop * accum
            self.n_running += accum
        self.step += 1
        self.n_steps += 1
        self.bar.update(1)
        if bad_terms:
            self.log.info(f"step {self.step}: non-finite {' / '.join(bad_terms)} (NaN or inf): update skipped "
                          f"({self.streak} in a row, {self.skipped} in this run)")

    def stop_request(self, stop: StopFlag) -> Optional[str]:
        tc = self.tc
        out_of_time = tc.max_minutes is not None and (time.time() - self.t_start) / 60.0 >= tc.max_minutes
        return stop.signal or ("time budget" if out_of_time else None)

    # ---- around the step
    def log_metrics(self, plan: StepPlan) -> None:
        """Every 10 steps the progress bar, every ``log_interval`` steps the logs (then the means restart)."""
        tc, step = self.tc, self.step
        if not (step % tc.log_interval == 0 or step == tc.steps or step % 10 == 0):
            return
        dt = time.time() - self.t_log
        metrics = summarise(self.running, self.n_running, self.n_steps, tc.global_batch_size, dt, self.info)
        metrics["nonfinite_steps"] = self.skipped
        post = progress_postfix(metrics)
        self.bar.set_postfix(post, refresh=False)
        if step % tc.log_interval == 0 or step == tc.steps:
            metrics["lr"] = plan.lr
            if plan.ratio_N:
                metrics["ratio_N"] = plan.ratio_N[0] if len(plan.ratio_N) == 1 else plan.ratio_N
            self.log.log(step, metrics)
            if self.bar.disable:  # no progress bar: one line per log interval instead
                self.log.info(f"step {step}/{tc.steps} | " + " | ".join(f"{k} {v}" for k, v in post.items()))
            self.running, self.n_running, self.n_steps, self.t_log = {}, 0, 0, time.time()

    def write_sample_grid(self) -> None:
        interval = self.cfg.samples.interval
        if self.grids is None or not interval or self.step % interval:
            return
        t0 = time.time()
        try:
            path = self.grids.write(self.run_state.ema, self.step)
        except NonFiniteError as e:  # finite but broken weights: say so, and train on
            path = None
            self.log.info(f"step {self.step}: no sample grid: {e}")
        if path is not None:
            self.log.info(f"sample grid {path}")
            self.log.image(self.step, "samples", path)
        self.t_log += time.time() - t0  # keep sampling out of the images/s figure

    def checkpoint_if_due(self) -> None:
        """Every ``ckpt_interval`` steps, postponed while steps are being skipped."""
        if self.step % self.tc.ckpt_interval == 0 and self.step < self.tc.steps:
            self.ckpt_due = True
            if self.streak:
                self.log.info(f"step {self.step}: checkpoint postponed until a step succeeds")
        if self.ckpt_due and not self.streak:  # not in the middle of skipped steps
            self.save(f"step {self.step}")
            self.last_saved, self.ckpt_due = self.step, False

    def save(self, reason: str) -> None:
        run, info, tc, step = self.run_state, self.info, self.tc, self.step
        ranks = D.check_ranks_agree(run.model, info)  # every rank holds the same weights (raises if not)
        check_state_finite(self.run_dir, step, run.model, run.ema, run.optimizer)  # on every rank: all raise alike
        if info.is_main:
            epoch, offset = self.stream.position(step)
            path = save_checkpoint(self.run_dir, step, run.model, run.ema, run.optimizer,
                                   (self.run_dir / "config.yaml").read_text(),
                                   extra={"epoch": epoch, "epoch_offset": offset, "world_size": info.world_size,
                                          "global_batch_size": tc.global_batch_size, "reason": reason,
                                          "rank_fingerprints": ranks, "nonfinite_steps": self.skipped},
                                   keep_last_k=tc.keep_last_k)
            self.log.info(f"saved {path} ({reason})")
        D.barrier(info)


def summarise(running: dict, n_running: int, n_steps: int, global_batch: int, dt: float, info) -> dict:
    """Means over the micro-batches of the steps taken since the last log (and over ranks), speed, compression.

    ``n_running`` counts the micro-batches summed in ``running`` (skipped steps' are not),
    ``n_steps`` all steps since the last log (skipped ones too).
    """
    keys = sorted(running) if n_running else []
    metrics = dict(zip(keys, D.mean_over_ranks([float(running[k]) / n_running for k in keys], info)))
    steps_per_sec = n_steps / max(dt, 1e-9)
    metrics.update(images_per_sec=steps_per_sec * global_batch, steps_per_sec=steps_per_sec)
    nat, eff = compression(metrics)
    if nat is not None:
        metrics.update(compression_natural=nat, compression_effective=eff)
    return metrics


def progress_postfix(metrics: dict) -> dict[str, str]:
    post = {"loss": f"{metrics['loss']:.4f}" if "loss" in metrics else "-"}  # "-": every step skipped
    if "compression_natural" in metrics:
        post["comp"] = f"{metrics['compression_natural']:.2f}x/{metrics['compression_effective']:.2f}x"
    post["img/s"] = f"{metrics['images_per_sec']:.1f}"
    if metrics.get("nonfinite_steps"):
        post["skipped"] = str(metrics["nonfinite_steps"])
    return post


class SampleGrids:
    """Periodic EMA sample grids of a run (main process only); loads the VAE once for latent data."""

    def __init__(self, cfg: TrainConfig, dataset, out_dir: Path, device: torch.device):
        self.cfg, self.dataset, self.out_dir, self.device, self.vae = cfg, dataset, out_dir, device, None

    def write(self, ema: nn.Module, step: int) -> Optional[Path]:
        cfg = self.cfg
        if self.dataset.is_latent and self.vae is None and cfg.samples.vae:
            self.vae = load_vae(cfg.samples.vae, self.device)
        return write_sample_grid(self.out_dir / f"step{step:07d}.png", ema, cfg.samples, self.dataset,
                                 cfg.diffusion.diffusion_steps, cfg.diffusion.noise_schedule, self.device, self.vae)
