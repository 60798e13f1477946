"""What a new user runs into: bare DiT checkpoints everywhere, `info` at small sizes, `--which`,
bench's calibrated share, and what training prints / logs (issue 16)."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dcdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_training import TINY_DIT  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- bare original-format DiT state dicts


@pytest.fixture(scope="module")
def bare_dit(tmp_path_factory):
    """A tiny DiT saved as the released checkpoints are: a bare state dict in a .pt, no config.json."""
    from dcdit.models import build_dit

    torch.manual_seed(0)
    m = build_dit("DiT-S/2", input_size=8, in_channels=4, depth=1, num_classes=10, learn_sigma=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("released") / "DiT-S-2-64x64.pt"
    torch.save(m.state_dict(), path)
    return path, m.eval()


def test_bare_dit_state_dict_loads_with_inferred_config(bare_dit):
    from dcdit.checkpoint import infer_config, load_model

    path, ref = bare_dit
    model = load_model(path)
    assert model.config == ref.config  # every field read back off the weights
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 9])
    torch.testing.assert_close(model(x, t, y), ref(x, t, y), rtol=0, atol=0)
    state = ref.state_dict()
    cfg = infer_config({k: v for k, v in state.items() if k != "final_layer.linear.weight"} |
                       {"final_layer.linear.weight": torch.zeros(2 * 2 * 4, 384)})
    assert cfg["learn_sigma"] is False
    with pytest.raises(ValueError, match="no registry size"):
        infer_config({**state, "t_embedder.mlp.0.weight": torch.zeros(100, 256)}, "odd.pt")
    with pytest.raises(ValueError, match="not a DiT state dict.*config.json"):
        infer_config({"w": torch.zeros(1)}, "dcdit.pt")


def test_cli_commands_accept_a_bare_dit_checkpoint(bare_dit, tmp_path, capsys):
    path, _ = bare_dit
    npz = tmp_path / "lat.npz"
    with pytest.warns(UserWarning, match="raw latents"):
        assert main(["sample", "--ckpt", str(path), "--steps", "2", "--num-samples", "2", "--npz", str(npz),
                     "--no-progress"]) == 0
    with np.load(npz) as f:
        assert f["latents"].shape == (2, 4, 8, 8)
    assert main(["flops", "--ckpt", str(path), "--steps", "2", "--batch-size", "1", "--which", "model"]) == 0
    out = capsys.readouterr().out
    assert "DiT-S-2-64x64.pt (model)" in out and "total per image" in out
    assert main(["bench", "--dit-ckpt", str(path), "--image-size", "64", "--steps", "1", "--repeats", "1",
                 "--warmup", "0", "--batch-size", "1", "--tail-drop", "0", "--no-calibrate"]) == 0
    assert "DiT-S-2-64x64.pt (ema)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="latent"):
        assert main(["visualize", "--ckpt", str(path), "--out", str(tmp_path / "viz"), "--steps", "2",
                     "--per-class", "1", "--rows", "1", "--classes", "0,1"]) == 0
    assert (tmp_path / "viz" / "class_grid.png").exists()


# ----------------------------------------------------------------- info, flops/bench


@pytest.mark.parametrize("size", [8, 32])
def test_info_at_small_image_sizes(size, capsys):
    assert main(["info", "--image-size", str(size), "--filter", "S"]) == 0
    out = capsys.readouterr().out
    (skipped,) = [l for l in out.splitlines() if l.startswith("(not shown:")]
    assert "DiT-S/8" in skipped and ("DiT-S/2" in skipped) == (size == 8) and "DC-DiT-S-N4" in out
    assert main(["info", "--image-size", "12"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_bench_label_shows_the_share_the_run_keeps(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--image-size", "32", "--steps", "2", "--repeats", "1", "--warmup", "0",
                 "--batch-size", "2", "--tail-drop", "0", "--keep-share", "0.3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    label = rows[1]["model"]
    assert "router calibrated: keeps" in label
    assert float(label.split("keeps ")[1].split(" ")[0]) == pytest.approx(rows[1]["kept_share"], abs=5e-4)
    assert abs(rows[1]["kept_share"] - 0.3) <= 0.02


# ----------------------------------------------------------------- training output


def test_training_without_progress_bar_prints_loss_lines_and_init_from(tmp_path, capsys):
    from dcdit.training import load_train_config, train

    first = train(load_train_config(None, TINY_DIT + ["train.steps=2"]), out=tmp_path / "a")
    capsys.readouterr()
    train(load_train_config(None, TINY_DIT + ["train.steps=4", f"model.init_from={first}"]), out=tmp_path / "b")
    err = capsys.readouterr().err
    assert f"model initialised from {first} (ema weights" in err
    lines = [l for l in err.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["2/4", "4/4"] and all("loss" in l and "img/s" in l for l in lines)


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard itself is optional)."""

    instances: list = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.images = logdir, [], []
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, np.asarray(img).shape, step, dataformats))

    def close(self):
        pass


