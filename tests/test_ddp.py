"""2-process DDP (gloo, CPU) through torchrun: ranks agree, and match one process on the same global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcdit.checkpoint import load_safetensors
from dcdit.training import load_train_config, train

from test_training import CONFIGS, TINY_DCDIT, TINY_DIT

pytestmark = pytest.mark.ddp

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(nproc: int, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    exe = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's stack
    cmd = [exe, "--standalone", f"--nproc_per_node={nproc}", "-m", "dcdit", *argv]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def run_both(tmp_path: Path, sets: list[str]) -> tuple[Path, Path]:
    argv = ["train", "--config", str(CONFIGS / "shapes_dit_cpu.yaml"), "--out", str(tmp_path / "ddp")]
    for s in sets:
        argv += ["--set", s]
    proc = torchrun(2, argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(load_train_config(CONFIGS / "shapes_dit_cpu.yaml", sets), out=tmp_path / "single")
    return tmp_path / "ddp", single


def compare(ddp: Path, single: Path, step: int, atol: float) -> None:
    ck = f"ckpt-{step:07d}"
    state = json.loads((ddp / ck / "train_state.json").read_text())
    assert state["world_size"] == 2
    fps = state["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1]  # both ranks hold bitwise identical weights
    for name in ("model", "ema"):
        a, b = load_safetensors(ddp / ck / f"{name}.safetensors"), load_safetensors(single / ck / f"{name}.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{name}.{k}")


def test_ddp_two_processes_match_single_process(tmp_path):
    # Global batch 8 = 2 ranks x 4; label dropout on; 4 steps crossing an epoch (12 samples).
    sets = TINY_DIT + ["train.steps=4", "data.num_samples=12"]
    ddp, single = run_both(tmp_path, sets)
    compare(ddp, single, 4, atol=1e-5)


def test_ddp_dcdit_matches_single_process(tmp_path):
    # Ratio loss in groups of 4 (= one rank's batch) and multi-budget tail dropping from step 1.
    sets = TINY_DCDIT + ["train.steps=3", "data.num_samples=12", "model.arch=dcdit"]
    ddp, single = run_both(tmp_path, sets)
    compare(ddp, single, 3, atol=1e-5)
