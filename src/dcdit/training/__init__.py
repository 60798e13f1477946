"""Training: typed YAML configs, the DiT / DC-DiT loop, checkpoints, DDP, upcycling.

    from dcdit.training import load_train_config, train
    cfg = load_train_config("configs/shapes_dcdit_cpu.yaml", ["train.steps=200"])
    run_dir = train(cfg)
"""
from dcdit.training.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_train_config,
    save_train_config,
)
from dcdit.training.step import train_step
from dcdit.training.trainer import train

__all__ = ["TrainConfig", "load_train_config", "save_train_config", "config_from_dict", "config_to_dict", "train",
           "train_step"]
