"""Guards of a run directory: one training at a time, and a resume checked before anything is written.

* :class:`RunLock` -- ``RUN/.lock``, held with ``flock`` for the life of a
  training and naming its holder (pid, host, start time). The kernel drops the
  lock when its process dies (even by ``kill -9``), so the file a dead run
  leaves behind is taken over; on a file system without ``flock`` a lock is
  stale when its pid is dead on this host.
* :func:`check_resume_config` -- the settings that define *what* is trained
  (model, data, diffusion, seed) must equal those the checkpoint was trained
  with; the schedule (steps, intervals, optimizer, ...) may change.
* :func:`truncate_metrics` -- drop the ``metrics.jsonl`` records a resumed run
  is about to write again (those after the checkpoint's step).
"""
from __future__ import annotations

import errno
import json
import os
import statistics
import socket
import time
from pathlib import Path
from typing import Optional

from dcdit.training.config import config_from_dict, config_to_dict
from dcdit.utils import atomic_write

LOCK_NAME = ".lock"

# Keys a resume may not change (prefixes end with "."), and the exceptions among them:
# where the data lives and how it is held, and settings used only to initialise a model.
FIXED_ON_RESUME = ("model.", "diffusion.", "data.", "train.seed")
FREE_ON_RESUME = ("data.path", "data.in_memory", "data.skip_corrupt", "model.init_from", "model.init_which",
                  "model.label_init_std")


class RunDirLocked(ValueError):
    """Another training holds the run directory (a ValueError: the CLI prints one line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` -- exclusive use of a run directory by this process.

    Raises :class:`RunDirLocked` naming the holder when another live process has it.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    # -- holder record
    @staticmethod
    def _record() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def holder(self) -> dict:
        """The record in the lock file ({} when absent or unreadable)."""
        try:
            rec = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def _refuse(self, rec: dict) -> RunDirLocked:
        who = f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')}" + (
            f", since {rec['started']}" if rec.get("started") else "")
        return RunDirLocked(f"run directory {self.run_dir} is in use by another training ({who}; lock file "
                            f"{self.path}): wait for it to finish, or pass another --out")

    # -- acquire / release
    def acquire(self) -> "RunLock":
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self.holder()) from None
            except OSError as e:  # no flock here (some network/FUSE file systems): pid liveness
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                return self._acquire_by_pid()
            # The file we locked must still be the one at the path (a releasing holder unlinks it).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._write(fd)
            self._fd = fd
            return self
        raise RunDirLocked(f"cannot lock run directory {self.run_dir}: {self.path} keeps changing")

    def _acquire_by_pid(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                rec = self.holder()
                mine = rec.get("host") == socket.gethostname()
                if rec and (not mine or _pid_alive(int(rec.get("pid", -1)))):
                    raise self._refuse(rec) from None
                self.path.unlink(missing_ok=True)  # stale: its process is dead on this host
                continue
            self._write(fd)
            self._fd = fd
            return self
        raise self._refuse(self.holder())

    @staticmethod
    def _write(fd: int) -> None:
        data = (json.dumps(RunLock._record()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# ---------------------------------------------------------------- resume


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg, ckpt_dir: str | os.PathLike) -> list[str]:
    """Check that ``cfg`` may continue the checkpoint in ``ckpt_dir``; return the keys it changes.

    Raises ValueError naming the first fixed keys (model, data, diffusion,
    seed) that differ from the checkpoint's ``train_config.yaml``.
    """
    import yaml


    path = Path(ckpt_dir) / "train_config.yaml"
    if not path.is_file():
        return []  # written by another tool (e.g. an upcycled start): nothing to compare with
    try:
        saved = config_to_dict(config_from_dict(yaml.safe_load(path.read_text()) or {}))
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read the checkpoint's training config {path}: {str(e).splitlines()[0]}") from None
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    fixed = [k for prefix in FIXED_ON_RESUME for k in changed if k.startswith(prefix) and k not in FREE_ON_RESUME]
    if fixed:
        diffs = "; ".join(f"{k} is {new.get(k)!r}, the run's is {old.get(k)!r}" for k in fixed[:3])
        more = f" (and {len(fixed) - 3} more)" if len(fixed) > 3 else ""
        raise ValueError(f"cannot resume {ckpt_dir} with a different model, data or diffusion: {diffs}{more} "
                         f"(see {path}); nothing was changed")
    return [k for k in changed if k != "name"]


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop ``metrics.jsonl`` records after ``step`` (and a torn last line); returns how many were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue  # a record cut short by a crash
            keep.append(line)
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step):
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        text = "".join(line + "\n" for line in keep)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return dropped


def training_seconds(run_dir: str | os.PathLike, upto: Optional[int] = None, at_median_rate: bool = False) -> float:
    """Training time to step ``upto`` (default: all) from the run's own log, across resumes.

    Each log record covers the steps since the previous one at its measured steps/s; the trainer
    times those intervals without sampling or checkpointing, so this counts training only.
    ``at_median_rate``: the steps at the median of the logged rates instead, which a paused or
    briefly shared interval (or the one holding a compile) does not move.
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = sorted((r for r in rows if "steps_per_sec" in r and (upto is None or r["step"] <= upto)),
                  key=lambda r: r["step"])
    if at_median_rate:
        return rows[-1]["step"] / max(statistics.median(r["steps_per_sec"] for r in rows), 1e-9) if rows else 0.0
    total, prev = 0.0, 0
    for r in rows:
        total += (r["step"] - prev) / max(r["steps_per_sec"], 1e-9)
        prev = r["step"]
    return total
