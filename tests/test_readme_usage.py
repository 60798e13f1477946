"""The README's usage runs as written (issue 29): every `dcdit` command of its Usage block, in order, in
an empty directory at toy size, exits 0; and its "From Python" example runs as it stands.

Toy size means arguments appended to a command (argparse keeps the last value, `--set` the last
setting), never removed: fewer steps, samples and images. RUN stands for a shipped checkpoint.
The commands that need files from outside or several processes are skipped, each with its reason
(SKIPPED); a skip that matches no README line fails, so the list cannot go stale.
"""
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

from conftest import inception_available
from dcdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = "pretrained:mnist-dcdit-n4"

# README line prefix -> why it is not run here
SKIPPED = {
    "dcdit demo": "the main job trains a classifier and a DC-DiT and scores 100 samples (minutes); "
                  "tests/test_demo.py runs it at toy size (default suite)",
    "torchrun": "several processes; tests/test_ddp.py runs 2-process training and sampling through torchrun",
    "dcdit extract-features": "needs ImageNet and a local diffusers VAE; tests/test_latents.py runs it on a stand-in",
    "dcdit upcycle --dit DiT-XL-2-256x256.pt": "needs the released DiT-XL/2 checkpoint (a download)",
    "dcdit train --config configs/imagenet256/": "needs the upcycled DiT-XL/2 above and ImageNet latents",
    "dcdit sample --ckpt DiT-XL-2-256x256.pt": "needs the released DiT-XL/2 checkpoint and a VAE",
    "dcdit sample --ckpt runs/demo/train": "needs the demo's run (skipped above)",
}
NEEDS_INCEPTION = ("dcdit reference", "dcdit evaluate samples.npz mnist_ref.npz --metrics fid,sfid",
                   "dcdit evaluate samples.npz mnist_ref.npz --run")

# command prefix -> arguments appended for toy size
_TRAIN = ["train.steps=2", "train.global_batch_size=8", "data.num_samples=64", "train.progress=false",
          "samples.interval=0", "train.tensorboard=false", "ratio.group_size=8", "train.ckpt_interval=2"]
TOY = [
    ("info", ["--image-size", "64"]),
    ("sample", ["--num-samples", "4", "--batch-size", "4", "--steps", "2", "--grid-count", "4", "--no-progress"]),
    ("visualize", ["--steps", "2", "--per-class", "1", "--rows", "1", "--columns", "2", "--classes", "0,1"]),
    ("train --config", [a for s in _TRAIN for a in ("--set", s)]),
    ("upcycle", ["--calibration-size", "16"]),
    ("reference", ["--num-samples", "8", "--batch-size", "8"]),
    ("evaluate", ["--batch-size", "8", "--cache-dir", "eval_cache", "--kid-subsets", "10", "--splits", "2"]),
    ("train-classifier", ["--steps", "2", "--batch-size", "16", "--num-samples", "64"]),
    ("flops", ["--steps", "2"]),
    ("bench", ["--image-size", "64", "--batch-size", "1", "--steps", "1", "--repeats", "1", "--warmup", "0",
               "--tail-drop", "0", "--no-calibrate"]),
]


def usage_lines() -> list[str]:
    """The command lines of the README's Usage block, comments dropped, in order."""
    text = README.read_text()
    block = text.split("\n## Usage\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(" ".join(words))
    return lines


def python_example() -> str:
    """The README's first ```python block after "From Python": load, sample with a budget, read the routing."""
    text = README.read_text()
    after = text.split("\nFrom Python", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_usage_commands_run_in_order(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mnist")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    lines = usage_lines()
    skips = dict(SKIPPED)
    if not inception_available():
        skips.update({p: "the fid-helper Inception weights are not installed" for p in NEEDS_INCEPTION})
    for prefix in SKIPPED:
        assert any(line.startswith(prefix) for line in lines), f"stale skip {prefix!r}: no such README line"
    ran, skipped, seconds = [], [], []
    for line in lines:
        reason = next((r for p, r in skips.items() if line.startswith(p)), None)
        if reason is not None:
            skipped.append(f"{line}  <- {reason}")
            continue
        argv = shlex.split(line)
        assert argv[0] == "dcdit", line
        argv = ["pretrained:mnist-dcdit-n4" if a == "RUN" else a for a in argv[1:]]
        rest = " ".join(argv)
        for prefix, extra in TOY:
            if rest.startswith(prefix):
                argv += extra
                break
        t0 = time.perf_counter()
        code = main(argv)
        out = capsys.readouterr()
        seconds.append((round(time.perf_counter() - t0, 1), line))
        assert code == 0, f"`{line}` exited {code}: {out.err.strip().splitlines()[-1:]}"
        ran.append(line)
    print("ran (seconds):\n  " + "\n  ".join(f"{t:5.1f}  {c}" for t, c in seconds) + "\nskipped:\n  " + "\n  ".join(skipped))
    assert len(ran) + len(skipped) == len(lines) and len(ran) >= 16
    # what the flow promised: the upcycled model, the runs, the files the later commands read
    assert (tmp_path / "runs/upcycled-mnist/upcycle.json").is_file()
    for path in ("runs/shapes_dcdit_cpu/latest", "runs/mnist_dcdit_cpu/latest", "runs/mnist_dcdit_upcycled_cpu/latest",
                 "digits.png", "budget.png", "samples.npz", "plots/class_grid.png", "runs/mnist-classifier"):
        assert (tmp_path / path).exists(), path


def test_readme_python_example_runs(capsys):
    """The README's "From Python" block as it stands: uint8 images, the budget met, one mask per step."""
    code = python_example()
    assert 'load_model("pretrained:' in code and "solve_budget" in code and "keep_mask" in code
    ns: dict = {}
    exec(compile(code, "README.md (From Python)", "exec"), ns)
    images, stats, masks = ns["images"], ns["stats"], ns["masks"]
    assert images.dtype.name == "uint8" and images.shape == (8, 16, 16, 1)
    assert abs(stats.mean_kept_share[0] - 0.15) <= 0.03  # the keep_share budget, on the real run
    assert len(masks) == 25 and masks[-1].shape == (8, 64) and masks[-1].dtype == torch.bool
    kept = torch.stack(masks).float().mean().item()  # the masks are what the stats report
    assert kept == pytest.approx(stats.mean_kept_share[0], abs=1e-6)
    printed = capsys.readouterr().out
    assert re.search(r"tail drop 0\.\d{3}: kept share 0\.1\d\d", printed)
