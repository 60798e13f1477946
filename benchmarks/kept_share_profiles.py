"""Kept share against t for several models, from ``dcdit flops --per-step --json`` files or the benchmarks'
scored-model files (``eval_*.json`` of canvas.py / adaptive.py / reproduce.py): one plot, one table.

    dcdit flops --ckpt RUN_A --steps 25 --batch-size 100 --per-step --json a.json     # per model
    python benchmarks/kept_share_profiles.py a.json:"label A" b.json:"label B" --out docs/x/kept_share
    python benchmarks/kept_share_profiles.py runs/canvas/eval_dcdit@4000_s0.json:"v, Min-SNR-5" ... --out F

Writes OUT.png (mean kept share per sampling step, noisy -> clean) and OUT.md (the table, with the
noisiest / cleanest ratio the adaptive-compute issue asks about and the peak over t).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(spec: str) -> tuple[str, list[int], list[float], list[tuple[int, float]]]:
    """(label, timesteps, kept share per step, [(t, router ROC-AUC vs the detail map)] if the file has them)."""
    path, _, label = spec.partition(":")
    d = json.loads(Path(path).read_text())
    label = label or Path(path).stem
    if "runs" in d:  # dcdit flops --per-step --json
        run = d["runs"][0]  # tail drop 0
        return label, run["timesteps"], run["kept_share_by_t"], []
    if d.get("kept_share_by_t") is None:
        raise SystemExit(f"error: {path} has no kept share per step (not a routed model's scores?)")
    ks = d["kept_share_by_t"]
    if d.get("timesteps"):  # a scored model's own DDIM steps (reproduction.score records them)
        t = d["timesteps"]
    else:  # scores written before it did: the DDIM steps evenly spaced from t_noisiest to t_cleanest
        n, t0, t1 = len(ks), d["t_noisiest"], d["t_cleanest"]
        t = [round(t0 + (t1 - t0) * i / (n - 1)) for i in range(n)] if n > 1 else [t0]
    seg = [(r["t"], r["auc"]) for r in (d.get("segmentation") or {}).get("ink", [])]
    return label, t, ks, seg


def table(rows: list[tuple[str, list[int], list[float]]]) -> str:
    t = rows[0][1]
    pick = [i for i, ti in enumerate(t) if ti in (t[0], 480, 240, 120, 80, 40, t[-1])]
    head = "| model | " + " | ".join(f"t={t[i]}" for i in pick) + " | noisiest / cleanest | noisiest / peak |"
    lines = [head, "|---|" + "---:|" * (len(pick) + 2)]
    for label, _, ks, _ in rows:
        lines.append(f"| {label} | " + " | ".join(f"{ks[i]:.3f}" for i in pick)
                     + f" | {ks[0] / ks[-1]:.2f} | {ks[0] / max(ks):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="JSON[:LABEL]")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--title", default="kept share against t (DDIM sampling run)")
    args = ap.parse_args(argv)
    rows = [read(s) for s in args.runs]
    if len({tuple(r[1]) for r in rows}) != 1:
        raise SystemExit("error: the runs sampled different timesteps; count them with the same --steps")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with_auc = any(r[3] for r in rows)
    fig, axes = plt.subplots(1, 2 if with_auc else 1, figsize=(11 if with_auc else 6, 3.6), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for label, t, ks, _ in rows:
        ax.plot(t, ks, marker="o", ms=3, label=label)
    ax.set_xlim(max(rows[0][1]), min(rows[0][1]))
    ax.set_xlabel("timestep t (denoising runs left to right)")
    ax.set_ylabel("share of tokens kept")
    ax.set_ylim(0, max(max(r[2]) for r in rows) * 1.15)
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if with_auc:  # the router's p against the detail map on noised test images, per t
        ax = axes[0, 1]
        for label, _, _, seg in rows:
            if seg:
                ax.plot(*zip(*seg), marker="o", ms=3, label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlim(max(t for r in rows for t, _ in r[3]), 0)
        ax.set_ylim(min(0.3, min(a for r in rows for _, a in r[3]) - 0.05), 1.0)
        ax.set_xlabel("timestep t of the noised test images")
        ax.set_ylabel("router ROC-AUC vs the detail map")
        ax.set_title("does the router mark the object? (0.5: chance)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    text = table(rows)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
