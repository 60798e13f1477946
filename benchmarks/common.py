"""Shared pieces of the dcdit benchmarks: environment, machine record, models, timing, FLOPs.

Every benchmark times DiT and DC-DiT in the same process, interleaved
(round-robin over the setups for every repeat, after warm-up), and reports
medians, so slow drifts in machine load hit all setups alike. Ratios are the
numbers to read; absolute times depend on the machine and its load.

Environment: unless ``--raw-env`` is given (or DCDIT_BENCH_ENV is already set),
a benchmark re-executes itself once with

* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP workers sleep instead of spinning at
  barriers. On a machine whose cores are shared with other jobs a spinning
  worker steals the core its partner needs, and every parallel op then waits
  for a descheduled thread: we measured 8 ms for a 65k-element elementwise op
  that takes 0.1 ms otherwise. Such stalls tax many-small-op workloads (the
  DC-DiT scaffold) far more than a few large matmuls.
* glibc malloc thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  ``MALLOC_TOP_PAD_``): freed large blocks stay in the heap instead of being
  unmapped, so the next step's activations reuse them instead of paying
  page faults on every fresh 100 MB tensor (2.5x on memory-bound ops here).

Both apply to every model in the run. They are ordinary deployment settings
for PyTorch on CPU; ``--raw-env`` measures without them.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

TUNED_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sweep and fewer repeats (a smoke run, minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--raw-env", action="store_true", help="do not re-exec with the tuned OpenMP/malloc environment")
    p.add_argument("--json", default=None, help="write results here (default: benchmarks/results/<name>.json)")
    return p


def setup(args, name: str):
    """Re-exec with the tuned environment (once), set threads; returns torch."""
    if not args.raw_env and os.environ.get("DCDIT_BENCH_ENV") != "1":
        env = dict(os.environ, DCDIT_BENCH_ENV="1")
        for k, v in TUNED_ENV.items():
            env.setdefault(k, v)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json is None:  # --quick runs never overwrite the full results; DCDIT_BENCH_TAG picks a subfolder
        folder = RESULTS / os.environ["DCDIT_BENCH_TAG"] if os.environ.get("DCDIT_BENCH_TAG") else RESULTS
        args.json = str((folder / "quick" if getattr(args, "quick", False) else folder) / f"{name}.json")
    return torch


def machine() -> dict:
    """What ran the benchmark: CPU, cores, torch, threads, environment, load, date, commit."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in f" {flags} "]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:  # pragma: no cover
        commit = ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "isa": isa, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "env": {k: os.environ.get(k) for k in TUNED_ENV} | {"DCDIT_BENCH_ENV": os.environ.get("DCDIT_BENCH_ENV")},
        "loadavg_start": _loadavg(), "commit": commit, "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _loadavg() -> Optional[list[float]]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def save(args, payload: dict) -> None:
    payload.setdefault("machine", {})["loadavg_end"] = _loadavg()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {path}", file=sys.stderr)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
#                                   Models                                    #
# --------------------------------------------------------------------------- #

def build_pair(size: str = "S", input_size: int = 32, seed: int = 0):
    """(DiT at patch 1, DC-DiT) with the same main network (depth, width, heads) on a input_size^2 x 4 latent.

    The DiT runs its blocks on all input_size^2 tokens: the cost DC-DiT's main
    network would have if it kept every token. The DC-DiT router is biased so
    that every token is a natural boundary (see :func:`keep_all_boundaries`);
    kept shares are then set exactly by tail dropping.
    """
    import torch

    from dcdit.models import MODEL_SIZES, build_dcdit
    from dcdit.models.dit import DiT

    depth, width, heads = MODEL_SIZES[size]
    torch.manual_seed(seed)
    dit = DiT(input_size=input_size, patch_size=1, hidden_size=width, depth=depth, num_heads=heads).eval()
    torch.manual_seed(seed)
    dc = build_dcdit(f"DC-DiT-{size}-N4", input_size=input_size).eval()
    keep_all_boundaries(dc)
    return dit, dc


def build_dit(size: str, patch: int, input_size: int = 32, seed: int = 0):
    import torch

    from dcdit.models import MODEL_SIZES
    from dcdit.models.dit import DiT

    depth, width, heads = MODEL_SIZES[size]
    torch.manual_seed(seed)
    return DiT(input_size=input_size, patch_size=patch, hidden_size=width, depth=depth, num_heads=heads).eval()


