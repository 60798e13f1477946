"""``dcdit evaluate``: FID / IS / precision-recall / KID / class accuracy of samples."""
from __future__ import annotations

import argparse

from dcdit.cli.options import add_device

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Score samples against a reference: FID, sFID, IS, precision/recall, KID, class accuracy."


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,255), got {text!r}") from None
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples: ADM .npz (arr_0 uint8 NHWC), image folder, or statistics .npz")
    p.add_argument("reference", nargs="?", default=None,
                   help="reference: ADM .npz, image folder, or statistics .npz (mu, sigma); optional for is/acc")
    p.add_argument("--metrics", default="fid",
                   help="comma list of fid,sfid,is,pr,kid,acc (default: fid). sfid: Inception only; is/acc: "
                        "a network with class probabilities (classifier:PATH, or torchscript:PATH with logits)")
    p.add_argument("--feature", default="inception",
                   help="inception | inception:PATH | classifier:PATH | torchscript:PATH (default: inception)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    add_device(p)
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="compare sets of different image size or channels (a warning instead of an error)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    p.add_argument("--cache-dir", default=None, help="statistics cache (default: $DCDIT_CACHE or ~/.cache/dcdit/stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    p.add_argument("--recompute-reference-stats", action="store_true",
                   help="ignore mu/sigma stored in a reference .npz that also has images")
    p.add_argument("--splits", type=int, default=10, help="IS splits (default: 10)")
    p.add_argument("--k", type=int, default=3, help="k for precision/recall (default: 3)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size (default: 1000); a set with fewer images is resampled with replacement "
                        "(a bootstrap: ± is then its spread; a warning says so)")
    p.add_argument("--input-range", type=_range, default=None,
                   help="torchscript only: value range the network expects, LOW,HIGH (default: 0,255)")
    p.add_argument("--input-size", type=int, default=None,
                   help="torchscript only: resize images to this size first (default: native size)")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="also log the scores to this training run: RUN_DIR/eval.jsonl and its TensorBoard "
                        "(eval/fid, ...) at --step")
    p.add_argument("--step", type=int, default=None,
                   help="--run: training step the samples belong to (default: the run's latest checkpoint)")
    p.add_argument("--quiet", action="store_true", help="print only the table (no progress, notes or warnings)")


def run(args) -> int:
    import json
    import sys
    import time
    import warnings
    from pathlib import Path

    from dcdit.cli.options import resolve_device
    from dcdit.evaluation import build_extractor, evaluate, format_table, parse_metrics
    from dcdit.evaluation.evaluate import check_comparable

    metrics = parse_metrics(args.metrics)
    if args.step is not None and args.run is None:
        raise ValueError("--step applies only with --run RUN_DIR")
    step = None if args.run is None else run_step(args.run, args.step)
    if not args.feature.startswith("torchscript") and (args.input_range or args.input_size):
        raise ValueError("--input-range/--input-size apply only to --feature torchscript:PATH")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    if not args.allow_mismatch:
        try:
            check_comparable(args.samples, args.reference, args.limit)  # before loading a feature network
        except ValueError as e:
            raise ValueError(f"{e} (or pass --allow-mismatch)") from None
    extractor = build_extractor(args.feature, batch_size=args.batch_size, device=resolve_device(args.device),
                                input_range=args.input_range, input_size=args.input_size)
    log(f"feature network {extractor.name} on {extractor.device}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.quiet else "always")
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr, flush=True)
        result = evaluate(
            args.samples, args.reference, metrics, extractor,
            cache_dir=args.cache_dir, use_cache=not args.no_cache, limit=args.limit,
            is_splits=args.splits, k=args.k, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size, use_reference_stats=not args.recompute_reference_stats,
            log=log, progress=not args.quiet, allow_mismatch=args.allow_mismatch,
        )
    result["samples"] = str(args.samples)
    if args.reference is not None:
        result["reference"] = str(args.reference)
    result["seconds"] = round(time.time() - t0, 2)
    print(format_table(result))
    if args.run is not None:
        from dcdit.training.logging import MetricsLogger

        sink = MetricsLogger(Path(args.run), True, tensorboard=True, jsonl="eval.jsonl", prefix="eval",
                             note_missing_tensorboard=False)
        sink.log(step, {k: v for k, v in result.items() if k not in ("samples", "reference")})
        sink.close()
        log(f"logged to {args.run} (eval.jsonl{', TensorBoard' if sink.tb is not None else ''}) at step {step}")
    if args.json:
        from dcdit.utils import save_json

        save_json(args.json, result)
        log(f"wrote {args.json}")
    return 0


def run_step(run_dir, step=None) -> int:
    """``step``, else the step of the run's latest checkpoint (``latest`` names ``ckpt-0001200``)."""
    from pathlib import Path

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such run directory")
    if step is not None:
        return int(step)
    latest = run / "latest"
    if not latest.is_file():
        raise ValueError(f"--run {run} has no 'latest' checkpoint: give --step")
    name = latest.read_text().strip()
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"--run {run}: cannot read a step from latest = {name!r}; give --step") from None
