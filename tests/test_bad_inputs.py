"""Bad input, table-driven: each case exits 2 with one line that names the offending key, file or value.

Every row builds its input in a fresh temporary directory, runs the CLI in-process and checks the exit
code, that stderr is a single line, and that it contains every "needle" (the key, file or value at fault).
"""
import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dcdit.checkpoint import save_model_dir
from dcdit.cli import main
from dcdit.training import load_train_config, train
from dcdit.training.rundir import RunLock

from test_sampling import tiny_dcdit
from test_training import CONFIGS, TINY_DIT

CPU_CONFIG = ["--config", str(CONFIGS / "shapes_dit_cpu.yaml")]


def sets(items) -> list[str]:
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    run = train(load_train_config(None, TINY_DIT + ["train.steps=1"]), out=root / "run")
    dc = save_model_dir(root / "dcdit", tiny_dcdit())
    return {"run": run, "dcdit": dc}


class Case:
    """``tmp``: a fresh directory; ``run``: a copy of a 1-step DiT run; ``dcdit``: a copy of a tiny DC-DiT model dir."""

    def __init__(self, tmp: Path, assets: dict):
        self.tmp = tmp
        self.run = Path(shutil.copytree(assets["run"], tmp / "run"))
        self.dcdit = Path(shutil.copytree(assets["dcdit"], tmp / "dcdit"))
        self.ckpt = self.run / (self.run / "latest").read_text().strip()
        self.context = contextlib.nullcontext()

    # ---- builders
    def new_run(self, *items) -> list[str]:
        return ["train", "--out", str(self.tmp / "new")] + CPU_CONFIG + sets(TINY_DIT + ["train.steps=1", *items])

    def resume(self, *items) -> list[str]:
        return ["train", "--resume", str(self.run)] + sets(["train.steps=2", *items])

    def npz(self, labels, name="data.npz", size=8, channels=3, key="arr_1", red=False) -> Path:
        path = self.tmp / name
        images = np.zeros((len(labels), size, size, channels), np.uint8)
        if red:  # colour, not gray repeated to RGB
            images[..., 0] = 255
        np.savez(path, arr_0=images, **{key: np.asarray(labels)})
        return path

    def edit_json(self, path: Path, fn) -> Path:
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
        return path

    def mismatched_dit(self) -> Path:
        """The run's checkpoint with a config.json whose width differs from the weights."""
        self.edit_json(self.ckpt / "config.json", lambda c: {**c, "hidden_size": 64})
        return self.ckpt

    def mismatched_dcdit(self) -> Path:
        self.edit_json(self.dcdit / "config.json", lambda c: {**c, "d_model": [32, 32]})
        return self.dcdit


def _resume_other_config(c: Case):
    other = c.tmp / "other.yaml"
    other.write_text("model: {arch: dcdit, preset: DC-DiT-S-N4}\ntrain: {steps: 4}\n")
    return ["train", "--resume", str(c.run), "--config", str(other)], ["model.arch", "'dcdit'", "'dit'"]


def _locked(c: Case):
    c.context = RunLock(c.tmp / "new")
    return c.new_run(), ["in use by another training", str(c.tmp / "new")]


def _state(c: Case, fn):
    c.edit_json(c.ckpt / "train_state.json", fn)
    return c.resume()


