"""The reproduction's report: every cached stage -> results.json, table.md (with each claim: held or not), PNGs."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dcdit.viz.plots import plot_cost_over_time, plot_quality_vs_compute

from .runs import read_json, train_minutes, write_json
from .scoring import Ctx
from .settings import CANVAS_MODELS, LABEL, MODELS, SHAPES_VARIANTS, Settings


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{nd}f}"


def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def ms(vals, nd=2):
    m, sd = mean_sd(vals)
    return fmt(m, nd) + (f" ± {sd:.{nd}f}" if sd is not None else "")


def small(e: dict, n: int):
    """FID of the first n samples of an evaluation (None if not recorded)."""
    return (e.get("fid_at") or {}).get(str(n), e.get("fid_small"))


def scaffold_share(e: dict) -> float | None:
    """Share of a DC-DiT's sampling FLOPs outside its main network (stem, encoder, router, dechunk, decoder)."""
    comp = e.get("gflops_by_component") or {}
    total = sum(comp.values())
    return 1.0 - comp["main network"] / total if "main network" in comp and total else None


def claim_rows(n_seeds: int) -> tuple[list[dict], callable]:
    """An empty claims list and its ``add(claim, goal, fn(seed index) -> value, test)``: each claim is
    measured per seed (None where its inputs are missing) and held when it holds on every seed measured."""
    rows = []

    def add(name, goal, fn, test):
        vals = []
        for i in range(n_seeds):
            try:
                vals.append(fn(i))
            except (KeyError, TypeError, IndexError, ZeroDivisionError, StopIteration):
                vals.append(None)
        got = [v for v in vals if v is not None]
        m = float(np.mean(got, axis=0)) if got and not isinstance(got[0], (list, tuple)) else None
        rows.append({"claim": name, "goal": goal, "per_seed": vals, "mean": m,
                     "held": (all(test(v) for v in got) if got else None)})

    return rows, add


def canvas_claims(results: list[dict | None]) -> list[dict]:
    """Issue 25's sparse-canvas goals, per seed, from canvas.py's ``results_STEP_sSEED.json`` (one per seed:
    ``eval`` per model name, ``speed``, and ``dcdit_model``: which DC-DiT the goals judge, "dcdit" when absent;
    its controls are NAME_grid and NAME_random). Time ratios are of time per image (1 / img/s), within one
    process."""
    rows, add = claim_rows(len(results))
    suffix = {"dcdit": "", "dcdit_grid": "_grid", "dcdit_random": "_random"}  # the DC-DiT and its two controls

    def name(n: str, i: int) -> str:  # "dcdit" and its controls stand for the seed's chosen DC-DiT and its controls
        return (results[i].get("dcdit_model") or "dcdit") + suffix[n] if n in suffix else n

    ev = lambda n, i: results[i]["eval"][name(n, i)]
    secs = lambda n, i: 1.0 / results[i]["speed"]["images_per_sec"][name(n, i)]
    fid = lambda a, b: (lambda i: ev(a, i)["fid"] / ev(b, i)["fid"])
    add("canvas: DC-DiT FID / FLOP-matched DiT/8's", "<= 0.8", fid("dcdit", "dit8"), lambda v: v <= 0.8)
    add("canvas: DC-DiT sampling time / DiT/8's", "<= 1.2", lambda i: secs("dcdit", i) / secs("dit8", i),
        lambda v: v <= 1.2)
    add("canvas: DC-DiT FID / parameter-matched DiT/4's", "<= 1.2", fid("dcdit", "dit4"), lambda v: v <= 1.2)
    add("canvas: DC-DiT sampling time / DiT/4's", "<= 0.4", lambda i: secs("dcdit", i) / secs("dit4", i),
        lambda v: v <= 0.4)
    add("canvas: learned router FID / fixed lattice router's (same share)", "<= 0.85", fid("dcdit", "dcdit_grid"),
        lambda v: v <= 0.85)
    add("canvas: learned router FID / random router's (same share)", "<= 0.85", fid("dcdit", "dcdit_random"),
        lambda v: v <= 0.85)
    add("canvas: router ROC-AUC vs the digit's ink, t <= 250", ">= 0.85",
        lambda i: ev("dcdit", i)["segmentation"]["auc_ink_late"], lambda v: v >= 0.85)
    add("canvas: kept share at the noisiest step / at the cleanest", "<= 0.6",
        lambda i: ev("dcdit", i)["kept_share_noisiest"] / ev("dcdit", i)["kept_share_cleanest"], lambda v: v <= 0.6)
    return rows


