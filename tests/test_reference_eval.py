"""`dcdit reference` (ADM-format reference batches with FID/sFID statistics) and what `dcdit evaluate`
now tells the user: progress, the device it picked, small or mismatched sets (issue 16.3)."""
import json

import numpy as np
import pytest
import torch

from conftest import needs_inception

from dcdit.cli import main
from dcdit.evaluation import evaluate
from dcdit.evaluation.features import FeatureExtractor, InceptionSpatial, resolve_device


class MeanColour(FeatureExtractor):
    """A cheap 3-d feature (mean RGB) standing in for Inception where only the plumbing is tested."""

    name, dim = "mean-colour", 3

    def _forward(self, images, want_probs):
        x = torch.from_numpy(np.repeat(images, 3 // images.shape[-1], -1)).float()
        return x.mean(dim=(1, 2)), None


def test_reference_writes_3_channel_adm_npz_from_a_1_channel_set(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", arr_0=gray, arr_1=np.arange(5))
    out = tmp_path / "ref.npz"
    assert main(["reference", "--source", "npz", "--path", str(tmp_path / "gray.npz"), "--out", str(out)]) == 0
    assert "5 images 8x8x3" in capsys.readouterr().out
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"], np.repeat(gray, 3, -1))  # exact round trip, gray repeated
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert main(["reference", "--source", "shapes", "--out", str(tmp_path / "x.png")]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_evaluate_warns_on_small_sets_and_refuses_mismatched_ones(tmp_path):
    import warnings

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(8x8, 3 channels\) and reference .*\(16x16, 1 channel\) differ"):
        evaluate(a, b, "fid", MeanColour(), use_cache=False)  # issue 15: an error, not a warning
    with pytest.warns(UserWarning, match=r"differ in image size or channels.*comparing anyway"):  # issue 16
        out = evaluate(a, b, "fid", MeanColour(), use_cache=False, allow_mismatch=True)
    assert np.isfinite(out["fid"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 6 images > 3-d features: no small-set warning
        evaluate(a, a[::-1].copy(), "fid", MeanColour(), use_cache=False)
    with pytest.warns(UserWarning, match=r"2 images for 3-d fid features.*biased upward"):
        evaluate(a[:2], a[:4], "fid", MeanColour(), use_cache=False)


def test_evaluate_takes_gray_and_gray_repeated_to_rgb_as_the_same_images(tmp_path):
    """Issue 29: `dcdit sample --npz` of an MNIST model (1 channel) against `dcdit reference` (gray repeated
    to RGB, ADM's 3 channels) is the README's flow: the same images, so no error and the same score."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    other = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=gray, arr_1=np.arange(6))
    np.savez(tmp_path / "ref.npz", arr_0=np.repeat(other, 3, -1), arr_1=np.arange(6))
    mixed = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "fid", MeanColour(), use_cache=False)
    same = evaluate(gray, other, "fid", MeanColour(), use_cache=False)
    assert mixed["fid"] == pytest.approx(same["fid"], rel=1e-12, abs=1e-9)
    colour = np.repeat(other, 3, -1)
    colour[0, 0, 0, 0] ^= 1  # one channel off by one: a colour image, not gray
    with pytest.raises(ValueError, match=r"differ in channels and .* is in colour"):
        evaluate(gray, colour, "fid", MeanColour(), use_cache=False)
    with pytest.raises(ValueError, match=r"differ in image size or channels"):  # sizes still must agree
        evaluate(gray, np.repeat(rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8), 3, -1), "fid",
                 MeanColour(), use_cache=False)


def test_evaluate_says_when_kid_resamples_a_small_set():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"KID: subsets of 30, not 1000: the samples has only 30 images, "
                                         r"resampled with replacement .* bootstrap spread"):
        out = evaluate(a, b, "kid", MeanColour(), use_cache=False)
    assert out["kid_subset_size"] == 30 and out["kid_std"] > 0


def test_evaluate_device_is_auto(monkeypatch):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    assert MeanColour(device="cpu").device == torch.device("cpu")


def test_sfid_needs_inception(tmp_path):
    a = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="sfid needs the Inception network"):
        evaluate(a, a, "sfid", MeanColour(), use_cache=False)




@needs_inception
def test_reference_stats_and_sfid_round_trip(tmp_path, capsys):
    """Stored mu/sigma and mu_s/sigma_s equal what evaluate computes from the same images: FID = sFID = 0."""
    ref = tmp_path / "ref.npz"
    assert main(["reference", "--source", "shapes", "--num-samples", "8", "--image-size", "16", "--out", str(ref),
                 "--stats", "--device", "cpu"]) == 0
    assert "with Inception statistics" in capsys.readouterr().out
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["mu_s"].shape == (InceptionSpatial.dim_of(),) == (2023,)
        assert f["sigma_s"].shape == (2023, 2023) and str(f["extractor"]) == "inception-v3-tf2015"
    out = tmp_path / "r.json"
    assert main(["evaluate", str(ref), str(ref), "--metrics", "fid,sfid", "--cache-dir", str(tmp_path / "c"),
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "feature network inception-v3-tf2015 on" in err
    assert "samples inception-v3-tf2015-mixed6conv7" in err  # the progress bar of the spatial pass
    assert "warning: samples: 8 images for 2048-d fid features" in err
    r = json.loads(out.read_text())
    assert r["reference_stats"] == "stored"
    assert abs(r["fid"]) < 1e-3 and abs(r["sfid"]) < 1e-3, r


def test_evaluate_logs_to_a_run(tmp_path, monkeypatch, capsys):
    """--run: the scores land in RUN/eval.jsonl and TensorBoard (eval/...) at the run's latest step."""
    import sys
    import types

    from dcdit.evaluation import features

    written = []

    class Writer:
        def __init__(self, logdir):
            pass

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(features, "build_extractor", lambda *a, **k: MeanColour())
    monkeypatch.setattr("dcdit.evaluation.build_extractor", lambda *a, **k: MeanColour())
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("ckpt-0001200\n")
    rng = np.random.default_rng(0)
    for name in ("s", "r"):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    assert main(["evaluate", str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--run", str(run), "--no-cache"]) == 0
    rec = json.loads((run / "eval.jsonl").read_text())
    assert rec["step"] == 1200 and rec["feature"] == "mean-colour"
    assert ("eval/fid", rec["fid"], 1200) in written
    assert main(["evaluate", str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--step", "5"]) == 2
    assert "--step applies only with --run" in capsys.readouterr().err
