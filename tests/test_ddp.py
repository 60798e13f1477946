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


def torchrun(nproc: int, argv: list[str], tmp_path: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    """``dcdit *argv`` (or ``script *argv``) in ``nproc`` processes."""
    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    exe = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's stack
    target = ["-m", "dcdit"] if script is None else [str(script)]
    cmd = [exe, "--standalone", f"--nproc_per_node={nproc}", *target, *argv]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def run_both(tmp_path: Path, sets: list[str]) -> tuple[Path, Path]:
    argv = ["train", "--config", str(CONFIGS / "shapes_dit_cpu.yaml"), "--out", str(tmp_path / "ddp")]
    for s in sets:
        argv += ["--set", s]
    proc = torchrun(2, argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "still referenced" not in proc.stderr  # teardown freed the group (the DDP wrapper let go of it)
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


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_teardown_frees_gloo_before_interpreter_shutdown(tmp_path):
    """The CI flake (a rank dying with SIGABRT at teardown), reproduced with its trigger injected.

    Before the fix the gloo group outlived teardown, and rank 1 died with SIGABRT
    ("terminate called without an active exception") at exit, every time.
    """
    proc = torchrun(2, [str(tmp_path / "rank1-in-teardown")], tmp_path, script=Path(__file__).with_name(
        "ddp_teardown_probe.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        threads = (tmp_path / f"threads-rank{rank}.txt").read_text().split()
        assert not [t for t in threads if "gloo" in t], threads  # no gloo thread runs on after teardown
