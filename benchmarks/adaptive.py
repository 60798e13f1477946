#!/usr/bin/env python
"""Does adaptive compute pay? One change at a time to the v2 reproduction's DC-DiT N=4 on MNIST 32x32.

    python benchmarks/adaptive.py --out runs/adaptive --variants no_mb,eps --threads 1      # train + score
    python benchmarks/adaptive.py --out runs/adaptive --report docs/adaptive                # table from cache

Every variant is the reproduction's DC-DiT (``benchmarks/reproduce.py``, ``benchmarks/reproduction/``: 2x2 stem -> 16x16 grid,
c1 scaffold at width 16, 10 DiT blocks at 128 on ~64 kept tokens, v-prediction, Min-SNR-5,
multi-budget from mid-run, 4000 steps x 64, seed 0) with one change (``VARIANTS``), scored with
the reproduction's protocol: 2000 DDIM-25 samples -> FID against 2000 held-out MNIST test images
and class accuracy by the in-domain classifier. Each run adds what the router does:

* kept share against t over the sampling run (noisiest / cleanest step),
* what the tokens buy (``dcdit.analysis.what_tokens_buy``): per t, the training loss with half of
  the kept tokens tail-dropped minus the loss with all of them, and the router's gradient signal
  from the diffusion loss (mean -dL/dp: how much timestep t trains the router),
* segmentation ROC-AUC of the router's boundary probability against the digit-edge map
  (``dcdit.analysis.routing_vs_detail``; a grid token is positive when its cell holds an edge
  pixel) and against the digit's ink (positive when its cell holds a pixel > 0.5), per t,
  on 128 held-out test digits noised to t.

Stages cache their JSON in --out and training resumes, so an interrupted invocation continues.
The DiT/4 of the reproduction (same main network, the FLOP-matched baseline) is a variant too
(``dit4``), so every number in the table comes from this harness.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reproduction import (  # the reproduction's training and scoring protocol (benchmarks/reproduction/)
    Ctx, Settings, cached, load, log, mnist, read_json, score, smoke_settings, stage_classifier, stage_reference,
    train_dict, train_run, write_json,
)

# name -> (what changes, dotted config keys set on top of the reproduction's DC-DiT N=4)
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("the v2 reproduction's DC-DiT N=4 as it was", {}),
    "no_mb": ("no multi-budget training", {"multibudget.enabled": False}),
    "mb_late": ("multi-budget from 3/4 of the run, fractions up to 0.3",
                {"multibudget.start_step": 3000, "multibudget.fractions": [0.0, 0.1, 0.2, 0.3]}),
    "eps": ("epsilon prediction instead of v", {"diffusion.prediction": "epsilon"}),
    "eps_no_mb": ("epsilon prediction, no multi-budget",
                  {"diffusion.prediction": "epsilon", "multibudget.enabled": False}),
    "ratio_0.1": ("ratio-loss weight 0.1 (from 0.03)", {"ratio.weight": 0.1}),
    "grid": ("control: a fixed router keeping a regular grid at 1/N", {"model.overrides.router_mode": "grid"}),
    "random": ("control: a random router keeping 1/N", {"model.overrides.router_mode": "random"}),
    "floor16": ("the learned router over a fixed floor: a lattice of 1 token in 16 always kept (router_floor)",
                {"model.overrides.router_floor": 16}),
    "floor16_no_mb": ("floor16 without multi-budget training",
                      {"model.overrides.router_floor": 16, "multibudget.enabled": False}),
    "grid_no_mb": ("control for no_mb: the fixed grid router, no multi-budget training",
                   {"model.overrides.router_mode": "grid", "multibudget.enabled": False}),
    "random_no_mb": ("control for no_mb: the random router, no multi-budget training",
                     {"model.overrides.router_mode": "random", "multibudget.enabled": False}),
    "dit4": ("the FLOP-matched DiT/4 (same main network on a 4x4-patch grid)", {}),
    # the noisiest steps back in the loss: Min-SNR-5's x0 weight clamped to [1, 5] (v's plain weight at high noise)
    "no_mb_floor1": ("no multi-budget, Min-SNR-5 weight floored at 1 (diffusion.min_snr_floor)",
                     {"multibudget.enabled": False, "diffusion.min_snr_floor": 1.0}),
    "random_no_mb_floor1": ("control for no_mb_floor1: the random router",
                            {"model.overrides.router_mode": "random", "multibudget.enabled": False,
                             "diffusion.min_snr_floor": 1.0}),
    "dit4_floor1": ("DiT/4 with the Min-SNR-5 weight floored at 1", {"diffusion.min_snr_floor": 1.0}),
    # the other direction (BENCHMARKS.md, "The loss weight decides where over t the router spends tokens"):
    # more of the loss on the clean steps, where the router then keeps more tokens
    "no_mb_gamma20": ("no multi-budget, Min-SNR-20 (clean steps weigh up to 4x more than under Min-SNR-5)",
                      {"multibudget.enabled": False, "diffusion.min_snr_gamma": 20.0}),
    "random_no_mb_gamma20": ("control for no_mb_gamma20: the random router",
                             {"model.overrides.router_mode": "random", "multibudget.enabled": False,
                              "diffusion.min_snr_gamma": 20.0}),
    "dit4_gamma20": ("DiT/4 with Min-SNR-20", {"diffusion.min_snr_gamma": 20.0}),
    # DiT's own loss: epsilon prediction, plain MSE (no Min-SNR cap), so the cleanest steps weigh most
    "eps_plain_no_mb": ("epsilon prediction, plain MSE (no Min-SNR), no multi-budget",
                        {"diffusion.prediction": "epsilon", "diffusion.min_snr_gamma": None,
                         "multibudget.enabled": False}),
    "dit4_eps_plain": ("DiT/4, epsilon prediction, plain MSE",
                       {"diffusion.prediction": "epsilon", "diffusion.min_snr_gamma": None}),
}
# variant -> the variant whose run it shares up to the step multi-budget training starts (the two differ
# only from there): a new run directory starts from a copy of that run's checkpoint at the step
BRANCHES: dict[str, str] = {"grid_no_mb": "grid", "random_no_mb": "random", "floor16_no_mb": "floor16"}
SEG_TIMESTEPS = (25, 100, 250, 500, 750, 950)
LATE_STEPS = (3500, 3750, 4000)  # the checkpoints whose FIDs are averaged to compare runs (late_checkpoints_table)


def set_dotted(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def variant_config(s: Settings, name: str, seed: int, extra: dict | None = None) -> dict:
    d = train_dict(s, "dit4" if name.startswith("dit4") else "dcdit_n4", seed)
    d["name"] = name
    for key, value in {**VARIANTS[name][1], **(extra or {})}.items():
        set_dotted(d, key, value)
    return d


class InkMaps:
    """A dataset view whose ``get_with_detail`` is the digit's ink (pixel > 0.5 in [0, 1]) instead of its edges."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def get_with_detail(self, i):
        x, y = self.ds[i]
        return x, y, (x[0] > 0.0).float()  # images live in [-1, 1]: 0 is mid-gray


