"""`dcdit evaluate` before and after the fast Inception pass, on two uncached sets of MNIST images.

    python benchmarks/bench_evaluate.py --before-src /tmp/base/src [--n 2000] [--rounds 1] [--out DIR]

Writes two ADM reference batches (`dcdit reference --source mnist --split test|train
--num-samples N`), then runs `dcdit evaluate a.npz b.npz --no-cache` once with the
library at ``--before-src`` (e.g. `git archive <old commit> src | tar -x -C /tmp/base`)
and once with this checkout's, alternating for ``--rounds`` rounds, each in a fresh
process. Reports wall seconds, CPU seconds (user + sys of the process: less sensitive
to other jobs on a shared machine than wall time), the load average, the FIDs and
their relative difference; JSON in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def run(src: Path, args: list[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcdit", *args], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_start": load0, "load_end": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-src", required=True, help="the src/ directory of the library before the change")
    p.add_argument("--n", type=int, default=2000, help="images per set (default 2000)")
    p.add_argument("--rounds", type=int, default=1, help="before/after pairs (default 1)")
    p.add_argument("--out", default="runs/bench_evaluate", help="working directory (default runs/bench_evaluate)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("a", "test"), ("b", "train")):
        if not (out / f"{name}.npz").is_file():
            run(SRC, ["reference", "--source", "mnist", "--split", split, "--num-samples", str(a.n),
                      "--out", f"{name}.npz"], out)
    rows = []
    for r in range(a.rounds):
        for label, src in (("before", Path(a.before_src)), ("after", SRC)):
            res = run(src, ["evaluate", "a.npz", "b.npz", "--no-cache", "--quiet", "--json", f"{label}.json"], out)
            res.update(label=label, round=r, fid=json.loads((out / f"{label}.json").read_text())["fid"])
            rows.append(res)
            print(f"round {r} {label:6s}: {res['wall_s']:7.1f} s wall, {res['cpu_s']:7.1f} s CPU, "
                  f"load {res['load_start']:.1f}->{res['load_end']:.1f}, FID {res['fid']:.6f}", flush=True)
    def med(label: str, key: str) -> float:
        vals = sorted(x[key] for x in rows if x["label"] == label)
        return vals[len(vals) // 2]

    summary = {
        "n": a.n, "cpus": os.cpu_count(), "rows": rows,
        "speedup_wall": med("before", "wall_s") / med("after", "wall_s"),
        "speedup_cpu": med("before", "cpu_s") / med("after", "cpu_s"),
        "fid_relative_difference": abs(rows[-1]["fid"] - rows[-2]["fid"]) / abs(rows[-2]["fid"]),
    }
    (out / "bench_evaluate.json").write_text(json.dumps(summary, indent=1))
    print(f"speedup: {summary['speedup_wall']:.2f}x wall, {summary['speedup_cpu']:.2f}x CPU; "
          f"FID relative difference {summary['fid_relative_difference']:.2e}")


if __name__ == "__main__":
    main()
