"""Variable kept lengths: a batch whose kept counts vary 4x vs the same total split evenly (DC-DiT-S forward).

    python benchmarks/bench_varlen.py [--quick]

Batch 16 on a 32x32x4 latent, 4096 kept tokens in total (a mean share of 1/4):
"even" keeps 256 per sample; "varied" keeps 102 ... 410 (linearly spaced, max/min
= 4.02, same total), set exactly per sample through per-sample tail-drop
fractions. Times the whole forward and its main network (forward hooks), for
each attention backend usable on the device (sdpa_loop: one SDPA call per run
of equal lengths; padded: B x max(L) with a key mask, the padding baseline).
Target: varied / even <= 1.1 for the default backend. The varied batch does
about 1.5% more FLOPs (attention is sum L_i^2); the table lists both ratios.
"""
from __future__ import annotations


import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--backends", default="sdpa_loop,padded")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", action="store_true",
                   help="also time DC-DiT with compile_main_network(bucket=256, dynamic=False) ('compiled' backend)")
    args = p.parse_args()
    torch = C.setup(args, "varlen_compiled" if args.compile else "varlen")
    if args.quick:
        args.repeats = 2
    info = C.machine()
    C.log(f"machine: {info}")
    import numpy as np

    from dcdit.flops import count_model_flops

    _, dc = C.build_pair("S")
    B, L = args.batch, 1024
    total = B * L // 4
    a = total / (B * 2.5)
    counts = np.round(np.linspace(a, 4 * a, B)).astype(int)
    counts[-1] += total - counts.sum()
    frac = lambda ks: torch.tensor([(L - int(k) + 0.5) / L for k in ks], dtype=torch.float32)
    setups = {"even": [total // B] * B, "varied": counts.tolist()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    flops = {}
    for name, ks in setups.items():
        rep, (_, routing) = count_model_flops(dc, x, t, y, tail_drop=frac(ks))
        assert routing[0].num_kept.tolist() == list(ks), (routing[0].num_kept.tolist(), ks)
        flops[name] = rep.total / 1e9 / B
    C.log(f"kept counts varied: {counts.tolist()} (sum {counts.sum()}, max/min {counts.max() / counts.min():.2f})")

    timer = C.ComponentTimer(dc)
    if args.compile:
        _, dcc = C.build_pair("S")
        dcc.compile_main_network(bucket=256, dynamic=False)
        ctimer = C.ComponentTimer(dcc)
    rows = []
    for precision in args.precisions.split(","):
        fns, main_s = {}, {}
        backends = args.backends.split(",") + (["compiled"] if args.compile else [])
        for backend in backends:
            for name, ks in setups.items():
                key = f"{backend}/{name}"
                f = frac(ks)
                if backend == "compiled":
                    fns[key] = lambda f=f: dcc(x, t, y, tail_drop=f)
                else:
                    fns[key] = lambda f=f, b=backend: dc.set_attn_backend(b)(x, t, y, tail_drop=f)
                main_s[key] = []
        state = {}

        def before(k):
            state["cm"] = (ctimer if k.startswith("compiled/") else timer).record()
            state["acc"] = state["cm"].__enter__()

        def after(k):
            state["cm"].__exit__(None, None, None)
            main_s[k].append(state["acc"].get("main_network", 0.0))

        C.log(f"{precision}: 1 warm-up + {args.repeats} interleaved rounds of {list(fns)}")
        with torch.inference_mode(), C.autocast(precision):
            times = C.interleaved(fns, args.repeats, 1, before, after)
        dc.set_attn_backend("auto")
        for backend in backends:
            ev, va = f"{backend}/even", f"{backend}/varied"
            row = {"precision": precision, "backend": backend,
                   "even_s": C.median(times[ev]), "varied_s": C.median(times[va]),
                   "even_main_s": C.median(main_s[ev]), "varied_main_s": C.median(main_s[va]),
                   "seconds": {"even": times[ev], "varied": times[va]},
                   "flops_ratio": flops["varied"] / flops["even"]}
            row["ratio"] = row["varied_s"] / row["even_s"]
            row["main_ratio"] = row["varied_main_s"] / row["even_main_s"]
            rows.append(row)
            C.log(f"  {backend:10s} even {row['even_s']:.3f}s varied {row['varied_s']:.3f}s -> {row['ratio']:.3f} "
                  f"(main network {row['main_ratio']:.3f}; FLOPs {row['flops_ratio']:.3f})")
    timer.remove()
    print(report(rows))
    C.save(args, {"benchmark": "varlen", "machine": info, "args": vars(args), "counts": setups,
                  "gflops_per_image": flops, "rows": rows})


def report(rows: list[dict]) -> str:
    head = ["precision", "attention backend", "even s", "varied s", "varied / even (<= 1.1)", "main network ratio",
            "FLOPs ratio"]
    body = [[r["precision"], r["backend"], f"{r['even_s']:.3f}", f"{r['varied_s']:.3f}", f"{r['ratio']:.3f}",
             f"{r['main_ratio']:.3f}", f"{r['flops_ratio']:.3f}"] for r in rows]
    return C.md_table(head, body)


if __name__ == "__main__":
    main()
