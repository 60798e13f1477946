"""Nothing lost under signals, concurrent runs and failed resumes (issue 15).

* SIGTERM to the whole process group (SLURM, Kubernetes, docker stop) with DataLoader workers: checkpoint saved;
* a failed resume leaves the run directory byte-for-byte unchanged;
* a second training on a run directory in use is refused; a dead run's lock is taken over;
* interrupted pruning leaves nothing behind; no duplicate metrics after a resume; files readable as any new file.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcdit.cli import main
from dcdit.training import load_train_config, train
from dcdit.training.rundir import LOCK_NAME, RunDirLocked, RunLock, truncate_metrics
from dcdit.training.state import clean_stale, find_checkpoint, list_checkpoints

from test_training import CONFIGS, TINY_DCDIT, TINY_DIT

CPU_CONFIG = ["--config", str(CONFIGS / "shapes_dit_cpu.yaml")]


def sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes (files), link target, and mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), body)
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- signals


def _wait_for(cond, timeout: float, what: str, proc=None):
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended early waiting for {what}: {proc.communicate()[1][-3000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_process_group_sigterm_with_workers_saves_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "dcdit", "train", "--out", str(run)] + CPU_CONFIG + sets(
        TINY_DIT + ["train.steps=1000000", "train.num_workers=2", "train.log_interval=1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a scheduler's job
    try:
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, "training steps",
                  proc)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader workers at once
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, after checkpointing
    assert "killed by signal" not in err
    ckpt = find_checkpoint(run)
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["reason"] == "SIGTERM" and state["step"] >= 3
    assert not (run / LOCK_NAME).exists()
    # the workers are gone too: nothing is left in the process group
    _wait_for(lambda: _group_empty(proc.pid), 30, "the DataLoader workers to exit")
    # and the run continues from there
    assert main(["train", "--resume", str(run), "--set", f"train.steps={state['step'] + 1}",
                 "--set", "train.num_workers=0"]) == 0
    assert (run / "latest").read_text().strip() == f"ckpt-{state['step'] + 1:07d}"


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_workers_ignore_stop_signals():
    from dcdit.training.data import ignore_stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- resume


def test_failed_resume_leaves_the_run_unchanged(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + CPU_CONFIG + sets(TINY_DIT + ["train.steps=2"])) == 0
    before = snapshot(run)
    capsys.readouterr()

    # a fixed setting changed on the command line: refused before anything is written
    assert main(["train", "--resume", str(run), "--set", "data.image_size=16", "--set", "train.steps=4"]) == 2
    err = one_line_error(capsys)
    assert "data.image_size is 16, the run's is 8" in err and "nothing was changed" in err
    assert snapshot(run) == before

    # another config file (another model): refused, the run's config.yaml untouched
    other = tmp_path / "other.yaml"
    other.write_text("model: {arch: dcdit, preset: DC-DiT-S-N4}\ntrain: {steps: 4}\n")
    assert main(["train", "--resume", str(run), "--config", str(other)]) == 2
    err = one_line_error(capsys)
    assert "model.arch is 'dcdit', the run's is 'dit'" in err
    assert snapshot(run) == before

    # a checkpoint that cannot be read: also no write
    state = run / "ckpt-0000002" / "train_state.json"
    good = state.read_text()
    state.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "optimizer"}))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--set", "train.steps=4"]) == 2
    err = one_line_error(capsys)
    assert "train_state.json" in err and "'optimizer'" in err
    assert snapshot(run) == before
    state.write_text(good)

    # the plain resume still works, and may change the schedule
    assert main(["train", "--resume", str(run), "--set", "train.steps=4", "--set", "train.log_interval=1"]) == 0
    assert (run / "latest").read_text().strip() == "ckpt-0000004"
    assert "resuming with changed settings: train.log_interval, train.steps" in capsys.readouterr().err


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
    base = TINY_DIT + ["train.log_interval=1", "train.ckpt_interval=2", "train.keep_last_k=0"]
    run = train(load_train_config(None, base + ["train.steps=3"]), out=tmp_path / "r")
    # a run killed after logging step 3 (its last checkpoint is step 2): simulate with the final one removed
    import shutil

    shutil.rmtree(run / "ckpt-0000003")
    (run / "latest").write_text("ckpt-0000002\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0')  # torn last line of a kill mid-write
    train(load_train_config(None, base + ["train.steps=4"]), out=run, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_truncate_metrics_keeps_other_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 5}\n{"note": "x"}\n')
    assert truncate_metrics(tmp_path, 2) == 1
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\nnot json\n{"note": "x"}\n'
    assert truncate_metrics(tmp_path, 2) == 0


# ----------------------------------------------------------------------------- lock


def test_second_training_on_a_locked_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):  # another training holds it
        code = main(["train", "--out", str(run)] + CPU_CONFIG + sets(TINY_DIT + ["train.steps=1"]))
        err = one_line_error(capsys)
        assert code == 2
        assert f"run directory {run} is in use by another training (pid {os.getpid()}" in err
        assert not list_checkpoints(run) and not (run / "metrics.jsonl").exists()
        # a resume too
        with pytest.raises(RunDirLocked):
            RunLock(run).acquire()
    assert not (run / LOCK_NAME).exists()  # released
    assert main(["train", "--out", str(run)] + CPU_CONFIG + sets(TINY_DIT + ["train.steps=1"])) == 0


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run = tmp_path / "run"
    run.mkdir()
    import socket

    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    out = train(load_train_config(None, TINY_DIT + ["train.steps=1"]), out=run)
    assert list_checkpoints(out) and not (run / LOCK_NAME).exists()


def test_lock_without_flock_uses_pid_liveness(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    with RunLock(run) as held:
        assert held.holder()["pid"] == os.getpid()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(run).acquire()
    dead = subprocess.run([sys.executable, "-c", "pass"])
    (run / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with RunLock(run) as held:  # stale: that pid does not exist
        assert held.holder()["pid"] == os.getpid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(RunDirLocked, match="on host another-host"):  # another host's lock is never stale here
        RunLock(run).acquire()
    assert dead.returncode == 0


# ----------------------------------------------------------------------------- disk


def test_interrupted_pruning_leaves_nothing_behind(tmp_path, monkeypatch):
    import shutil

    import dcdit.training.state as S

    real = shutil.rmtree
    calls = {"n": 0}

    def killed_rmtree(path, *a, **k):
        # kill -9 in the middle of deleting a pruned checkpoint: one file gone, the rest left
        if Path(path).name.startswith(".old-ckpt-") and calls["n"] == 0:
            calls["n"] += 1
            (Path(path) / "train_state.json").unlink()
            raise KeyboardInterrupt("killed")
        return real(path, *a, **k)

    monkeypatch.setattr(S.shutil, "rmtree", killed_rmtree)
    cfg = TINY_DIT + ["train.ckpt_interval=1", "train.keep_last_k=1"]
    with pytest.raises(KeyboardInterrupt):
        train(load_train_config(None, cfg + ["train.steps=3"]), out=tmp_path / "r")
    monkeypatch.setattr(S.shutil, "rmtree", real)
    run = tmp_path / "r"
    left = [p.name for p in run.iterdir() if p.name.startswith(".old-ckpt-")]
    assert left  # the half-deleted checkpoint is hidden under a name clean_stale knows
    # a half-deleted checkpoint left by an older version (no train_state.json) is cleaned up as well
    (run / "ckpt-0000000").mkdir()
    (run / "ckpt-0000000" / "model.safetensors").write_bytes(b"x" * 100)
    train(load_train_config(None, cfg + ["train.steps=4"]), out=run, resume=True)
    names = sorted(p.name for p in run.iterdir())
    assert names == ["ckpt-0000004", "config.yaml", "latest", "metrics.jsonl"], names


def test_clean_stale_keeps_complete_checkpoints(tmp_path):
    (tmp_path / "ckpt-0000001").mkdir()
    (tmp_path / "ckpt-0000001" / "train_state.json").write_text("{}")
    (tmp_path / "ckpt-0000002").mkdir()
    (tmp_path / ".tmp-ckpt-0000003-99").mkdir()
    (tmp_path / "samples").mkdir()
    removed = sorted(p.name for p in clean_stale(tmp_path))
    assert removed == [".tmp-ckpt-0000003-99", "ckpt-0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000001", "samples"]


def test_written_files_get_the_usual_mode(tmp_path):
    import numpy as np

    from dcdit.evaluation.io import save_samples_npz
    from dcdit.viz.grid import save_png

    old = os.umask(0o022)
    try:
        run = train(load_train_config(None, TINY_DIT + ["train.steps=1", "samples.interval=1", "samples.num=2",
                                                         "samples.steps=2"]), out=tmp_path / "r")
        save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
        save_samples_npz(tmp_path / "a.npz", np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]))
    finally:
        os.umask(old)
    files = [p for p in [*run.rglob("*"), tmp_path / "a.png", tmp_path / "a.npz"] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".png" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_dcdit_resume_with_same_config_passes_the_check(tmp_path):
    cfg = TINY_DCDIT + ["train.steps=1"]
    run = train(load_train_config(None, cfg), out=tmp_path / "r")
    train(load_train_config(None, TINY_DCDIT + ["train.steps=2"]), out=run, resume=True)
    assert (run / "latest").read_text().strip() == "ckpt-0000002"


def test_training_seconds_sums_the_logged_intervals_across_a_resume(tmp_path):
    from dcdit.training.rundir import training_seconds

    rows = [{"step": 50, "steps_per_sec": 10.0, "loss": 1.0}, {"step": 100, "steps_per_sec": 5.0, "loss": 1.0},
            {"step": 100, "samples": "grid.png"},  # not a training record
            {"step": 150, "steps_per_sec": 25.0, "loss": 1.0}]  # after a resume at 100
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_seconds(tmp_path) == pytest.approx(5.0 + 10.0 + 2.0)
    assert training_seconds(tmp_path, upto=100) == pytest.approx(15.0)
    assert training_seconds(tmp_path / "missing") == 0.0
    # at the median rate (10 steps/s): 150 steps in 15 s, whatever one slow interval took
    assert training_seconds(tmp_path, at_median_rate=True) == pytest.approx(15.0)
    rows[0]["steps_per_sec"] = 0.01  # a paused interval
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_seconds(tmp_path, at_median_rate=True) == pytest.approx(150 / 5.0)  # median of 0.01, 5, 25
    assert training_seconds(tmp_path) > 5000  # the plain sum counts the pause
    assert training_seconds(tmp_path / "missing", at_median_rate=True) == 0.0
