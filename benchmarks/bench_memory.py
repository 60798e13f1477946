"""Peak memory of sampling at batch 64: DC-DiT-S vs DiT-S/2 and DiT-S/1 (same main-network size), each in a fresh process.

    python benchmarks/bench_memory.py [--quick] [--batch 64] [--precisions fp32,bf16]

Each setup runs in its own Python process: build the model, reset the
kernel's peak-RSS counter (/proc/self/clear_refs), run a DDIM sampling call of
``--steps`` steps (the per-step peak does not depend on the number of steps),
read VmHWM. Reported: peak RSS of the process, and the peak above the RSS
just before sampling (weights and interpreter excluded). Two allocator
settings: glibc's default (large blocks are mmap'd and returned on free, so
the peak RSS follows the live tensors) and the tuned malloc of the other
benchmarks (freed blocks stay in the heap for reuse: faster, but the RSS then
also holds fragmentation). The target is judged with the default allocator. DC-DiT runs at fixed
kept shares 1/2 and 1/4 (exact, as in bench_forward) and with the
timestep schedule of bench_sampling. Target: DC-DiT's peak <= DiT's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)

SETUPS = ["DiT-S/2", "DiT-S/1", "DC-DiT-S keep 1/2", "DC-DiT-S keep 1/4", "DC-DiT-S keep 1/16 -> 1/2"]


def child(setup: str, precision: str, batch: int, steps: int) -> None:
    import torch

    from dcdit.sampling import create_sampling_diffusion
    from dcdit.sampling.sampler import sample

    # build only the model this process measures (freed memory would stay in the RSS)
    if setup == "DiT-S/2":
        model = C.wrap(C.build_dit("S", 2), precision)
    elif setup == "DiT-S/1":
        model = C.wrap(C.build_dit("S", 1), precision)
    else:
        from dcdit.models import build_dcdit

        torch.manual_seed(0)
        dc = build_dcdit("DC-DiT-S-N4", input_size=32).eval()
        C.keep_all_boundaries(dc)
        sched = {"DC-DiT-S keep 1/2": lambda t: torch.full_like(t, 0.5),
                 "DC-DiT-S keep 1/4": lambda t: torch.full_like(t, 0.25),
                 "DC-DiT-S keep 1/16 -> 1/2": C.linear_keep_schedule()}[setup]
        model = C.wrap(dc, precision, sched)
    diffusion = create_sampling_diffusion("ddim", steps, True)
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ok = C.reset_peak_rss()
    before, _ = C.rss_mb()
    with torch.inference_mode():
        sample(model, diffusion, list(range(batch)), seed=0, sampler="ddim", clip_denoised=False,
               measure_flops=False)
    _, peak = C.rss_mb()
    print(json.dumps({"setup": setup, "precision": precision, "batch": batch, "steps": steps,
                      "params_mb": params_mb, "rss_before_mb": before, "peak_rss_mb": peak,
                      "peak_above_start_mb": peak - before, "reset_ok": ok, "threads": torch.get_num_threads()}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, setup, precision, batch, steps = sys.argv
        import torch

        if os.environ.get("DCDIT_BENCH_THREADS"):
            torch.set_num_threads(int(os.environ["DCDIT_BENCH_THREADS"]))
        child(setup, precision, int(batch), int(steps))
        return
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--malloc", default="default,tuned", help="allocator settings to run: default, tuned or both")
    args = p.parse_args()
    C.setup(args, "memory")
    if args.quick:
        args.precisions = "bf16"
    info = C.machine()
    C.log(f"machine: {info}")
    rows = []
    for malloc in args.malloc.split(","):
        env = dict(os.environ)
        if args.threads:
            env["DCDIT_BENCH_THREADS"] = str(args.threads)
        if malloc == "default":
            for k in C.TUNED_ENV:
                if k.startswith("MALLOC_"):
                    env.pop(k, None)
        for precision in args.precisions.split(","):
            for setup in args.setups.split(","):
                C.log(f"{malloc} malloc, {precision} {setup}: batch {args.batch}, {args.steps} DDIM step(s), "
                      f"fresh process")
                out = subprocess.run([sys.executable, __file__, "--child", setup, precision, str(args.batch),
                                      str(args.steps)], capture_output=True, text=True, env=env)
                if out.returncode:
                    raise RuntimeError(f"{setup} {precision} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["malloc"] = malloc
                rows.append(row)
                C.log(f"  peak RSS {row['peak_rss_mb']:.0f} MiB (+{row['peak_above_start_mb']:.0f} over start; "
                      f"weights {row['params_mb']:.0f} MiB)")
    print(report(rows))
    C.save(args, {"benchmark": "memory", "machine": info, "args": vars(args), "rows": rows})


def report(rows: list[dict]) -> str:
    head = ["malloc", "precision", "setup (batch %d)" % rows[0]["batch"], "weights MiB", "peak RSS MiB",
            "peak above start MiB", "peak / DiT-S/2", "peak / DiT-S/1"]
    by = {(r.get("malloc", "tuned"), r["precision"], r["setup"]): r for r in rows}
    body = []
    for r in rows:
        m = r.get("malloc", "tuned")
        rel = []
        for base in ("DiT-S/2", "DiT-S/1"):
            b = by.get((m, r["precision"], base))
            rel.append("-" if b is None else f"{r['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
        body.append([m, r["precision"], r["setup"], f"{r['params_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['peak_above_start_mb']:.0f}", *rel])
    return C.md_table(head, body)


if __name__ == "__main__":
    main()
