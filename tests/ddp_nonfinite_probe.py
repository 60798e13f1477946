"""Run by tests/test_nonfinite.py under torchrun (2 ranks, gloo): rank 1 alone sees a NaN loss at one step.

Only rank 1's logged diffusion loss is NaN (its gradients, averaged by DDP, stay finite), so a rank that
decided alone would step while the other skipped, and the ranks' weights would part (the checkpoint's
rank check raises). argv: run directory, config file, JSON list of overrides, the step index to poison.
"""
import json
import os
import sys

import torch

import dcdit.training.trainer as trainer_module


def poison_loss_on_rank(rank: int, k: int):
    """A train_step whose k-th call reports a NaN diffusion loss on ``rank`` (the loss it returns stays finite)."""
    real, calls = trainer_module.train_step, []

    def wrapped(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if len(calls) == k and int(os.environ.get("RANK", "0")) == rank:
            stats = {**stats, "loss_diffusion": torch.full_like(stats["loss_diffusion"], float("nan"))}
        calls.append(1)
        return loss, stats

    return wrapped


if __name__ == "__main__":
    from dcdit.training import load_train_config, train

    out, config, overrides, k = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    trainer_module.train_step = poison_loss_on_rank(1, k)
    train(load_train_config(config, overrides), out=out)