def router_vs_detail(model, data, seed: int, n: int = 128) -> tuple[list[dict], float]:
    """The router's p against ``data``'s detail maps on ``n`` images noised to each of SEG_TIMESTEPS (ROC-AUC,
    kept share per t), and the mean AUC over t <= 250."""
    from dcdit.analysis import routing_vs_detail
    from dcdit.diffusion import create_diffusion

    rows = routing_vs_detail(model, create_diffusion(""), data, SEG_TIMESTEPS, n, seed=seed)
    return rows, float(np.mean([r["auc"] for r in rows if r["t"] <= 250]))


def segmentation(model, seed: int, n: int = 128) -> dict:
    """Router p against the digit-edge map and against the ink, per t (ROC-AUC; kept share)."""
    test = mnist("test")
    edges, auc_edges = router_vs_detail(model, test, seed, n)
    ink, auc_ink = router_vs_detail(model, InkMaps(test), seed, n)
    return {"edges": edges, "ink": ink, "auc_edges_late": auc_edges, "auc_ink_late": auc_ink}


def branch(ctx: Ctx, name: str, seed: int, run_dir: Path) -> None:
    """Start ``run_dir`` from a copy of its BRANCHES parent's checkpoint at the multi-budget start step (the
    steps before it are the same steps), when the run has no checkpoint yet and the parent has that one."""
    from reproduction.runs import run_step

    step = variant_config(ctx.s, name, seed)["multibudget"]["start_step"]
    parent = ctx.out / "runs" / f"{BRANCHES[name]}_s{seed}"
    ck = parent / f"ckpt-{step:07d}"
    if run_step(run_dir) or not ck.is_dir():
        return
    log(f"{name}: starting from {ck} (the same {step} steps as {BRANCHES[name]})")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ck, run_dir / ck.name)
    rows = [l for l in (parent / "metrics.jsonl").read_text().splitlines()
            if l.strip() and json.loads(l).get("step", 0) <= step]
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (run_dir / "latest").write_text(ck.name)