def test_tensorboard_gets_scalars_and_sample_grids(tmp_path, monkeypatch):
    from dcdit.training import load_train_config, train

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.instances.clear()
    sets = TINY_DIT + ["train.steps=2", "train.tensorboard=true", "samples.interval=2", "samples.num=4",
                       "samples.steps=2"]
    run = train(load_train_config(None, sets), out=tmp_path / "r")
    (w,) = _FakeWriter.instances
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("train/loss", last["loss"], 2) in w.scalars
    assert w.images and w.images[0][0] == "samples" and w.images[0][2] == 2 and w.images[0][1][-1] == 3


def test_missing_tensorboard_is_said_not_silent(tmp_path, monkeypatch, capsys):
    from dcdit.training.logging import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    log = MetricsLogger(tmp_path, True, tensorboard=True)
    assert capsys.readouterr().err == ""  # held back until the run has started (errors before stay one line)
    log.info("run started")
    log.close()
    err = capsys.readouterr().err
    assert "TensorBoard is unavailable" in err and "pip install tensorboard" in err


# ----------------------------------------------------------------- README and configs agree


def _readme_option(command: str, option: str) -> str:
    import re
    import shlex

    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(f"dcdit {command} "):
            argv = shlex.split(line.split("#")[0])
            return argv[argv.index(option) + 1]
    raise AssertionError(f"no `dcdit {command}` example in README.md")


def test_readme_paths_are_the_ones_the_configs_read():
    import yaml

    from dcdit.training import load_train_config

    upcycled = load_train_config(ROOT / "configs/imagenet256/dcdit_xl_n4_upcycled.yaml")
    assert _readme_option("upcycle", "--out") == upcycled.model.init_from
    base = yaml.safe_load((ROOT / "configs/imagenet256/base.yaml").read_text())
    assert _readme_option("extract-features", "--out") == base["data"]["path"]
    assert "latest ->" not in (ROOT / "configs/README.md").read_text()  # `latest` is a file, not a symlink


# ----------------------------------------------------------------- issue 29: output that misleads, leftovers


def test_sample_lines_say_what_they_measured(tmp_path, capsys):
    """The budget's "achieved" under --flops first names the samples it covers; Lite-CFG shows both drops."""
    npz = str(tmp_path / "s.npz")
    base = ["sample", "--ckpt", "pretrained:mnist16-dcdit-n4", "--steps", "2", "--npz", npz, "--no-progress"]
    assert main(base + ["--num-samples", "4", "--batch-size", "2", "--probe-size", "2", "--gflops", "0.04"]) == 0
    cap = capsys.readouterr()
    assert "counted on the first 2 samples: --flops all counts every one" in cap.out
    assert "over the first 2 of 4 samples (--flops first counts FLOPs on the first --flop-images" in cap.err
    assert main(base + ["--num-samples", "4", "--batch-size", "2", "--flop-images", "1"]) == 0
    assert "counted on the first 1 samples" in capsys.readouterr().out  # a first batch of one, counted
    assert main(base + ["--num-samples", "4", "--flop-images", "0"]) != 0
    assert "--flop-images must be positive" in capsys.readouterr().err
    assert main(base + ["--num-samples", "4", "--workers", "0"]) != 0
    assert "--workers must be a positive integer or auto, got '0'" in capsys.readouterr().err
    assert main(base + ["--num-samples", "4", "--batch-size", "1", "--workers", "2"]) == 0
    assert "1 process(es) x 2 worker(s)" in capsys.readouterr().out
    assert main(base + ["--num-samples", "2", "--cfg-scale", "2", "--uncond-drop", "0.5"]) == 0
    assert "tail-drop 0.000 (conditional), 0.500 (unconditional)" in capsys.readouterr().out