def claims(R: dict, s: Settings, seeds: list[int]) -> list[dict]:
    """Issue 14's goals (and issue 25's canvas goals when R has canvas results), each measured per seed:
    {claim, per_seed values, mean, held}."""
    ev = lambda n, i: R["eval"][n][i]
    ips = lambda n, i: R["speed"][i]["images_per_sec"][n]
    rows, add = claim_rows(len(seeds))

    add("DC-DiT N=4 FID / DiT/2 FID", "<= 0.8", lambda i: ev("dcdit_n4", i)["fid"] / ev("dit2", i)["fid"],
        lambda v: v <= 0.8)
    add("DC-DiT N=4 sampling GFLOPs / DiT/2's", "<= 0.6",
        lambda i: ev("dcdit_n4", i)["gflops_per_image"] / ev("dit2", i)["gflops_per_image"], lambda v: v <= 0.6)
    add("DC-DiT N=4 sampling time / DiT/2's", "<= 0.6", lambda i: ips("dit2", i) / ips("dcdit_n4", i),
        lambda v: v <= 0.6)
    add(f"FID@{s.n_small} at tail drop 0.2 / at 0", "<= 1.1",
        lambda i: R["elastic"]["0.2"][i]["fid"] / small(ev("dcdit_n4", i), s.n_small), lambda v: v <= 1.1)
    add("kept share at the noisiest step / at the cleanest", "<= 0.6",
        lambda i: ev("dcdit_n4", i)["kept_share_noisiest"] / ev("dcdit_n4", i)["kept_share_cleanest"],
        lambda v: v <= 0.6)
    add("segmentation ROC-AUC, shapes, t <= 250", ">= 0.85", lambda i: R["shapes"][i]["auc_late_mean"],
        lambda v: v >= 0.85)

    def upcycle_steps_to_scratch(i):
        pts = R["upcycle"][i]["points"]
        final = next(p["fid"] for p in pts if p["init"] == "scratch" and p["steps"] == s.steps)
        reach = [p["steps"] for p in sorted(pts, key=lambda p: p["steps"]) if p["init"] == "upcycled" and p["fid"] <= final]
        return reach[0] / s.steps if reach else float("inf")

    add(f"upcycled: steps to scratch's final FID@{s.n_small} / scratch's steps", "<= 0.25",
        upcycle_steps_to_scratch, lambda v: v <= 0.25)
    if any(R.get("canvas") or []):
        rows += canvas_claims(R["canvas"])
    return rows


