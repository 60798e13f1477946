"""Optional torch.compile of DC-DiT's main network (inference): compile time, graphs, speed vs eager.

    python benchmarks/bench_compile.py [--quick]

DC-DiT-S on 32x32x4 latents, batch 16, bf16 autocast (and fp32), kept shares
1/4 and 1/16 (exact). ``model.compile_main_network(bucket=256, dynamic=False)``
compiles one graph per bucketed token count, shared by all 12 blocks and
independent of the per-sample lengths (attention is an opaque op). Reports the
first-call (compile) time, the number of graphs, eager vs compiled medians.
"""
from __future__ import annotations

import time

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--bucket", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch = C.setup(args, "compile")
    if args.quick:
        args.repeats, args.precisions = 2, "bf16"
    info = C.machine()
    C.log(f"machine: {info}")
    from torch._dynamo.utils import counters

    _, eager = C.build_pair("S")
    _, comp = C.build_pair("S")
    comp.compile_main_network(bucket=args.bucket, dynamic=False)
    B = args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    shares = {"1/4": 0.25, "1/16": 1 / 16}
    rows = []
    for precision in args.precisions.split(","):
        first = {}
        with torch.inference_mode(), C.autocast(precision):
            for k, s in shares.items():
                t0 = time.perf_counter()
                comp(x, t, y, tail_drop=C.drop_for_share(s, 1024))
                first[k] = time.perf_counter() - t0
            fns = {}
            for k, s in shares.items():
                f = C.drop_for_share(s, 1024)
                fns[f"eager {k}"] = lambda f=f: eager(x, t, y, tail_drop=f)
                fns[f"compiled {k}"] = lambda f=f: comp(x, t, y, tail_drop=f)
            times = C.interleaved(fns, args.repeats, 1)
        for k in shares:
            e, c = C.median(times[f"eager {k}"]), C.median(times[f"compiled {k}"])
            rows.append({"precision": precision, "share": k, "batch": B, "first_call_s": first[k], "eager_s": e,
                         "compiled_s": c, "speedup": e / c})
            C.log(f"  {precision} keep {k}: first call {first[k]:.1f}s, eager {e:.3f}s, compiled {c:.3f}s "
                  f"({e / c:.2f}x)")
    graphs = int(counters["stats"].get("unique_graphs", 0))
    print(report(rows, graphs, args.bucket))
    C.save(args, {"benchmark": "compile", "machine": info, "args": vars(args), "unique_graphs": graphs,
                  "rows": rows})


def report(rows, graphs, bucket) -> str:
    head = ["precision", "kept share", "first call (compile) s", "eager s", "compiled s", "speed-up"]
    body = [[r["precision"], r["share"], f"{r['first_call_s']:.1f}", f"{r['eager_s']:.3f}", f"{r['compiled_s']:.3f}",
             f"{r['speedup']:.2f}x"] for r in rows]
    return C.md_table(head, body) + f"\n\ncompiled graphs in total: {graphs} (bucket {bucket})"


if __name__ == "__main__":
    main()
