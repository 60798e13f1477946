#!/usr/bin/env python
"""Where over t the training loss sits, and where over t the router keeps tokens: one figure, two panels.

    python benchmarks/kept_share_vs_loss.py \\
        docs/adaptive/eval_no_mb_s0.json,docs/adaptive/signal_no_mb_s1.json:"Min-SNR-5" \\
        docs/adaptive/eval_no_mb_floor1_s0.json,docs/adaptive/signal_no_mb_floor1_s0.json:"floor 1" \\
        --out docs/adaptive/kept_share_vs_loss

Each run is ``EVAL,SIGNAL[:LABEL]``: ``EVAL`` a scored model (``eval_*.json`` of adaptive.py: the kept share at
every DDIM-25 sampling step), ``SIGNAL`` its signal stage (``signal_*.json``: the training loss at t on
held-out digits, weighted as in training). Left: the weighted loss against t (log scale), the share of
the objective each t carries. Right: the kept share against t over a sampling run. Writes OUT.png and
OUT.md (both panels' numbers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(spec: str) -> dict:
    paths, _, label = spec.partition(":")
    ev_path, _, sig_path = paths.partition(",")
    if not sig_path:
        raise SystemExit(f"error: {spec!r}: expected EVAL,SIGNAL[:LABEL]")
    ev, sig = json.loads(Path(ev_path).read_text()), json.loads(Path(sig_path).read_text())
    if not ev.get("kept_share_by_t") or not ev.get("timesteps"):
        raise SystemExit(f"error: {ev_path} has no kept share per sampling step")
    rows = sig.get("per_t")
    if not rows:
        raise SystemExit(f"error: {sig_path} has no per-t signal rows")
    return {"label": label or Path(ev_path).stem, "t": ev["timesteps"], "kept": ev["kept_share_by_t"],
            "loss_t": [r["t"] for r in rows], "loss": [r["mse"]["0"] for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="EVAL,SIGNAL[:LABEL]")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--title", default="MNIST 32 DC-DiT N=4: the loss weight over t and the router's kept share")
    args = ap.parse_args(argv)
    runs = [read(s) for s in args.runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        line, = a.plot(r["loss_t"], r["loss"], marker="o", label=r["label"])
        b.plot(r["t"], r["kept"], marker=".", color=line.get_color(), label=r["label"])
    a.set_yscale("log")
    a.set_xlabel("timestep t")
    a.set_ylabel("training loss at t, as weighted (log)")
    a.set_title("where the objective sits")
    b.set_xlabel("timestep t (denoising runs left to right)")
    b.set_ylabel("share of tokens kept")
    b.set_title("where the router keeps tokens (DDIM-25)")
    for ax in (a, b):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    ts = runs[0]["loss_t"]
    lines = ["| run | " + " | ".join(f"loss t={t}" for t in ts) + " | kept, noisiest step | kept, cleanest step "
             "| noisiest / cleanest |", "|---|" + "---:|" * (len(ts) + 3)]
    for r in runs:
        lines.append(f"| {r['label']} | " + " | ".join(f"{v:.2g}" for v in r["loss"])
                     + f" | {r['kept'][0]:.3f} | {r['kept'][-1]:.3f} | {r['kept'][0] / r['kept'][-1]:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