def section_models(R: dict, s: Settings) -> list[str]:
    tokens = {"dit2": "256", "dit4": "64", "dcdit_n4": "~64 of 256 (N = 4)"}
    t0 = R["train"]["dit4"][0]
    L = [f"MNIST 32x32, {s.steps} steps x batch {s.batch} (bf16) per model, seed(s) {R['seeds']}; main network "
         f"{s.depth} DiT blocks at width {s.hidden}; DDIM {s.ddim_steps} steps, no guidance; FID: {s.extractor} "
         f"features, {s.n_fid} samples vs {s.n_ref} MNIST test images (FID@{s.n_small}: the first {s.n_small} of "
         f"the same samples); GFLOPs = 2 x MACs per image over the whole sampling run; training minutes: "
         f"each run's steps at the median of its logged rates ({t0['threads'] if t0 else '?'} threads; the "
         "plain sum of its logged intervals, pauses included, is train_seconds in results.json).\n",
         f"| model | main-net tokens | params (M) | train min | FID@{s.n_fid} | FID@{s.n_small} | class acc | "
         "GFLOPs/img | scaffold share | img/s | kept share noisiest → cleanest |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in MODELS:
        ev = [e for e in R["eval"][n] if e]
        if not ev:
            L.append(f"| {LABEL[n]} | {tokens[n]} | not run | | | | | | | | |")
            continue
        sp = [x["images_per_sec"][n] for x in R["speed"] if x]
        tm = [m for m in map(train_minutes, R["train"][n]) if m]
        kept = (f"{ms([e.get('kept_share_noisiest') for e in ev], 3)} → {ms([e.get('kept_share_cleanest') for e in ev], 3)}"
                f" (t={ev[0]['t_noisiest']} → {ev[0]['t_cleanest']})" if ev[0].get("kept_share_noisiest") is not None
                else "1 (fixed)")
        sc = [scaffold_share(e) for e in ev] if n.startswith("dcdit") else [None]
        L.append(f"| {LABEL[n]} | {tokens[n]} | {ev[0]['params_m']:.2f} | {ms(tm, 1) if tm else '-'} | "
                 f"{ms([e['fid'] for e in ev], 1)} | {ms([small(e, s.n_small) for e in ev], 1)} | "
                 f"{ms([e['class_acc'] for e in ev], 3)} | {ms([e['gflops_per_image'] for e in ev], 2)} | "
                 f"{ms(sc, 3) if sc[0] is not None else '-'} | {ms(sp, 1) if sp else '-'} | {kept} |")
    L.append("")
    if R["classifier"]:
        L.append(f"Classifier (SmallCNN, {R['classifier']['steps']} steps x 128 on MNIST train): "
                 f"test accuracy {R['classifier']['test_accuracy']:.4f}.\n")
    return L


def section_elastic(R: dict, s: Settings) -> tuple[list[str], list[dict]]:
    """The tail-drop table, and the FID-vs-GFLOPs records of it and of the other models."""
    ev4 = [e for e in R["eval"]["dcdit_n4"] if e]
    L = [f"Elastic inference, one DC-DiT N=4 checkpoint (multi-budget from step {int(s.steps * s.multibudget_start)}), "
         f"the same {s.n_small} labels and noise per point:\n",
         f"| tail-drop f | FID@{s.n_small} | class acc | GFLOPs/img | kept share (mean over steps) |",
         "|---|---:|---:|---:|---:|"]
    records = []
    rows = ([(0.0, [dict(e, fid=small(e, s.n_small)) for e in ev4])] if ev4 else []) + \
        [(f, [e for e in R["elastic"][f"{f:g}"] if e]) for f in s.elastic]
    for f, el in rows:
        if not el:
            L.append(f"| {f:g} | not run | | | |")
            continue
        L.append(f"| {f:g} | {ms([e['fid'] for e in el], 1)} | {ms([e['class_acc'] for e in el], 3)} | "
                 f"{ms([e['gflops_per_image'] for e in el])} | {ms([e.get('kept_share_mean') for e in el], 3)} |")
        records.append({"model": "DC-DiT N=4, tail drop f", "gflops": np.mean([e["gflops_per_image"] for e in el]),
                        "fid": np.mean([e["fid"] for e in el]), "tail_drop": f})
    for n in MODELS:
        ev = [e for e in R["eval"][n] if e]
        if ev and n != "dcdit_n4":
            records.append({"model": LABEL[n], "gflops": np.mean([e["gflops_per_image"] for e in ev]),
                            "fid": np.mean([small(e, s.n_small) for e in ev]), "tail_drop": None})
    return L + [""], records


def same_point(up: list[dict], p: dict) -> list[dict]:
    """The upcycling point ``p`` (same init, same steps) of every seed run."""
    return [q for u in up for q in u["points"] if (q["init"], q["steps"]) == (p["init"], p["steps"])]


def section_upcycle(R: dict, s: Settings) -> list[str]:
    up = [x for x in R["upcycle"] if x]
    if not up:
        return []
    L = [f"Upcycling: DC-DiT N=4 from the trained DiT/4 (its {s.depth} blocks and t/y embedders copied; both "
         f"main networks see ~64 tokens) vs from scratch, same config and data order; FID@{s.n_small} "
         "against training steps:\n",
         f"| init | steps | FID@{s.n_small} | class acc |", "|---|---:|---:|---:|"]
    for p in sorted(up[0]["points"], key=lambda p: (p["init"], p["steps"])):
        same = same_point(up, p)
        L.append(f"| {p['init']} | {p['steps']} | {ms([q['fid'] for q in same], 1)} | "
                 f"{ms([q['class_acc'] for q in same], 3)} |")
    return L + [""]


def section_curve(R: dict, s: Settings) -> list[str]:
    cv = [c for c in R["curve"] if c]
    if not cv:
        return []
    steps = [p["steps"] for p in next(iter(cv[0].values()))["points"]]
    L = [f"Quality against training compute (FID@{s.n_small} of each model's EMA at 1/4, 1/2 and all of "
         "its run; training FLOPs = 3 x the forward FLOPs per image at the model's own routing x images):\n",
         "| model | train GFLOPs/img | " + " | ".join(f"step {k}" for k in steps) + " |",
         "|---|---:|" + "---:|" * len(steps)]
    for n in cv[0]:
        pts = cv[0][n]["points"]
        cells = [f"{ms([c[n]['points'][i]['fid'] for c in cv if n in c], 1)} ({pts[i]['train_gflops'] / 1e3:.0f} TF)"
                 for i in range(len(pts))]
        L.append(f"| {LABEL[n]} | {cv[0][n]['train_gflops_per_image']:.2f} | " + " | ".join(cells) + " |")
    return L + [""]


def section_shapes(R: dict, s: Settings) -> list[str]:
    sh = [x for x in R["shapes"] if x]
    if not sh:
        return []
    per_t = sh[0]["per_t"]
    L = [f"Emergent segmentation (shapes, the shapes_dcdit_cpu.yaml DC-DiT, {s.shapes_steps} steps x batch "
         f"{s.batch}; {s.shapes_images} held-out images): ROC-AUC of the router's boundary probability vs "
         "the ground-truth detail map (0.5 = chance), and the kept share, per noising timestep t:\n",
         "| t | " + " | ".join(str(r["t"]) for r in per_t) + " |", "|---|" + "---:|" * len(per_t)]
    for key, label in (("auc", "ROC-AUC"), ("kept_share", "kept share"), ("detail_share", "detail share")):
        L.append(f"| {label} | " + " | ".join(ms([x["per_t"][i][key] for x in sh], 3) for i in range(len(per_t))) + " |")
    ab = {v: [x for x in R["shapes_ablation"][v] if x] for v in SHAPES_VARIANTS}
    if any(ab.values()):
        L += ["", "The same shapes DC-DiT with one change (ROC-AUC per t; `--only shapes-ablation`):\n",
              "| change | " + " | ".join(str(r["t"]) for r in per_t) + " |", "|---|" + "---:|" * len(per_t)]
        for v, runs in ab.items():
            if runs:
                L.append(f"| {SHAPES_VARIANTS[v][0]} | " +
                         " | ".join(ms([x["per_t"][i]["auc"] for x in runs], 3) for i in range(len(per_t))) + " |")
    return L + [""]


def section_canvas(R: dict) -> list[str]:
    """The sparse canvas (benchmarks/canvas.py), per model over the seeds that have it."""
    cv = R.get("canvas") or []
    if not any(cv):
        return []
    src = R["meta"].get("canvas", "")
    L = [f"Sparse canvas (MNIST digits at random positions on 64x64; `benchmarks/canvas.py`, results from {src}): "
         "FID@2000 vs 2000 canvas test images, in-domain classifier accuracy, sampling img/s of all models in one "
         "process (1 thread):\n",
         "| model | FID@2000 | class acc | GFLOPs/img | img/s | router ROC-AUC vs ink, t <= 250 |",
         "|---|---:|---:|---:|---:|---:|"]
    for n, label in CANVAS_MODELS.items():
        evs = [c["eval"].get(n) if c else None for c in cv]
        if not any(evs):
            continue
        got = [e for e in evs if e]
        ips = [c["speed"].get("images_per_sec", {}).get(n) for c in cv if c and c.get("speed")]
        auc = [(e.get("segmentation") or {}).get("auc_ink_late") for e in got]
        L.append(f"| {label} | {ms([e['fid'] for e in got], 1)} | {ms([e['class_acc'] for e in got], 3)} "
                 f"| {ms([e['gflops_per_image'] for e in got])} | {ms(ips, 1)} | {ms(auc, 3) if any(auc) else '-'} |")
    return L + [""]


def section_claims(R: dict) -> list[str]:
    L = ["The paper's claims at this scale (each measured per seed; held = held for every seed measured):\n",
         "| claim | goal | per seed | mean ± sd | held |", "|---|---|---|---|---|"]
    for c in R["claims"]:
        vals = ", ".join("-" if v is None else f"{v:.3g}" for v in c["per_seed"])
        got = [v for v in c["per_seed"] if v is not None]
        spread = "inf" if any(math.isinf(v) for v in got) else ms(got, 3)
        L.append(f"| {c['claim']} | {c['goal']} | {vals} | {spread} | "
                 f"{'not measured' if c['held'] is None else ('yes' if c['held'] else 'no')} |")
    return L


def report_plots(R: dict, s: Settings, out: Path, records: list[dict]) -> dict:
    plots = {}
    if records:
        plots["fid_vs_gflops"] = str(plot_quality_vs_compute(
            records, out / "fid_vs_gflops.png", ylabel=f"FID@{s.n_small} ({s.extractor})",
            title=f"MNIST: FID@{s.n_small} vs sampling GFLOPs/image (DDIM {s.ddim_steps}); f = tail drop").path)
    up = [x for x in R["upcycle"] if x]
    if up:
        recs = [{"init": p["init"], "steps": p["steps"], "fid": float(np.mean([q["fid"] for q in same_point(up, p)]))}
                for p in up[0]["points"]]
        plots["upcycling"] = str(plot_quality_vs_compute(
            recs, out / "upcycling.png", x="steps", group="init", annotate=None, xlabel="training steps",
            ylabel=f"FID@{s.n_small}", title="DC-DiT N=4 on MNIST: upcycled from DiT/4 vs from scratch").path)
    cv = [c for c in R["curve"] if c]
    if cv:
        recs = [{"model": LABEL[n], "train_gflops": p["train_gflops"] / 1e3, "fid": float(np.mean(
                    [q["fid"] for c in cv if n in c for q in c[n]["points"] if q["steps"] == p["steps"]]))}
                for n in cv[0] for p in cv[0][n]["points"]]
        plots["fid_vs_train_flops"] = str(plot_quality_vs_compute(
            recs, out / "fid_vs_train_flops.png", x="train_gflops", annotate=None,
            xlabel="training TFLOPs (3 x forward, per image seen, x images)", ylabel=f"FID@{s.n_small}",
            title=f"MNIST: FID@{s.n_small} against training compute ({s.batch} images per step)").path)
    p = out / f"cost_dcdit_n4_s{R['seeds'][0]}.npz"
    if p.is_file():
        z = np.load(p)
        plots["cost_dcdit_n4"] = str(plot_cost_over_time(
            z["timesteps"], out / "cost_over_time_dcdit_n4.png", kept_share=z["kept_share"],
            flops=z["flops"] if z["flops"].size else None, title="DC-DiT N=4 on MNIST: cost per sampling step").path)
    return plots


def render(R: dict, s: Settings) -> tuple[str, list[dict]]:
    """The table (markdown) of results ``R`` (with its claims), and the FID-vs-GFLOPs records of its plot."""
    elastic, records = section_elastic(R, s)
    L = (section_models(R, s) + elastic + section_upcycle(R, s) + section_curve(R, s) + section_shapes(R, s)
         + section_canvas(R) + section_claims(R))
    return "\n".join(L), records


def stage_report(ctx: Ctx, seeds: list[int], meta: dict) -> dict:
    """Everything cached in ``ctx.out`` for ``seeds`` -> results.json, table.md and the plots."""
    s, out = ctx.s, ctx.out
    R = {"settings": asdict(s), "seeds": seeds, "meta": meta}
    R["classifier"] = read_json(out / "classifier.json")
    R["reference"] = read_json(out / "reference.json")
    R["train"] = {n: [read_json(out / f"train_{n}_s{sd}.json") for sd in seeds] for n in MODELS}
    R["eval"] = {n: [read_json(out / f"eval_{n}_s{sd}.json") for sd in seeds] for n in MODELS}
    R["speed"] = [read_json(out / f"speed_s{sd}.json") for sd in seeds]
    R["elastic"] = {f"{f:g}": [read_json(out / f"elastic_f{f:g}_s{sd}.json") for sd in seeds]
                    for f in s.elastic}
    R["shapes"] = [read_json(out / f"shapes_s{sd}.json") for sd in seeds]
    R["shapes_ablation"] = {v: [read_json(out / f"shapes_{v}_s{sd}.json") for sd in seeds] for v in SHAPES_VARIANTS}
    R["upcycle"] = [read_json(out / f"upcycle_result_s{sd}.json") for sd in seeds]
    R["curve"] = [read_json(out / f"curve_s{sd}.json") for sd in seeds]
    canvas = meta.get("canvas")  # canvas.py --report DIR's results_STEP_sSEED.json per seed: "DIR/results_STEP"
    R["canvas"] = [read_json(Path(f"{canvas}_s{sd}.json")) for sd in seeds] if canvas else []
    R["claims"] = claims(R, s, seeds)
    R["total_stage_seconds"] = round(sum(float((read_json(p) or {}).get("seconds", 0.0) or 0.0)
                                         for p in out.glob("*.json") if p.name != "results.json"), 1)
    R["table_md"], records = render(R, s)
    (out / "table.md").write_text(R["table_md"] + "\n")
    R["plots"] = report_plots(R, s, out, records)
    write_json(out / "results.json", R)
    return R