def keep_all_boundaries(model) -> None:
    """Benchmark-only: bias the router so every token has p > 0.5 (natural boundary) and p < 1.

    With every token a natural boundary, tail dropping a fraction f keeps
    exactly L - floor(f L) tokens: the highest-p ones, a data-dependent
    spatial pattern (not a fixed block). The router, chunk, dechunk and
    everything else run their real code. :func:`check_shares` verifies it.
    """
    from dcdit.sampling.cost import set_router_bias

    set_router_bias(model, 10.0)


def drop_for_share(share: float, L: int) -> float:
    """Tail-drop fraction f with L - floor(f L) == round(share L) kept tokens (float32 floor, as the model)."""
    import torch

    keep = round(share * L)
    f = (L - keep + 0.5) / L
    assert int((torch.tensor(float(L)) * torch.tensor(f, dtype=torch.float32)).long()) == L - keep
    return f


def check_shares(routing, share: float, L: int) -> None:
    r = routing[0]
    want = round(share * L)
    if not bool(r.natural_mask.all()) or not bool((r.num_kept == want).all()):
        raise RuntimeError(f"kept-share forcing failed: natural {r['natural_mask'].float().mean():.3f}, "
                           f"kept {r['num_kept'].tolist()[:4]} != {want}")


def autocast(precision: str):
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- #
#                                   Timing                                    #
# --------------------------------------------------------------------------- #

def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                before: Optional[Callable[[str], None]] = None,
                after: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """:func:`dcdit.utils.round_robin_seconds`, imported once :func:`setup` has set the environment."""
    from dcdit.utils import round_robin_seconds

    return round_robin_seconds(fns, repeats, warmup, before, after)


def median(v: list[float]) -> float:
    return float(statistics.median(v))


def median_ms(f: Callable[[], object], n: int = 9) -> float:
    """Median milliseconds of ``n`` calls of ``f`` after one warm-up call."""
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return median(ts) * 1e3


class ComponentTimer:
    """Wall-clock per top-level child module of a model (forward hooks; CPU, synchronous)."""

    def __init__(self, model):
        self.model, self.handles, self.acc, self.enabled = model, [], {}, False
        for name, m in model.named_children():
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))
        self._start: dict[str, float] = {}

    def _pre(self, name):
        def f(m, a):
            if self.enabled:
                self._start[name] = time.perf_counter()
        return f

    def _post(self, name):
        def f(m, a, o):
            if self.enabled and name in self._start:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - self._start.pop(name)
        return f

    @contextmanager
    def record(self):
        self.acc, self.enabled = {}, True
        try:
            yield self.acc
        finally:
            self.enabled = False

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- #
#                                   Memory                                    #
# --------------------------------------------------------------------------- #

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB."""
    cur = peak = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def wrap(model, precision: str = "fp32", keep_schedule=None):
    """A module around ``model`` for :func:`dcdit.sampling.sample`: bf16 autocast and/or a kept-share schedule.

    ``keep_schedule(t) -> share`` (t: (B,) original timesteps) makes DC-DiT keep
    exactly round(share * L) tokens per sample at each step (the router is set
    to keep every token and tail dropping trims to the share), emulating a
    trained router that keeps fewer tokens at noisy steps. The sampler sees the
    inner model through ``.module`` (model_info / tail-drop support).
    """
    import torch
    import torch.nn as nn

    class _Wrap(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t, y, **kw):
            if keep_schedule is not None:
                L = x.shape[-1] * x.shape[-2]
                share = keep_schedule(t.float())
                keep = torch.round(share * L)
                kw["tail_drop"] = ((L - keep + 0.5) / L).float()
            with autocast(precision):
                out = self.module(x, t, y, **kw)
            if isinstance(out, tuple):
                return (out[0].float(), *out[1:])
            return out.float()

        def forward_with_cfg(self, *a, **kw):  # pragma: no cover - guidance is not benchmarked here
            raise NotImplementedError

    return _Wrap(model)


def linear_keep_schedule(s_noisy: float = 1 / 16, s_clean: float = 0.5, T: int = 1000):
    """share(t) = s_noisy at t = T-1, rising linearly to s_clean at t = 0."""
    return lambda t: s_clean + (s_noisy - s_clean) * (t / (T - 1))