def stage_variant(ctx: Ctx, name: str, seed: int, upto: int | None = None) -> dict:
    """Train variant ``name`` (to step ``upto`` of its run, default all of it) and score that checkpoint.

    ``upto`` stops the run early without changing its recipe (the learning rate is constant after
    warm-up, multi-budget starts at its own step): results are tagged ``name@upto``, and a later call
    with a larger ``upto`` continues the same run directory.
    """
    s = ctx.s
    steps = upto or s.steps
    tag = name if steps == s.steps else f"{name}@{steps}"
    run_dir = ctx.out / "runs" / f"{name}_s{seed}"
    d = variant_config(s, name, seed)
    d["train"]["steps"] = steps
    if name in BRANCHES:
        branch(ctx, name, seed, run_dir)
    routed = d["model"]["arch"] == "dcdit"
    # the router's gradient signal needs a learned router (the grid and random controls have no p to train)
    learned = routed and d["model"].get("overrides", {}).get("router_mode", "learned") == "learned"
    tr = cached(ctx.out / f"train_{tag}_s{seed}.json", lambda: train_run(d, run_dir, steps))
    name = tag

    def evaluate():
        model = load(run_dir, f"ckpt-{steps:07d}")
        res = score(ctx, model, s.n_fid, seed, 0.0, f"{name}_s{seed}", grid=True)
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if routed:
            res["segmentation"] = segmentation(model, seed)
        return res

    ev = cached(ctx.out / f"eval_{name}_s{seed}.json", evaluate)

    def signal():  # what the tokens are worth to the training loss at each t, and the router's gradient
        from dcdit.analysis import what_tokens_buy
        from dcdit.diffusion import create_diffusion
        from dcdit.sampling import model_info

        model = load(run_dir, f"ckpt-{steps:07d}")
        info = model_info(model)
        diffusion = create_diffusion("", min_snr_gamma=d["diffusion"].get("min_snr_gamma"),
                                     min_snr_floor=d["diffusion"].get("min_snr_floor"),
                                     prediction=info["prediction"], learn_sigma=info["learn_sigma"])
        return {"per_t": what_tokens_buy(model, diffusion, mnist("test"), SEG_TIMESTEPS, num_images=128, seed=seed)}

    sig = cached(ctx.out / f"signal_{name}_s{seed}.json", signal) if learned else None
    return {"name": name, "seed": seed, "change": VARIANTS[name.split("@")[0]][0], "config": d, "train": tr, "eval": ev,
            "signal": sig}


def signal_of_checkpoints(ckpts: list[str], n: int = 128) -> dict:
    """``what_tokens_buy`` on any checkpoints (e.g. the shipped ``pretrained:`` models), MNIST test digits
    at the checkpoint's size, each with its own prediction type and the recipe's Min-SNR-5 weight."""
    from dcdit.analysis import what_tokens_buy
    from dcdit.checkpoint import load_model
    from dcdit.data import DataConfig, build_dataset
    from dcdit.diffusion import create_diffusion
    from dcdit.sampling import model_info

    out = {}
    for ckpt in ckpts:
        model = load_model(ckpt).eval()
        info = model_info(model)
        diffusion = create_diffusion("", min_snr_gamma=5.0, prediction=info["prediction"],
                                     learn_sigma=info["learn_sigma"])
        test = build_dataset(DataConfig(source="mnist", split="test", image_size=info["input_hw"][0]))
        out[ckpt] = {"prediction": info["prediction"],
                     "per_t": what_tokens_buy(model, diffusion, test, SEG_TIMESTEPS, num_images=n)}
    return out


