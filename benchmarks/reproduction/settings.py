"""What the reproduction runs: its sizes (:class:`Settings`, full run vs ``--smoke``) and its training configs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

STAGES = ("classifier", "reference", "train", "eval", "upcycle", "speed", "elastic", "shapes", "curve", "report",
          "shapes-ablation")
MODELS = ("dit4", "dcdit_n4", "dit2")  # training order: the cheap models (and what upcycling needs) first
LABEL = {"dit2": "DiT/2", "dit4": "DiT/4", "dcdit_n4": "DC-DiT N=4"}
# The sparse canvas (benchmarks/canvas.py, configs/canvas/NAME.yaml): model name -> label in every table
CANVAS_MODELS = {
    "dcdit": "DC-DiT, learned router (N = 5)",
    "dcdit_grid": "control: DC-DiT with a fixed lattice router at the same share",
    "dcdit_random": "control: DC-DiT with a random router at the same share",
    "dcdit_w32": "DC-DiT, learned router, scaffold at width 32",
    "dcdit_w32_random": "control: the width-32 DC-DiT with a random router",
    "dit8": "DiT/8, FLOP-matched (64 tokens)",
    "dit4": "DiT/4, parameter-matched (256 tokens)",
}
# Precision of every sampling network call (dcdit.sampling.precision): "auto" is bf16 on a CPU or GPU that
# computes bf16 natively (this machine: AVX512-BF16 / AMX, as the published results), fp32 elsewhere.
SAMPLE_PRECISION = "auto"

# One change at a time to the shapes DC-DiT, to find what sets which cells its router marks
# (v1's 600-step epsilon run: AUC 0.86 at t = 25; v2's 2000-step v run: 0.37). Run on request only.
SHAPES_VARIANTS = {
    "epsilon": ("predicts epsilon (DiT's objective) instead of v", {"diffusion": {"prediction": "epsilon"}}),
    "no_multibudget": ("no multi-budget (tail-drop) training", {"multibudget": {"enabled": False}}),
}


@dataclass
class Settings:
    """Everything sized in one place (full run vs --smoke)."""

    # main network, shared by DiT/2, DiT/4 and DC-DiT's main stage
    hidden: int = 128
    depth: int = 10                   # deep enough that the scaffold is <= 15 % of DC-DiT's FLOPs (8: ~17 %)
    heads: int = 4
    # DC-DiT scaffold: 2x2 stem -> 16x16 grid; one conv ResBlock each side at width hidden / enc_factor
    patch: int = 2
    enc_layout: str = "c1"
    enc_factor: int = 8
    norm_groups: int = 8
    # training, identical for every MNIST model (the learning-speed recipe)
    steps: int = 4000                 # 5.1 MNIST epochs at batch 64
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    ema_warmup: bool = True
    label_init_std: float = 1.0
    min_snr_gamma: float = 5.0
    prediction: str = "v"
    compile_dit: bool = True          # torch.compile the DiTs' training step (~1.3x; DC-DiT routes, so eager)
    multibudget_start: float = 0.5    # share of the run after which DC-DiT N=4 trains multi-budget
    fractions: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    upcycle_share: float = 0.25       # the upcycled run trains this share of the scratch run's steps
    ddim_steps: int = 25
    n_fid: int = 2000                 # samples per model for the main FID
    n_ref: int = 2000                 # held-out real MNIST test images
    n_small: int = 500                # samples per elastic / upcycling point
    flop_images: int = 50             # images whose FLOPs are counted per evaluation (the counter slows sampling)
    sample_batch: int = 250
    speed_batch: int = 100
    elastic: list = field(default_factory=lambda: [0.2, 0.4, 0.6])
    classifier_steps: int = 600
    shapes_steps: int = 2000
    shapes_images: int = 128          # held-out images for the routing analysis
    shapes_train_images: int = 10000
    shapes_timesteps: list = field(default_factory=lambda: [25, 50, 100, 150, 250, 500, 750, 950])
    extractor: str = "inception"      # FID features ("classifier": the in-domain classifier's, for --smoke)
    source: str = "mnist"             # data source of the classifier and the FID reference (canvas.py: "canvas")
    image_size: int = 32


def smoke_settings() -> Settings:
    return Settings(depth=2, steps=8, batch=8, warmup=1, ddim_steps=2, n_fid=24, n_ref=24, n_small=12,
                    sample_batch=12, speed_batch=4, classifier_steps=10, shapes_steps=4, shapes_images=8,
                    shapes_train_images=256, shapes_timesteps=[50, 500], extractor="classifier", flop_images=6, compile_dit=False)



def model_section(s: Settings, name: str) -> dict:
    if name in ("dit2", "dit4"):
        return {"arch": "dit", "preset": "DiT-S/2" if name == "dit2" else "DiT-S/4",
                "overrides": {"hidden_size": s.hidden, "depth": s.depth, "num_heads": s.heads},
                "label_init_std": s.label_init_std}
    return {"arch": "dcdit", "preset": "DC-DiT-S-N4", "overrides": dcdit_overrides(s),
            "label_init_std": s.label_init_std}


def dcdit_overrides(s: Settings) -> dict:
    return {"patch_size": s.patch, "d_model": [s.hidden, s.hidden], "num_heads": [s.heads, s.heads],
            "arch_layout": [s.enc_layout, [f"D{s.depth}"], s.enc_layout], "enc_dec_dim_factor": [s.enc_factor, None],
            "norm_groups": s.norm_groups}


def upcycle_steps(s: Settings) -> int:
    return max(1, int(s.steps * s.upcycle_share))


def checkpoint_steps(s: Settings) -> list[int]:
    """Steps whose checkpoints the upcycling comparison scores: 1/4, 1/2 and all of the upcycled run."""
    u = upcycle_steps(s)
    return sorted({max(1, u // 4), max(1, u // 2), u})


def train_dict(s: Settings, name: str, seed: int, steps: int | None = None) -> dict:
    steps = steps or s.steps
    dc = name.startswith("dcdit")
    d = {
        "name": name,
        "model": model_section(s, name.removesuffix("_upcycled")),
        "data": {"source": "mnist", "split": "train", "image_size": 32},
        "diffusion": {"min_snr_gamma": s.min_snr_gamma, "prediction": s.prediction},
        "optim": {"lr": s.lr, "warmup_steps": s.warmup},
        "train": {"steps": steps, "global_batch_size": s.batch, "seed": seed, "ema_decay": s.ema_decay,
                  "ema_warmup": s.ema_warmup, "precision": "bf16", "device": "cpu",
                  "compile": s.compile_dit and not dc, "log_interval": max(1, min(50, steps)),
                  "ckpt_interval": max(1, upcycle_steps(s) // 4), "keep_last_k": 0, "progress": False,
                  "tensorboard": False},
        "samples": {"interval": 0},
    }
    if dc:
        d["ratio"] = {"weight": 0.03, "target_N": 4.0, "group_size": min(16, s.batch)}
        d["multibudget"] = {"enabled": True, "start_step": int(s.steps * s.multibudget_start),
                            "fractions": list(s.fractions)}
    return d


def shapes_dict(s: Settings, seed: int) -> dict:
    d = yaml.safe_load((ROOT / "configs/shapes_dcdit_cpu.yaml").read_text())
    d["name"] = "shapes_dcdit"
    d["data"]["num_samples"] = s.shapes_train_images
    d["train"].update({"steps": s.shapes_steps, "global_batch_size": s.batch, "seed": seed, "precision": "bf16",
                       "ckpt_interval": max(1, s.shapes_steps), "keep_last_k": 1, "progress": False,
                       "tensorboard": False, "log_interval": max(1, min(50, s.shapes_steps))})
    d["optim"]["warmup_steps"] = min(d["optim"]["warmup_steps"], s.warmup * 5)
    d["ratio"]["group_size"] = min(16, s.batch)
    d["multibudget"]["start_step"] = s.shapes_steps // 2
    d["samples"] = {"interval": 0}
    if s.depth < 4:  # --smoke
        d["model"]["overrides"]["arch_layout"] = ["c2", [f"D{s.depth}"], "c2"]
    return d

