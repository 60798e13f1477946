"""Run every dcdit benchmark and summarise the targets of issue 6 (one entry point).

    python benchmarks/run_all.py            # full run (about 30-40 min on 2 shared CPU cores)
    python benchmarks/run_all.py --quick    # smoke run (a few minutes)
    python benchmarks/run_all.py --only forward,dechunk

Each benchmark runs as its own process (tuned OpenMP/malloc environment, see
benchmarks/common.py) and writes benchmarks/results/<name>.json; this script
then prints the markdown tables and a target summary, also written to
benchmarks/results/summary.md (--quick: benchmarks/results/quick/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)

BENCHES = {
    "forward": ("bench_forward.py", []),
    "dechunk": ("bench_dechunk.py", []),
    "varlen": ("bench_varlen.py", []),
    "train": ("bench_train.py", []),
    "backward": ("bench_backward.py", []),
    "memory": ("bench_memory.py", []),
    "sampling_bf16": ("bench_sampling.py", ["--precision", "bf16"]),
    "compile": ("bench_compile.py", []),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--raw-env", action="store_true")
    p.add_argument("--summary-only", action="store_true", help="do not run; summarise existing results")
    p.add_argument("--tag", default=None, help="results go to benchmarks/results/<tag>/ (e.g. threads1)")
    p.add_argument("--forward-args", default="", help="extra arguments for bench_forward, e.g. '--batch-sizes 16,64'")
    args = p.parse_args()
    if args.tag:
        os.environ["DCDIT_BENCH_TAG"] = args.tag
    names = args.only.split(",") if args.only else list(BENCHES)
    if not args.summary_only:
        for name in names:
            script, extra = BENCHES[name]
            cmd = [sys.executable, str(HERE / script), *extra]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--raw-env"] if args.raw_env else []
            cmd = _dedupe(cmd + (args.forward_args.split() if name == "forward" else []))
            print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            print(f"({name}: {time.time() - t0:.0f} s)", flush=True)
    folder = C.RESULTS / args.tag if args.tag else C.RESULTS
    folder = folder / "quick" if args.quick else folder
    text = summary(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(text + "\n")
    print("\n" + text)


def _dedupe(cmd: list[str]) -> list[str]:
    """Drop a value-taking option given twice (the later one wins)."""
    out, seen = [], {}
    i = 0
    while i < len(cmd):
        if cmd[i].startswith("--") and i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            seen[cmd[i]] = cmd[i + 1]
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    for k, v in seen.items():
        out += [k, v]
    return out


def summary(folder: Path) -> str:
    def _load(name: str):
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    out = ["| target | measured | met |", "|---|---|---|"]

    def add(target, measured, ok):
        out.append(f"| {target} | {measured} | {'yes' if ok else 'NO'} |")

    fw = _load("forward")
    if fw:
        for prec in sorted({r["precision"] for r in fw["rows"]}):
            for B in sorted({r["batch"] for r in fw["rows"]}):
                rs = [r for r in fw["rows"] if r["precision"] == prec and r["batch"] == B and "kept_share" in r]
                if not rs:
                    continue
                worst = max(r["efficiency"] for r in rs)
                add(f"efficiency <= 1.15 ({prec}, batch {B})",
                    ", ".join(f"{r['model']}: {r['efficiency']:.2f}" for r in rs), worst <= 1.15)
                worst_s = max(r["scaffold_ratio"] for r in rs)
                add(f"scaffold time <= 1.5x FLOP share ({prec}, batch {B})",
                    ", ".join(f"{r['model']}: {r['scaffold_ratio']:.2f}" for r in rs), worst_s <= 1.5)
    dc = _load("dechunk")
    if dc:
        worst = max(r["ratio dechunk"] for r in dc["rows"])
        add("dechunk + plug-back 64x64 / 32x32 <= 5",
            ", ".join(f"share {r['share']:g}: {r['ratio dechunk']:.2f}" for r in dc["rows"]), worst <= 5)
    vl = _load("varlen")
    if vl:
        for r in vl["rows"]:
            if r["backend"] == "sdpa_loop":
                add(f"4x-varied / even kept counts <= 1.1 ({r['precision']})", f"{r['ratio']:.3f}", r["ratio"] <= 1.1)
    tr = _load("train")
    if tr:
        for r in tr["rows"]:
            add(f"bf16 train step >= 2x fp32 ({r['model']})", f"{r['speedup']:.2f}x", r["speedup"] >= 2)
        lo = tr["loss"]
        add(f"bf16 loss within noise of fp32 ({lo['steps']} steps)",
            f"|bf16 - fp32| {lo['bf16_minus_fp32_max']:.4f} vs noise {lo['noise_tolerance']:.4f}", lo["within_noise"])
    mem = _load("memory")
    if mem:
        by = {(r.get("malloc", "tuned"), r["precision"], r["setup"]): r for r in mem["rows"]}
        for (malloc, prec, setup), r in by.items():
            if setup.startswith("DC-DiT"):
                for base in ("DiT-S/2", "DiT-S/1"):
                    b = by.get((malloc, prec, base))
                    if b:
                        ratio = r["peak_rss_mb"] / b["peak_rss_mb"]
                        add(f"peak memory <= {base} ({malloc} malloc, {prec}, {setup}, batch {r['batch']})",
                            f"{r['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} MiB = {ratio:.2f}", ratio <= 1.0)
    return "\n".join(out)


if __name__ == "__main__":
    main()
