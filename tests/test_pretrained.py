"""Checkpoints shipped inside the package: ``pretrained:NAME`` everywhere a checkpoint is taken."""
import numpy as np
import pytest
import torch

from dcdit.cli import main
from dcdit.pretrained import PRETRAINED_DIR, list_pretrained, resolve_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(list_pretrained())


def test_index_lists_only_complete_model_directories():
    assert NAMES, "no pretrained checkpoints shipped"
    for name, entry in list_pretrained().items():
        assert (PRETRAINED_DIR / name / "config.json").is_file() and (PRETRAINED_DIR / name / "ema.safetensors").is_file()
        assert entry["description"] and entry["trained"] and entry["scores"]
    total = sum(f.stat().st_size for f in PRETRAINED_DIR.rglob("*.safetensors"))
    assert total < 60e6  # small enough to live in the repository (55 MB with the canvas DC-DiT stored in float16)


@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_model_loads_and_samples(name, tmp_path):
    from dcdit.checkpoint import load_model

    model = load_model(f"pretrained:{name}")
    assert not model.training
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", f"pretrained:{name}", "--num-samples", "2", "--batch-size", "2", "--steps", "2",
                 "--npz", str(out), "--no-progress"]) == 0
    size = model.config["input_size"]
    assert np.load(out)["arr_0"].shape[:3] == (2, size, size)


def _command_args(command: str, name: str, model, tmp_path) -> list[str]:
    """A toy-size invocation of ``command`` on ``pretrained:name`` (every command that takes a checkpoint)."""
    from dcdit.models import is_dcdit

    ckpt = f"pretrained:{name}"
    size, channels = str(model.config["input_size"]), str(model.config["in_channels"])
    if command == "flops":
        return ["flops", "--ckpt", ckpt, "--steps", "2", "--batch-size", "1", "--json", str(tmp_path / "f.json")]
    if command == "visualize":
        return ["visualize", "--ckpt", ckpt, "--out", str(tmp_path / "viz"), "--steps", "2", "--classes", "0",
                "--per-class", "1", "--rows", "1", "--columns", "2"]
    if command == "sample-guided":  # guidance (and, for a DC-DiT, Lite-CFG and a tail drop)
        extra = ["--cond-drop", "0.2", "--uncond-drop", "0.5"] if is_dcdit(model) else []
        return ["sample", "--ckpt", ckpt, "--num-samples", "2", "--batch-size", "2", "--steps", "2", "--cfg-scale",
                "3", "--no-progress", "--npz", str(tmp_path / "g.npz"), *extra]
    assert command == "bench"  # the shipped model against a small random partner of the other kind
    own = "--dcdit-ckpt" if is_dcdit(model) else "--dit-ckpt"
    return ["bench", own, ckpt, "--size", "S", "--patch", "8", "--no-calibrate", "--image-size", size,
            "--in-channels", channels, "--batch-size", "1", "--steps", "2", "--repeats", "1", "--warmup", "0",
            "--tail-drop", "0", "--json", str(tmp_path / "b.json")]


@pytest.mark.parametrize("command", ["sample-guided", "flops", "visualize", "bench"])
@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_model_runs_through_every_command_that_takes_a_checkpoint(name, command, tmp_path):
    """The main job's guard: a shipped model sampled by any command gets its own diffusion (prediction type)."""
    from dcdit.checkpoint import load_model

    model = load_model(f"pretrained:{name}")
    assert main(_command_args(command, name, model, tmp_path)) == 0


def test_diffusion_for_checkpoint_follows_the_checkpoint_not_the_caller():
    """Shipped models predict different things (epsilon for mnist16-dcdit-n4, v for the 32x32 ones):
    each one's sampling diffusion reads its own output that way."""
    from dcdit.checkpoint import load_model
    from dcdit.diffusion.factory import MEAN_TYPES
    from dcdit.sampling import diffusion_for_checkpoint, model_info

    seen = set()
    for name in NAMES:
        model = load_model(f"pretrained:{name}")
        diffusion = diffusion_for_checkpoint(f"pretrained:{name}", model, "ddim", 5)
        prediction = model_info(model)["prediction"]
        assert diffusion.model_mean_type == MEAN_TYPES[prediction]
        seen.add(prediction)
    assert seen == {"epsilon", "v"}  # the guard covers both kinds


def test_unknown_name_is_one_line_naming_it_and_the_choices(capsys):
    with pytest.raises(ValueError, match="unknown pretrained model 'nope'; shipped: "):
        resolve_pretrained("pretrained:nope")
    assert main(["sample", "--ckpt", "pretrained:nope", "--num-samples", "1", "--npz", "x.npz"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and NAMES[0] in err[0]


def test_info_lists_the_shipped_names(capsys):
    assert main(["info", "--filter", "nothing-matches-this"]) == 0
    assert "Pretrained checkpoints" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(f"pretrained:{n}" in out for n in NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if "mnist" in n])
def test_shipped_mnist_models_sample_their_class(name):
    """>= 90% of 100 guided samples are classified as their class by an independent classifier."""
    from dcdit.checkpoint import load_model
    from dcdit.data import DataConfig, build_dataset
    from dcdit.data.transforms import to_uint8_images
    from dcdit.evaluation import classifier_accuracy, train_classifier
    from dcdit.sampling import sample, sampling_diffusion_for

    model = load_model(f"pretrained:{name}")
    size = model.config["input_size"]
    clf = train_classifier(build_dataset(DataConfig(source="mnist", image_size=size)), steps=400, seed=0)
    labels = np.arange(100) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, _ = sample(model, sampling_diffusion_for(model, "ddim", 25), labels, seed=1, cfg_scale=3.0,
                      measure_flops=False, clip_denoised=True)
    acc = classifier_accuracy(clf, to_uint8_images(x.float()), labels)
    print(name, acc)
    assert acc >= 0.9


def test_diffusion_for_checkpoint_reads_the_schedule_the_run_trained_with(tmp_path):
    """Noise schedule and T come from the training config saved beside the weights; arguments override."""
    import yaml

    from dcdit.checkpoint import load_model, save_model_dir
    from dcdit.diffusion import create_diffusion
    from dcdit.sampling import diffusion_for_checkpoint

    model = load_model("pretrained:mnist16-dcdit-n4")
    save_model_dir(tmp_path / "ckpt", model)
    (tmp_path / "ckpt" / "train_config.yaml").write_text(
        yaml.safe_dump({"diffusion": {"noise_schedule": "cosine", "diffusion_steps": 500}}))
    got = diffusion_for_checkpoint(tmp_path / "ckpt", model, "ddpm", 500)
    want = create_diffusion("500", noise_schedule="cosine", diffusion_steps=500)
    np.testing.assert_array_equal(got.alphas_cumprod, want.alphas_cumprod)
    linear = diffusion_for_checkpoint(tmp_path / "ckpt", model, "ddpm", 1000, noise_schedule="linear",
                                      diffusion_steps=1000)
    np.testing.assert_array_equal(linear.alphas_cumprod, create_diffusion("1000").alphas_cumprod)
