"""Forward latency/throughput: DiT vs DC-DiT (same main network) over batch sizes, kept shares, precisions.

    python benchmarks/bench_forward.py            # batches 1,16,64; fp32 and bf16 autocast
    python benchmarks/bench_forward.py --quick    # batch 16, one repeat

Models: DiT-S at patch 1 on a 32x32x4 latent (its 12 blocks see all 1024
tokens) and DC-DiT-S-N4 whose main network is the same 12 blocks; DiT-S/2 (256
tokens, the paper's iso-size baseline) is timed alongside for reference.
Kept shares are exact: every token is made a natural boundary (router bias)
and tail dropping keeps round(share * 1024) tokens per sample.

Targets read from the output:
* efficiency = (time DC / time DiT-S/1) / (FLOPs DC / FLOPs DiT-S/1) <= 1.15;
* scaffold = (scaffold time share) / (scaffold FLOP share) <= 1.5, where the
  scaffold is everything but the main network (stem, embeddings, encoder,
  residual, router, chunk, dechunk, decoder, final layer) and time shares come
  from forward hooks on the model's top-level modules.
"""
from __future__ import annotations


import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)

SHARES = {"1/2": 0.5, "1/4": 0.25, "1/16": 1 / 16}


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--size", default="S", choices=("S", "B", "L", "XL"))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds at batch <= 16 (default 3)")
    p.add_argument("--repeats-large", type=int, default=2, help="timed rounds at batch > 16 (default 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-dit2", action="store_true", help="skip the DiT-S/2 reference rows")
    args = p.parse_args()
    torch = C.setup(args, "forward")
    if args.quick:
        args.batch_sizes, args.repeats, args.repeats_large = "16", 1, 1
    batches = [int(b) for b in args.batch_sizes.split(",")]
    precisions = args.precisions.split(",")
    info = C.machine()
    C.log(f"machine: {info}")

    from dcdit.flops import count_model_flops

    dit, dc = C.build_pair(args.size)
    dit2 = None if args.no_dit2 else C.build_dit(args.size, 2)
    L = 32 * 32
    drops = {k: C.drop_for_share(s, L) for k, s in SHARES.items()}

    # FLOPs per image (independent of batch and precision here: every sample keeps the same count)
    g = torch.Generator().manual_seed(0)
    x2, t2, y2 = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 900]), torch.tensor([1, 2])
    flops = {}
    rep, _ = count_model_flops(dit, x2, t2, y2)
    flops["DiT"] = {"gflops": rep.gflops_per_image, "by_component": {}}
    if dit2 is not None:
        rep, _ = count_model_flops(dit2, x2, t2, y2)
        flops["DiT/2"] = {"gflops": rep.gflops_per_image, "by_component": {}}
    for k, f in drops.items():
        rep, (_, routing) = count_model_flops(dc, x2, t2, y2, tail_drop=f)
        C.check_shares(routing, SHARES[k], L)
        flops[k] = {"gflops": rep.gflops_per_image,
                    "by_component": {c: v / 1e9 / 2 for c, v in rep.by_component.items()}}
    C.log("GFLOPs/image:", {k: round(v["gflops"], 3) for k, v in flops.items()})

    timer = C.ComponentTimer(dc)
    rows = []
    for precision in precisions:
        for B in batches:
            g = torch.Generator().manual_seed(B)
            x = torch.randn(B, 4, 32, 32, generator=g)
            t = torch.randint(0, 1000, (B,), generator=g)
            y = torch.randint(0, 1000, (B,), generator=g)
            fns = {"DiT": lambda: dit(x, t, y)}
            if dit2 is not None:
                fns["DiT/2"] = lambda: dit2(x, t, y)
            for k, f in drops.items():
                fns[k] = lambda f=f: dc(x, t, y, tail_drop=f)
            comps: dict[str, list[dict]] = {k: [] for k in drops}
            state = {}

            def before(name):
                if name in drops:
                    state["cm"] = timer.record()
                    state["acc"] = state["cm"].__enter__()

            def after(name):
                if name in drops:
                    state["cm"].__exit__(None, None, None)
                    comps[name].append(dict(state["acc"]))

            repeats = args.repeats if B <= 16 else args.repeats_large
            C.log(f"{precision} batch {B}: {args.warmup} warm-up + {repeats} interleaved rounds of {list(fns)}")
            with torch.inference_mode(), C.autocast(precision):
                _, routing = dc(x, t, y, tail_drop=drops["1/4"])
                C.check_shares(routing, 0.25, L)
                times = C.interleaved(fns, repeats, args.warmup, before, after)
            t_dit = C.median(times["DiT"])
            for name, ts in times.items():
                tm = C.median(ts)
                row = {"precision": precision, "batch": B, "model": name, "seconds": ts, "median_s": tm,
                       "images_per_s": B / tm, "gflops_per_image": flops[name]["gflops"],
                       "time_vs_dit": tm / t_dit, "flops_vs_dit": flops[name]["gflops"] / flops["DiT"]["gflops"]}
                row["efficiency"] = row["time_vs_dit"] / row["flops_vs_dit"]
                if name in drops:
                    fc = flops[name]["by_component"]
                    flop_main = fc.get("main network", 0.0) / flops[name]["gflops"]
                    # per-run time shares: main network module vs the whole forward
                    shares = [1 - c.get("main_network", 0.0) / s for c, s in zip(comps[name], ts)]
                    row.update({
                        "kept_share": SHARES[name], "scaffold_flop_share": 1 - flop_main,
                        "scaffold_time_share": C.median(shares),
                        "component_seconds": {k: C.median([c.get(k, 0.0) for c in comps[name]])
                                              for k in comps[name][0]},
                    })
                    row["scaffold_ratio"] = row["scaffold_time_share"] / row["scaffold_flop_share"]
                rows.append(row)
                C.log(f"  {name:6s} {tm:8.3f}s  {B / tm:7.2f} img/s  time/DiT {row['time_vs_dit']:.3f}  "
                      f"FLOPs/DiT {row['flops_vs_dit']:.3f}  eff {row['efficiency']:.3f}"
                      + (f"  scaffold {row['scaffold_time_share']:.3f}/{row['scaffold_flop_share']:.3f}"
                         f" = {row['scaffold_ratio']:.2f}" if name in drops else ""))
    timer.remove()
    print(report(rows))
    C.save(args, {"benchmark": "forward", "machine": info, "args": vars(args), "flops": flops, "rows": rows})


def label(name: str, size: str = "S") -> str:
    return {"DiT": f"DiT-{size}/1", "DiT/2": f"DiT-{size}/2"}.get(name, f"DC-DiT-{size} keep {name}")


def report(rows: list[dict]) -> str:
    head = ["precision", "batch", "model", "GFLOPs/img", "median s", "img/s", "time / DiT-S/1", "FLOPs / DiT-S/1",
            "efficiency (<= 1.15)", "scaffold time / FLOP share (<= 1.5)"]
    body = []
    for r in rows:
        sc = (f"{r['scaffold_time_share']:.3f} / {r['scaffold_flop_share']:.3f} = {r['scaffold_ratio']:.2f}"
              if "scaffold_ratio" in r else "-")
        eff = "-" if r["model"] == "DiT" else f"{r['efficiency']:.2f}"
        body.append([r["precision"], r["batch"], label(r["model"]), f"{r['gflops_per_image']:.2f}",
                     f"{r['median_s']:.3f}", f"{r['images_per_s']:.2f}", f"{r['time_vs_dit']:.3f}",
                     f"{r['flops_vs_dit']:.3f}", eff, sc])
    return C.md_table(head, body)


if __name__ == "__main__":
    main()