def test_errors_name_the_option_at_fault(tmp_path, capsys):
    npz = str(tmp_path / "s.npz")
    base = ["sample", "--ckpt", "pretrained:mnist16-dcdit-n4", "--npz", npz]
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "--device: 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    assert main(base + ["--device", "gpu"]) == 2
    assert "--device: unknown device 'gpu'" in capsys.readouterr().err
    assert main(["bench", "--dit-ckpt", "pretrained:mnist16-dcdit-n4", "--dcdit-ckpt", "pretrained:mnist-dit4"]) == 2
    assert "--dit-ckpt pretrained:mnist16-dcdit-n4 holds a DC-DiT: give it as --dcdit-ckpt (the two checkpoints " \
           "look swapped)" in capsys.readouterr().err
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    torch.save({"x": np.arange(3)}, tmp_path / "numpy.pt")
    assert main(["sample", "--ckpt", str(text), "--npz", npz]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.pt: not a PyTorch checkpoint" in err
    assert main(["sample", "--ckpt", str(tmp_path / "numpy.pt"), "--npz", npz]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a pickle holding more than tensors (Unsupported global" in err
    assert "weights_only=False" not in err and "--trust-pickle" in err


def test_sample_creates_a_missing_output_directory_and_says_so(tmp_path, capsys):
    npz = tmp_path / "new" / "dir" / "s.npz"
    assert main(["sample", "--ckpt", "pretrained:mnist16-dcdit-n4", "--num-samples", "1", "--steps", "1",
                 "--npz", str(npz), "--no-progress"]) == 0
    assert f"--npz: creating the directory {npz.parent}" in capsys.readouterr().err and npz.is_file()


def test_train_failure_leaves_no_empty_run_dir_and_resume_of_a_finished_run_says_so(tmp_path, capsys):
    from dcdit.training import load_train_config, train

    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match="do not make a valid"):
        train(load_train_config(None, TINY_DIT + ["train.steps=1", "model.overrides={depth: 0}"]), out=bad)
    assert not bad.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ValueError):
        train(load_train_config(None, TINY_DIT + ["train.steps=1", "model.overrides={depth: 0}"]), out=kept)
    assert kept.is_dir()  # a directory the user made stays
    run = train(load_train_config(None, TINY_DIT + ["train.steps=1"]), out=tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"nothing to train: {run} is at step 1 and train.steps is 1" in capsys.readouterr().err


def test_config_typos_get_a_suggestion():
    from dcdit.models import build_dcdit
    from dcdit.training import load_train_config

    with pytest.raises(ValueError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'\?"):
        load_train_config(None, ["train.stpes=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate'$"):  # nothing close: no guess
        load_train_config(None, ["optim.learning_rate=3"])
    with pytest.raises(ValueError, match=r"dmodel \(did you mean d_model\?\)"):
        build_dcdit("DC-DiT-S-N4", dmodel=[64, 64])


def test_visualize_on_a_dit_says_the_boundary_plot_is_skipped(tmp_path, capsys):
    assert main(["visualize", "--ckpt", "pretrained:mnist-dit4", "--out", str(tmp_path / "v"), "--steps", "1",
                 "--per-class", "1", "--rows", "1", "--classes", "0"]) == 0
    assert "not a DC-DiT): skipping boundary_maps.png" in capsys.readouterr().err
    assert not (tmp_path / "v" / "boundary_maps.png").exists() and (tmp_path / "v" / "class_grid.png").exists()


def test_cached_evaluate_says_it_read_the_cache(tmp_path):
    from dcdit.evaluation import evaluate
    from test_reference_eval import MeanColour

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    for expect in ("extracting mean-colour features of 8 images", "read from the cache"):
        lines = []
        evaluate(a, b, "fid", MeanColour(), cache_dir=tmp_path / "c", log=lines.append)
        assert sum(expect in line for line in lines) == 2, lines