def signal_table(signals: dict) -> str:
    lines = ["| model | prediction | t | weighted MSE, all kept tokens | + with half of them dropped "
             "| router signal (mean -dL/dp) | kept share |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, sig in signals.items():
        for r in sig["per_t"]:
            lines.append(f"| {name} | {sig['prediction']} | {r['t']} | {r['mse']['0']:.2e} | "
                         f"{r['token_value'] / max(r['mse']['0'], 1e-12):+.1%} | {r['pull']:+.1e} | "
                         f"{r['kept_share']['0']:.3f} |")
    return "\n".join(lines) + "\n"


def late_checkpoints_table(rows: list, last: tuple[int, ...] = LATE_STEPS) -> str:
    """FID@2000 of each run at its last checkpoints (``--upto 3500`` / ``3750`` score them) and their mean.

    One checkpoint's FID@2000 moves by up to ~10 % between checkpoints 250 steps apart at this scale (the
    lattice control: 90.5, 96.4, 87.3 at steps 3500, 3750, 4000), so runs are compared by the mean of the three.
    """
    by_run: dict[tuple[str, int], dict[int, dict]] = {}
    for name, seed, ev, _tr, _seg in rows:
        base, _, at = name.partition("@")
        by_run.setdefault((base, seed), {})[int(at) if at else Settings().steps] = ev
    lines = []
    for (base, seed), evs in sorted(by_run.items()):
        if not all(st in evs for st in last):
            continue
        fids = [evs[st]["fid"] for st in last]
        accs = [evs[st]["class_acc"] for st in last]
        lines.append(f"| {base} | {seed} | " + " | ".join(f"{f:.1f}" for f in fids)
                     + f" | **{np.mean(fids):.1f}** | {np.mean(accs):.3f} |")
    if not lines:
        return ""
    head = ("\n| run | seed | " + " | ".join(f"FID@2000, step {st}" for st in last)
            + " | mean FID | mean class acc |\n|---|---:|" + "---:|" * (len(last) + 2) + "\n")
    return head + "\n".join(lines) + "\n"


def report(out: Path, plot_dir: Path | None) -> str:
    rows = []
    for p in sorted(out.glob("eval_*_s*.json")):
        name, seed = p.stem.removeprefix("eval_").rsplit("_s", 1)
        ev, tr = read_json(p), read_json(out / f"train_{name}_s{seed}.json") or {}
        seg = dict(ev.get("segmentation") or {})
        sig = read_json(out / f"signal_{name}_s{seed}.json")
        if sig:  # the router's gradient at the noisiest scored t relative to the cleanest
            per_t = sorted(sig["per_t"], key=lambda r: r["t"])
            seg["signal_ratio"] = abs(per_t[-1]["pull"]) / max(abs(per_t[0]["pull"]), 1e-30)
        rows.append((name, int(seed), ev, tr, seg))
    lines = ["| variant | seed | change | FID@2000 | FID@500 | class acc | GFLOPs/img | kept share noisiest / cleanest (ratio) "
             "| AUC edges t<=250 | AUC ink t<=250 | AUC ink t=950 | router signal t=950 / t=25 | train min |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, seed, ev, tr, seg in rows:
        kn, kc = ev.get("kept_share_noisiest"), ev.get("kept_share_cleanest")
        kept = f"{kn:.3f} / {kc:.3f} ({kn / kc:.2f})" if kn is not None else ""
        ink950 = next((r["auc"] for r in seg.get("ink", []) if r["t"] == 950), None)
        fmt = lambda v: "" if v is None else f"{v:.3f}"
        fmt1 = lambda v: "" if v is None else f"{v:.1f}"
        sci = lambda v: "" if v is None else f"{v:.1e}"
        mins = tr.get("train_seconds_at_median_rate")
        lines.append(f"| {name} | {seed} | {VARIANTS.get(name.split('@')[0], ('?',))[0]} | {ev['fid']:.1f} | {fmt1(ev.get('fid_at', {}).get('500'))} | {ev['class_acc']:.3f} "
                     f"| {ev['gflops_per_image']:.2f} | {kept} | {fmt(seg.get('auc_edges_late'))} "
                     f"| {fmt(seg.get('auc_ink_late'))} | {fmt(ink950)} | {sci(seg.get('signal_ratio'))} "
                     f"| {'' if mins is None else f'{mins / 60:.1f}'} |")
    table = "\n".join(lines) + "\n" + late_checkpoints_table(rows)
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        (plot_dir / "table.md").write_text(table)
        results = {f"{n}_s{sd}": {"eval": ev, "train": tr} for n, sd, ev, tr, _ in rows}
        write_json(plot_dir / "results.json", results)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/adaptive")
    ap.add_argument("--variants", default="no_mb,eps", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the reproduction's 4000)")
    ap.add_argument("--upto", type=int, default=None,
                    help="stop each run at this step and score that checkpoint (tagged NAME@STEP); rerun to go on")
    ap.add_argument("--smoke", action="store_true", help="tiny everything (plumbing check)")
    ap.add_argument("--report", default=None, metavar="DIR", help="write table.md and results.json here and stop")
    ap.add_argument("--signal", default=None, metavar="CKPT[,CKPT]",
                    help="only: what the tokens buy, per t, for these checkpoints (e.g. pretrained:mnist-dcdit-n4); "
                         "JSON into --out/signal_checkpoints.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.signal:
        if args.threads:
            torch.set_num_threads(args.threads)
        sig = signal_of_checkpoints(args.signal.split(","))
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "signal_checkpoints.json", sig)
        print(signal_table(sig))
        return 0
    if args.report:
        print(report(out, Path(args.report)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    s = smoke_settings() if args.smoke else Settings()
    if args.steps:
        s.steps = args.steps
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, s, args.smoke)
    stage_classifier(ctx, 0)
    stage_reference(ctx)
    t0 = time.time()
    for seed in [int(x) for x in args.seeds.split(",")]:
        for name in [v for v in args.variants.split(",") if v]:
            if name not in VARIANTS:
                raise SystemExit(f"error: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
            r = stage_variant(ctx, name, seed, args.upto)
            log(f"{name} s{seed}: FID {r['eval']['fid']:.1f}, class acc {r['eval']['class_acc']:.3f}")
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    print(report(out, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