# Each row: id -> builder(case) returning (argv, needles).
CASES = {
    # ---- train: model.overrides and presets
    "overrides depth=0": lambda c: (c.new_run("model.overrides.depth=0"), ["model.overrides", "depth", "got 0"]),
    "overrides depth=-1": lambda c: (c.new_run("model.overrides.depth=-1"), ["model.overrides", "depth", "got -1"]),
    "overrides hidden_size=abc": lambda c: (c.new_run("model.overrides.hidden_size=abc"),
                                            ["model.overrides", "hidden_size", "'abc'"]),
    "overrides unknown key": lambda c: (c.new_run("model.overrides.bogus=1"), ["model.overrides", "bogus"]),
    "overrides mlp_ratio=-1": lambda c: (c.new_run("model.overrides.mlp_ratio=-1"), ["model.overrides", "mlp_ratio"]),
    "overrides class_dropout_prob=1.5": lambda c: (c.new_run("model.overrides.class_dropout_prob=1.5"),
                                                   ["class_dropout_prob", "1.5"]),
    "dcdit overrides d_model=[0, 0]": lambda c: (c.new_run("model.arch=dcdit", "model.preset=DC-DiT-S-N4",
                                                           "model.overrides={d_model: [0, 0]}"),
                                                 ["model.overrides", "d_model"]),
    "unknown preset": lambda c: (c.new_run("model.preset=DiT-M/2"), ["model.preset", "DiT-M/2"]),
    "num_workers=-1": lambda c: (c.new_run("train.num_workers=-1"), ["train.num_workers", "-1"]),
    "prediction=noise": lambda c: (c.new_run("diffusion.prediction=noise"), ["diffusion.prediction", "'noise'"]),
    # ---- train: labels
    "npz float labels": lambda c: (c.new_run("data.source=npz", f"data.path={c.npz([0, 1.5])}"),
                                   ["data.npz", "arr_1", "1.5"]),
    "npz label 2**40": lambda c: (c.new_run("data.source=npz", f"data.path={c.npz([0, 2 ** 40])}"),
                                  ["data.npz", str(2 ** 40)]),
    "npz string labels": lambda c: (c.new_run("data.source=npz", f"data.path={c.npz(['a', 'b'])}"),
                                    ["data.npz", "arr_1", "dtype"]),
    "npz NaN label": lambda c: (c.new_run("data.source=npz", f"data.path={c.npz([0.0, float('nan')], key='labels')}"),
                                ["data.npz", "labels", "nan"]),
    "data.num_classes=2**40": lambda c: (c.new_run(f"data.num_classes={2 ** 40}"),
                                         ["data.num_classes", str(2 ** 40)]),
    # ---- train: resume
    "resume data.image_size": lambda c: (c.resume("data.image_size=16"), ["data.image_size", "16", "8"]),
    "resume --config other": _resume_other_config,
    "resume model.overrides": lambda c: (c.resume("model.overrides.depth=2"), ["model.overrides", "'depth': 2"]),
    "resume train.seed": lambda c: (c.resume("train.seed=5"), ["train.seed", "5"]),
    "resume state without optimizer": lambda c: (
        _state(c, lambda s: {k: v for k, v in s.items() if k != "optimizer"}), ["train_state.json", "'optimizer'"]),
    "resume state is a list": lambda c: (_state(c, lambda s: [s]), ["train_state.json", "list"]),
    "resume state step 'abc'": lambda c: (_state(c, lambda s: {**s, "step": "abc"}),
                                          ["train_state.json", "'step'", "'abc'"]),
    "resume model config is a list": lambda c: (
        (c.edit_json(c.ckpt / "config.json", lambda m: [m]), c.resume())[1], ["config.json", "list"]),
    "resume locked run dir": lambda c: (
        (setattr(c, "context", RunLock(c.run)), c.resume())[1], ["in use by another training", str(c.run)]),
    "new run on a locked dir": _locked,
    # ---- train: init_from
    "init_from mismatched weights": lambda c: (c.new_run(f"model.init_from={c.mismatched_dit()}"),
                                               ["size mismatch", "ckpt-0000001"]),
    "init_from config list": lambda c: (
        c.new_run(f"model.init_from={c.edit_json(c.dcdit / 'config.json', lambda m: [m]).parent}"),
        ["config.json", "list"]),
    # ---- sample
    "sample mismatched checkpoint": lambda c: (
        ["sample", "--ckpt", str(c.mismatched_dit()), "--npz", str(c.tmp / "s.npz")], ["size mismatch", "ckpt-0000001"]),
    "sample config.json list": lambda c: (
        ["sample", "--ckpt", str(c.edit_json(c.dcdit / "config.json", lambda m: [m]).parent), "--npz",
         str(c.tmp / "s.npz")], ["config.json", "list"]),
    "sample config depth 0": lambda c: (
        ["sample", "--ckpt", str(c.edit_json(c.ckpt / "config.json", lambda m: {**m, "depth": 0}).parent),
         "--npz", str(c.tmp / "s.npz")], ["depth", "got 0"]),
    "sample unknown arch": lambda c: (
        ["sample", "--ckpt", str(c.edit_json(c.dcdit / "config.json", lambda m: {**m, "arch": "xyz"}).parent),
         "--npz", str(c.tmp / "s.npz")], ["'xyz'"]),
    "sample --guidance-channels 99": lambda c: (
        ["sample", "--ckpt", str(c.dcdit), "--cfg-scale", "2", "--guidance-channels", "99", "--npz",
         str(c.tmp / "s.npz")], ["--guidance-channels 99", "1..3"]),
    "sample --guidance-channels 0": lambda c: (
        ["sample", "--ckpt", str(c.dcdit), "--cfg-scale", "2", "--guidance-channels", "0", "--npz",
         str(c.tmp / "s.npz")], ["--guidance-channels 0"]),
    "sample missing checkpoint": lambda c: (["sample", "--ckpt", str(c.tmp / "nope"), "--npz", str(c.tmp / "s.npz")],
                                            [str(c.tmp / "nope")]),
    # ---- flops, visualize
    "flops mismatched checkpoint": lambda c: (["flops", "--ckpt", str(c.mismatched_dcdit()), "--steps", "1"],
                                              ["size mismatch", "dcdit"]),
    "flops config.json list": lambda c: (
        ["flops", "--ckpt", str(c.edit_json(c.dcdit / "config.json", lambda m: [m]).parent), "--steps", "1"],
        ["config.json", "list"]),
    "visualize mismatched checkpoint": lambda c: (
        ["visualize", "--ckpt", str(c.mismatched_dcdit()), "--out", str(c.tmp / "viz")], ["size mismatch", "dcdit"]),
    # ---- evaluate
    "evaluate image sizes differ": lambda c: (
        ["evaluate", str(c.npz([0, 1], "a.npz", size=8)), str(c.npz([0, 1], "b.npz", size=16))],
        ["a.npz", "b.npz", "8x8", "16x16"]),
    "evaluate channels differ": lambda c: (  # gray against colour (gray against gray-as-RGB is accepted: issue 29)
        ["evaluate", str(c.npz([0, 1], "a.npz", channels=1)), str(c.npz([0, 1], "b.npz", channels=3, red=True))],
        ["a.npz", "b.npz", "1 channel", "3 channels", "in colour"]),
    "evaluate float labels": lambda c: (
        ["evaluate", str(c.npz([0.5, 1], "a.npz")), str(c.npz([0, 1], "b.npz")), "--metrics", "fid"],
        ["a.npz", "arr_1", "integer"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_the_problem(name, assets, tmp_path, capsys):
    case = Case(tmp_path, assets)
    argv, needles = CASES[name](case)
    capsys.readouterr()
    with case.context:
        code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"dcdit {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_failed_cases_leave_no_new_run_behind(assets, tmp_path, capsys):
    """A refused new training leaves no checkpoint and no lock (the run directory may hold nothing else)."""
    case = Case(tmp_path, assets)
    assert main(case.new_run("model.overrides.depth=0")) == 2
    new = tmp_path / "new"
    assert not new.exists() or sorted(p.name for p in new.iterdir()) == []
