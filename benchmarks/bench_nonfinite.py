"""What the non-finite step check costs a training step (issue 28): with and without it, side by side.

    python benchmarks/bench_nonfinite.py --threads 1 [--quick]

The trainer's step (``train_step`` + backward + clip + AdamW + EMA, the ratio loss for DC-DiT) is
timed on one model, interleaved round by round: as before issue 28 ("plain"); with the check the
trainer now runs between clipping and the optimizer ("checked": the trainer's own
:func:`dcdit.training.trainer.agree_on_step` -- isfinite of the diffusion and ratio losses and of
the gradient norm, read back in one host sync -- and the branch on it); and "plain again", the
same step as "plain", whose difference from it is the comparison's noise. Three models: the
tests' tiny DiT (a ~ms step: the worst case for a fixed per-step cost), and the CPU configs' DiT
and DC-DiT (configs/shapes_*_cpu.yaml, fp32, batch 64). The check is also timed alone (median of
200 calls). Both wall-clock and the thread's CPU time are reported: run with --threads 1, so the
step's work runs on the timed thread and the CPU time leaves out the waits of a loaded machine.
Target: < 2 % of the step time.
"""
from __future__ import annotations

import statistics
import time

import common as C  # benchmarks/common.py (a script's own folder is first on sys.path)

TINY = ["model.arch=dit", "model.preset=DiT-S/2", "model.overrides={hidden_size: 32, depth: 1, num_heads: 2}",
        "data.image_size=8", "train.global_batch_size=8"]
MODELS = {  # name -> (config, overrides)
    "tiny DiT (tests), batch 8": ("shapes_dit_cpu.yaml", TINY),
    "shapes DiT/4, batch 64": ("shapes_dit_cpu.yaml", []),
    "shapes DC-DiT N=4, batch 64": ("shapes_dcdit_cpu.yaml", []),
}


def make_steps(torch, name: str, config: str, overrides: list[str]):
    """(plain step, checked step, check alone) for one model: the trainer's step on fixed batches."""
    from dcdit.chunking.ratio import ratio_targets
    from dcdit.data import build_dataset
    from dcdit.diffusion import create_diffusion
    from dcdit.models import is_dcdit
    from dcdit.training import load_train_config, train_step
    from dcdit.training.distributed import DistInfo
    from dcdit.training.trainer import agree_on_step, build_train_model, update_ema

    cfg = load_train_config(C.ROOT / "configs" / config, overrides + ["data.num_samples=64", "train.precision=fp32"])
    dataset = build_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_train_model(cfg, dataset).train()
    ema = build_train_model(cfg, dataset).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    diffusion = create_diffusion("", prediction=model.config.get("prediction", "epsilon"))
    dc = is_dcdit(model)
    ratio_N = ratio_targets(cfg.ratio, 0, model.cfg.num_chunk_stages, model.config.get("downsample_factor")) if dc else None
    B = cfg.train.global_batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, dataset.channels, dataset.image_size, dataset.image_size, generator=g)
    y = torch.randint(0, dataset.num_classes, (B,), generator=g)
    info = DistInfo()
    last = {}

    def forward_backward():
        t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g)
        loss, stats = train_step(model, diffusion, x, y, t, torch.randn(x.shape, generator=g),
                                 ratio_weight=cfg.ratio.weight if dc else 0.0, ratio_N=ratio_N, ratio_group=16)
        loss.backward()
        return stats, torch.nn.utils.clip_grad_norm_(params, 1.0)

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.999)

    def plain():
        forward_backward()
        update()

    def checked():
        stats, grad_norm = forward_backward()
        bad, _ = agree_on_step(stats, grad_norm, False, info)
        if bad:
            opt.zero_grad(set_to_none=True)
        else:
            update()
        last.update(stats=stats, grad_norm=grad_norm)

    def check_alone():
        return agree_on_step(last["stats"], last["grad_norm"], False, info)

    return plain, checked, check_alone


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """common.interleaved, timing both wall-clock and this thread's CPU time (with one torch thread the
    work runs on it, so a loaded machine's waiting, which wall-clock counts, stays out); the order of
    the setups rotates from round to round, so none always runs first or right after another."""
    out = {"wall": {k: [] for k in fns}, "cpu": {k: [] for k in fns}}
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f = fns[k]
            w, c = time.perf_counter(), time.thread_time()
            f()
            out["cpu"][k].append(time.thread_time() - c)
            out["wall"][k].append(time.perf_counter() - w)
    return out


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per model (default: 15)")
    p.add_argument("--only", default=None, help="only the models whose name contains this")
    args = p.parse_args()
    torch = C.setup(args, "nonfinite")
    rounds = 5 if args.quick else args.rounds
    rows = []
    for name, (config, overrides) in MODELS.items():
        if args.only and args.only not in name:
            continue
        plain, checked, alone = make_steps(torch, name, config, overrides)
        reps = rounds * (20 if name.startswith("tiny") else 1)  # a ms step: more rounds for a stable median
        # "plain again" is the same step as "plain": its difference is the noise of the comparison
        times = interleaved({"plain": plain, "checked": checked, "plain again": plain}, reps, warmup=2)
        calls = []
        for _ in range(200):
            t0 = time.perf_counter()
            alone()
            calls.append(time.perf_counter() - t0)
        c = C.median(calls)
        row = {"model": name, "rounds": reps, "check_alone_s": c, "seconds": times}
        for clock in ("wall", "cpu"):
            base = times[clock]["plain"]
            a = C.median(base)
            q1, _, q3 = statistics.quantiles(base, n=4)
            row[clock] = {"plain_s": a, "plain_iqr_share": (q3 - q1) / a}
            for other in ("checked", "plain again"):  # against plain: medians and round by round
                row[clock][f"{other} vs plain"] = {
                    "medians": C.median(times[clock][other]) / a - 1,
                    "paired": C.median([y / x - 1 for x, y in zip(base, times[clock][other])])}
        row["check_share_of_step"] = c / row["cpu"]["plain_s"]
        rows.append(row)
        fmt = lambda d: "/".join(f"{v * 100:+.1f}" for v in d.values())  # noqa: E731
        C.log(f"{name}: step {row['wall']['plain_s'] * 1e3:.2f} ms wall, {row['cpu']['plain_s'] * 1e3:.2f} ms CPU; "
              f"vs plain, % (medians/paired): " + "; ".join(
                  f"{clock}: checked {fmt(row[clock]['checked vs plain'])}, plain again "
                  f"{fmt(row[clock]['plain again vs plain'])} (IQR {row[clock]['plain_iqr_share'] * 100:.0f} %)"
                  for clock in ("wall", "cpu"))
              + f"; the check alone {c * 1e6:.0f} us = {c / row['cpu']['plain_s'] * 100:.2f} % of the step")
    C.save(args, {"machine": C.machine(), "rows": rows})


if __name__ == "__main__":
    main()
