"""When to pad: one masked call vs one call per run of equal lengths, for DC-DiT's bf16 CPU training attention.

    python benchmarks/bench_pad_rule.py [--quick] [--ckpt RUN/ckpt-N] [--threads 1]

Part 1, attention alone (``dcdit.attention.varlen_attention``, forward + backward, bf16, 4 heads x
32, 64 sequences): for length distributions like a DC-DiT main network's (normal, mean / sd below),
the time with one call per run of equal lengths and with one padded call (``PAD_RULE`` set to
never / always pad), and which one the old rule (pad when B * max(L)^2 <= 2 sum L_i^2) and the new
rule (``pad_pays``: the padding's extra token pairs against ``PAD_CALL_COST`` per call saved) pick.

Part 2, the whole training step (``train_step`` + backward + clip + AdamW, bf16 autocast, batch 64)
of the sparse-canvas DC-DiT (``configs/canvas/dcdit.yaml``: ~51 of 256 tokens kept), with the old
rule and with the new, interleaved in one process; each timed round is four steps on four draws of
(t, noise), the same for both rules. ``--ckpt`` takes a trained checkpoint's weights
(its router's real length spread); default: the untrained model with its router calibrated to keep
1/5.
"""
from __future__ import annotations

from pathlib import Path

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # training steps per timed round (four timestep draws)
DISTS = [(52, 10), (52, 20), (30, 15), (64, 30), (100, 40)]  # (mean, sd) of the kept lengths


def old_rule(lengths, max_seqlen) -> bool:
    if not lengths or len(set(lengths)) == 1:
        return False
    return len(lengths) * int(max_seqlen) ** 2 <= 2.0 * sum(int(n) ** 2 for n in lengths)


def with_rule(B, rule, fn):
    """``fn`` run with ``B.PAD_RULE = rule`` (restored after)."""
    def run():
        saved, B.PAD_RULE = B.PAD_RULE, rule
        try:
            fn()
        finally:
            B.PAD_RULE = saved
    return run


def attention_part(torch, B, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for mean, sd in DISTS:
        lens = [int(min(256, max(1, round(float(torch.normal(float(mean), float(sd), (1,), generator=g)))))) for _ in range(64)]
        T, mx = sum(lens), max(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
        qkv = [torch.randn(T, 4, 32, generator=g).bfloat16() for _ in range(3)]

        def call():
            q, k, v = (t.clone().requires_grad_() for t in qkv)
            B.varlen_attention(q, k, v, cu, mx, lens, backend="sdpa_loop").float().sum().backward()

        t = C.interleaved({"loop": with_rule(B, lambda *_: False, call), "padded": with_rule(B, lambda *_: True, call)},
                          repeats)
        loop_ms, pad_ms = C.median(t["loop"]) * 1e3, C.median(t["padded"]) * 1e3
        best = "padded" if pad_ms < loop_ms else "loop"
        rows.append({"mean": mean, "sd": sd, "max": mx, "distinct": len(set(lens)), "loop_ms": loop_ms,
                     "padded_ms": pad_ms, "faster": best, "old_rule": "padded" if old_rule(lens, mx) else "loop",
                     "new_rule": "padded" if B.pad_pays(lens, mx) else "loop"})
        C.log(rows[-1])
    return rows


def step_part(torch, B, ckpt, repeats: int) -> dict:
    from dcdit.checkpoint import load_model
    from dcdit.data import build_dataset
    from dcdit.diffusion import create_diffusion
    from dcdit.sampling.cost import calibrate_router_bias
    from dcdit.training import load_train_config, train_step
    from dcdit.training.trainer import build_train_model

    cfg = load_train_config(ROOT / "configs" / "canvas" / "dcdit.yaml")
    ds = build_dataset(cfg.data)
    torch.manual_seed(0)
    if ckpt:
        model = load_model(ckpt, which="model")
    else:
        model = build_train_model(cfg, ds)
        calibrate_router_bias(model, 0.2)
    model.train()
    diffusion = create_diffusion("", min_snr_gamma=5.0, prediction="v")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.stack([ds[i][0] for i in range(64)])
    y = torch.tensor([ds[i][1] for i in range(64)])
    g = torch.Generator().manual_seed(0)
    # STEPS draws of (t, noise): the kept lengths, and so the rules' choices, change with t
    draws = [(torch.randint(0, 1000, (64,), generator=g), torch.randn(x.shape, generator=g)) for _ in range(STEPS)]

    def steps():  # STEPS optimizer steps, one per draw
        for t, noise in draws:
            loss, _ = train_step(model, diffusion, x, y, t, noise, ratio_weight=0.03, ratio_N=5.0, ratio_group=16,
                                 bf16=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = C.interleaved({"old rule": with_rule(B, old_rule, steps), "new rule": with_rule(B, B.pad_pays, steps)},
                          repeats)
    med = {k: C.median(v) / STEPS for k, v in times.items()}
    return {"ckpt": ckpt, "batch": 64, "steps_per_round": STEPS, "step_seconds": med,
            "images_per_sec": {k: 64 / v for k, v in med.items()}, "speedup": med["old rule"] / med["new rule"],
            "round_seconds": times}


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="trained canvas DC-DiT checkpoint (default: untrained, calibrated)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch = C.setup(args, "pad_rule")
    import dcdit.attention.backends as B

    reps = 3 if args.quick else args.repeats
    att = attention_part(torch, B, reps)
    st = step_part(torch, B, args.ckpt, reps)
    C.log(f"training step: old rule {st['images_per_sec']['old rule']:.1f} img/s, new rule "
          f"{st['images_per_sec']['new rule']:.1f} img/s ({st['speedup']:.2f}x)")
    print(C.md_table(["lengths mean / sd", "max", "distinct", "loop ms", "padded ms", "faster", "old rule", "new rule"],
                     [[f"{r['mean']} / {r['sd']}", r["max"], r["distinct"], f"{r['loop_ms']:.1f}", f"{r['padded_ms']:.1f}",
                       r["faster"], r["old_rule"], r["new_rule"]] for r in att]))
    C.save(args, {"machine": C.machine(), "threads": torch.get_num_threads(), "pad_call_cost": B.PAD_CALL_COST,
                  "attention": att, "train_step": st})


if __name__ == "__main__":
    main()
