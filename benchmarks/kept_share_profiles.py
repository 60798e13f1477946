"""Kept share against t for several models, from ``dcdit flops --per-step --json`` files: one plot, one table.

    dcdit flops --ckpt RUN_A --steps 25 --batch-size 100 --per-step --json a.json     # per model
    python benchmarks/kept_share_profiles.py a.json:"label A" b.json:"label B" --out docs/x/kept_share

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


def read(spec: str) -> tuple[str, list[int], list[float]]:
    path, _, label = spec.partition(":")
    run = json.loads(Path(path).read_text())["runs"][0]  # tail drop 0
    return label or Path(path).stem, run["timesteps"], run["kept_share_by_t"]


def table(rows: list[tuple[str, list[int], list[float]]]) -> str:
    t = rows[0][1]
    pick = [i for i, ti in enumerate(t) if ti in (t[0], 480, 240, 120, 80, 40, t[-1])]
    head = "| model | " + " | ".join(f"t={t[i]}" for i in pick) + " | noisiest / cleanest | noisiest / peak |"
    lines = [head, "|---|" + "---:|" * (len(pick) + 2)]
    for label, _, ks in rows:
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
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, t, ks in rows:
        ax.plot(t, ks, marker="o", ms=3, label=label)
    ax.set_xlim(max(rows[0][1]), min(rows[0][1]))
    ax.set_xlabel("timestep t (denoising runs left to right)")
    ax.set_ylabel("share of tokens kept")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    text = table(rows)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
