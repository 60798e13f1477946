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
    assert total < 50e6  # small enough to live in the repository


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
