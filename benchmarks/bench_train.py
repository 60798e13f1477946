"""One training step, fp32 vs bf16 autocast, and the loss of a small 200-step run in both precisions.

    python benchmarks/bench_train.py [--quick]

Step timing: DC-DiT-S-N4 on 32x32x4 latents, batch 16, 1/4 of the tokens kept
(exact, via tail dropping), and DiT-S/2 for reference: forward, DiT's hybrid
diffusion loss (+ 0.03 ratio loss for DC-DiT), backward, grad clip 1.0,
AdamW. bf16 runs the forward under torch.autocast(bfloat16); the router,
residual projection and dechunk stay fp32 inside the model. fp32 and bf16
steps are interleaved on one model. Target: bf16 >= 2x faster than fp32.

Loss check: a small DC-DiT (width 96, 3 DiT blocks, 16x16x4 synthetic latents
of 10 classes, natural routing, batch 16, AdamW 1e-3) trained 200 steps from the
same init and data in fp32 (seeds 0 and 1) and bf16 (seeds 0 and 1). "Within
noise" means the bf16 - fp32 difference of the mean loss over the last 100
steps is no larger than the fp32 seed-to-seed difference or twice the paired
standard error, whichever is larger.
"""
from __future__ import annotations

import math
import time

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)


def make_step(torch, model, diffusion, opt, x, y, tail_drop, bf16: bool, ratio_N=None):
    """A full optimizer step: :func:`dcdit.training.train_step` (the trainer's objective, ratio loss at the
    default weight of :class:`~dcdit.training.config.RatioConfig`), backward, clip 1.0, AdamW."""
    from dcdit.training import train_step
    from dcdit.training.config import RatioConfig

    def step(t, noise):
        loss, _ = train_step(model, diffusion, x, y, t, noise, tail_drop=tail_drop, bf16=bf16,
                             ratio_weight=RatioConfig.weight if ratio_N is not None else 0.0, ratio_N=ratio_N)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timing(torch, args) -> list[dict]:
    from dcdit.diffusion import create_diffusion

    _, dc = C.build_pair("S")
    dit2 = C.build_dit("S", 2)
    diffusion = create_diffusion(None)
    B = args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    f = C.drop_for_share(0.25, 1024)
    fns = {}
    for name, model, ratio_N in (("DC-DiT-S keep 1/4", dc, 4.0), ("DiT-S/2", dit2, None)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        for prec in ("fp32", "bf16"):
            step = make_step(torch, model, diffusion, opt, x, y, f, prec == "bf16", ratio_N)
            fns[f"{name}|{prec}"] = lambda step=step: step(torch.randint(0, 1000, (B,), generator=g),
                                                          torch.randn(B, 4, 32, 32, generator=g))
    C.log(f"train step timing: 1 warm-up + {args.repeats} interleaved rounds of {list(fns)}")
    times = C.interleaved(fns, args.repeats, 1)
    rows = []
    for name in ("DC-DiT-S keep 1/4", "DiT-S/2"):
        fp, bf = C.median(times[f"{name}|fp32"]), C.median(times[f"{name}|bf16"])
        rows.append({"model": name, "batch": B, "fp32_s": fp, "bf16_s": bf, "speedup": fp / bf,
                     "seconds": {"fp32": times[f"{name}|fp32"], "bf16": times[f"{name}|bf16"]}})
        C.log(f"  {name}: fp32 {fp:.3f}s bf16 {bf:.3f}s -> {fp / bf:.2f}x")
    return rows


# --------------------------------------------------------------------------- #
#                            200-step loss check                              #
# --------------------------------------------------------------------------- #

def synthetic_latents(torch, n: int = 512, side: int = 16, classes: int = 10, seed: int = 0):
    """Class templates (4x4 random fields upsampled) plus smooth per-sample noise: (n, 4, side, side), labels."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 4, 4, 4, generator=g), size=side, mode="bilinear",
                              align_corners=False)
    labels = torch.arange(n) % classes
    noise = F.interpolate(torch.randn(n, 4, side // 2, side // 2, generator=g), size=side, mode="bilinear",
                          align_corners=False)
    return templates[labels] + 0.4 * noise, labels


def loss_run(torch, data, labels, seed: int, bf16: bool, steps: int, batch: int) -> list[float]:
    from dcdit.diffusion import create_diffusion
    from dcdit.models import DCDiT, DCDiTConfig

    torch.manual_seed(1234)  # same init for every run
    cfg = DCDiTConfig(input_size=16, in_channels=4, num_classes=10, arch_layout=["c1", ["D3"], "c1"],
                      d_model=[96, 96], num_heads=[4, 4], enc_dec_dim_factor=[3, None], class_dropout_prob=0.0,
                      norm_groups=16, router_norm_groups=8)
    model = DCDiT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    diffusion = create_diffusion(None)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
        noise = torch.randn(batch, *data.shape[1:], generator=g)
        step = make_step(torch, model, diffusion, opt, data[idx], labels[idx], 0.0, bf16, 4.0)
        losses.append(step(t, noise))
    return losses


def loss_check(torch, args) -> dict:
    data, labels = synthetic_latents(torch)
    runs = {}
    for seed in (0, 1):
        for prec in ("fp32", "bf16"):
            t0 = time.perf_counter()
            runs[f"{prec}/seed{seed}"] = loss_run(torch, data, labels, seed, prec == "bf16", args.loss_steps, 16)
            C.log(f"  loss run {prec} seed {seed}: {time.perf_counter() - t0:.1f}s, "
                  f"last-100 mean {sum(runs[f'{prec}/seed{seed}'][-100:]) / 100:.4f}")
    w = min(100, args.loss_steps // 2)
    mean = lambda v: sum(v[-w:]) / w
    means = {k: mean(v) for k, v in runs.items()}
    out = {"steps": args.loss_steps, "window": w, "means": means, "first10": {k: v[:10] for k, v in runs.items()}}
    for seed in (0, 1):
        d = [b - a for a, b in zip(runs[f"fp32/seed{seed}"][-w:], runs[f"bf16/seed{seed}"][-w:])]
        m = sum(d) / w
        se = math.sqrt(sum((v - m) ** 2 for v in d) / (w - 1) / w)
        out[f"paired_diff_seed{seed}"] = {"mean": m, "se": se}
    spread = abs(means["fp32/seed1"] - means["fp32/seed0"])
    out["fp32_seed_spread"] = spread
    worst = max(abs(out[f"paired_diff_seed{s}"]["mean"]) for s in (0, 1))
    tol = max(spread, 2 * max(out[f"paired_diff_seed{s}"]["se"] for s in (0, 1)))
    out["bf16_minus_fp32_max"] = worst
    out["noise_tolerance"] = tol
    out["within_noise"] = worst <= tol
    out["losses"] = runs
    return out


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=200)
    args = p.parse_args()
    torch = C.setup(args, "train")
    if args.quick:
        args.repeats, args.loss_steps = 1, 40
    info = C.machine()
    C.log(f"machine: {info}")
    rows = timing(torch, args)
    loss = loss_check(torch, args)
    print(report(rows, loss))
    C.save(args, {"benchmark": "train", "machine": info, "args": vars(args), "rows": rows, "loss": loss})


def report(rows: list[dict], loss: dict) -> str:
    head = ["model (batch 16)", "fp32 step s", "bf16 step s", "bf16 speed-up (>= 2)"]
    body = [[r["model"], f"{r['fp32_s']:.3f}", f"{r['bf16_s']:.3f}", f"{r['speedup']:.2f}x"] for r in rows]
    m = loss["means"]
    lines = [C.md_table(head, body), "",
             f"Loss, mean of the last {loss['window']} of {loss['steps']} steps (small DC-DiT, synthetic latents):",
             "", C.md_table(["run", "seed 0", "seed 1"],
                            [[p, f"{m[p + '/seed0']:.4f}", f"{m[p + '/seed1']:.4f}"] for p in ("fp32", "bf16")]),
             "", f"bf16 - fp32 (paired, same seed): seed 0 {loss['paired_diff_seed0']['mean']:+.4f} "
                 f"(SE {loss['paired_diff_seed0']['se']:.4f}), seed 1 {loss['paired_diff_seed1']['mean']:+.4f} "
                 f"(SE {loss['paired_diff_seed1']['se']:.4f}); fp32 seed-to-seed spread "
                 f"{loss['fp32_seed_spread']:.4f}; within noise: {loss['within_noise']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
