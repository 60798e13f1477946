"""Tests for dcdit.evaluation and the evaluate / train-classifier commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import needs_inception

from dcdit.evaluation import (
    ArrayImages,
    ClassifierExtractor,
    FeatureSet,
    classifier_accuracy,
    compute_feature_set,
    evaluate,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_classifier,
    load_image_folder,
    load_samples_npz,
    load_stats,
    open_images,
    precision_recall,
    save_classifier,
    save_samples_npz,
    save_stats,
    to_uint8,
    train_classifier,
)
from dcdit.evaluation.io import iter_npz_batches


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=8, size=16, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


# --------------------------------------------------------------------------- I/O


def test_npz_round_trip_with_labels(tmp_path):
    imgs, labels = _images(5), np.arange(5) % 3
    path = save_samples_npz(tmp_path / "s.npz", imgs, labels)
    back, back_labels = load_samples_npz(path)
    assert back.dtype == np.uint8 and np.array_equal(back, imgs)
    assert np.array_equal(back_labels, labels)
    # ADM layout on disk: arr_0 / arr_1
    with np.load(path) as f:
        assert set(f.files) == {"arr_0", "arr_1"}
    # streamed batches (also from a compressed file) equal the array
    np.savez_compressed(tmp_path / "c.npz", arr_0=imgs)
    for p in (path, tmp_path / "c.npz"):
        assert np.array_equal(np.concatenate(list(iter_npz_batches(p, "arr_0", 2))), imgs)
    src = open_images(path, limit=3)
    assert len(src) == 3 and np.array_equal(src.labels, labels[:3])
    assert np.array_equal(np.concatenate(list(src.iter_batches(2))), imgs[:3])


def test_npz_without_labels_and_grayscale(tmp_path):
    gray = _images(4, c=1)[..., 0]  # (N, H, W) is read as one channel
    save_samples_npz(tmp_path / "g.npz", gray)
    back, labels = load_samples_npz(tmp_path / "g.npz")
    assert back.shape == (4, 16, 16, 1) and labels is None


def test_image_folder(tmp_path):
    from PIL import Image

    imgs = _images(3)
    (tmp_path / "sub").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / ("sub" if i == 2 else ".") / f"{i}.png")
    assert np.array_equal(load_image_folder(tmp_path), imgs)
    # grayscale-only folders stay 1-channel; a mixed folder becomes RGB
    gdir = tmp_path / "gray"
    gdir.mkdir()
    Image.fromarray(imgs[0, :, :, 0]).save(gdir / "a.png")
    assert load_image_folder(gdir).shape == (1, 16, 16, 1)
    Image.fromarray(imgs[1]).save(gdir / "b.png")
    out = load_image_folder(gdir)
    assert out.shape == (2, 16, 16, 3) and np.array_equal(out[0, :, :, 0], out[0, :, :, 2])


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 1) and out.ravel().tolist() == [0, 128, 255, 255]


def test_io_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_samples_npz(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="nodir"):
        open_images(tmp_path / "nodir")
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(tmp_path / "f.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        save_samples_npz(tmp_path / "f.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        save_samples_npz(tmp_path / "f.npz", _images(3), labels=[0, 1])
    np.savez(tmp_path / "bad.npz", images=_images(2))
    with pytest.raises(ValueError, match="arr_0"):
        open_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", arr_0=np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        open_images(tmp_path / "bad2.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no png"):
        load_image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- metrics


def test_fid_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # and a full-covariance case: identical covariances leave only the mean term
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-6)


@pytest.mark.parametrize("n", [40, 400])  # fewer samples than dims (singular covariance), and more
def test_frechet_distance_matches_scipy_sqrtm(n):
    import scipy.linalg

    r = np.random.RandomState(n)
    a, b = r.randn(n, 64) @ r.randn(64, 64), r.randn(300, 64) * 2 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7)


def test_frechet_distance_singular_covariance_and_shape_errors():
    # rank-deficient covariances (fewer samples than dims) still give a finite, ~0 self-distance
    feats = np.random.default_rng(2).normal(size=(5, 20))
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(np.zeros(5))


def test_inception_score_extremes():
    k = 10
    uniform = np.zeros((100, k))  # logits
    assert inception_score(uniform, from_logits=True)[0] == pytest.approx(1.0)
    confident = np.eye(k)[np.arange(200) % k] * 50.0  # every split holds every class equally
    mean, std = inception_score(confident, from_logits=True)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    assert inception_score(np.eye(k)[np.arange(200) % k])[0] == pytest.approx(k)  # exact one-hot probs
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(confident)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(np.full((5, k), 1.0 / k))


def test_precision_recall_identical_and_separated():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 8))
    p, r = precision_recall(real, real.copy(), k=3, batch_size=64)
    assert p == 1.0 and r == 1.0
    far = rng.normal(size=(200, 8)) + 100.0
    p, r = precision_recall(real, far, k=3, batch_size=64)
    assert p == 0.0 and r == 0.0
    # fake covering half the real modes: full precision, about half recall
    two = np.concatenate([rng.normal(size=(150, 8)), rng.normal(size=(150, 8)) + 50])
    p, r = precision_recall(two, rng.normal(size=(150, 8)), k=3)
    assert p > 0.9 and 0.4 < r < 0.6


def test_kid_same_vs_different():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kernel_inception_distance(a, b, num_subsets=20, max_subset_size=200)
    diff, _ = kernel_inception_distance(a, b + 1.0, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.05 and diff > 10 * abs(same) and diff > 0.1


def _full_set_kid(x, y):
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    return (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_subsets_of_large_sets_are_unchanged():
    """Sets larger than the subset size: subsets without replacement, exactly the usual KID."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) + 0.3
    mean, std = kernel_inception_distance(a, b, num_subsets=7, max_subset_size=100, seed=3)
    draw = np.random.default_rng(3)
    vals = [_full_set_kid(a[draw.choice(300, 100, replace=False)], b[draw.choice(250, 100, replace=False)])
            for _ in range(7)]
    assert mean == pytest.approx(np.mean(vals), rel=1e-12) and std == pytest.approx(np.std(vals), rel=1e-9)


def test_kid_on_a_small_set_has_a_bootstrap_spread():
    """Issue 29: 200 vs 200 features at subset size 1000 printed ± 0 (every subset was the whole set).
    Now the sets are resampled with replacement: a real spread, close to the spread of the full-set
    KID over fresh draws, and a mean as unbiased as the full-set estimate."""
    from dcdit.evaluation.metrics import kid_subset_plan

    assert kid_subset_plan(200, 5000) == {"subset_size": 200, "bootstrap": [1]}
    assert kid_subset_plan(5000, 5000) == {"subset_size": 1000, "bootstrap": []}
    rng = np.random.default_rng(0)
    full, means, stds = [], [], []
    for _ in range(20):
        a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 0.2
        mean, std = kernel_inception_distance(a, b, num_subsets=50)
        full.append(_full_set_kid(a, b))
        means.append(mean)
        stds.append(std)
    assert min(stds) > 0.01  # no longer 0
    assert 0.5 < np.mean(stds) / np.std(full) < 2.0  # the spread means what it says
    assert abs(np.mean(means) - np.mean(full)) < 0.1 * np.std(full)  # pairs of one feature left out: no bias
    assert abs(np.mean(full) - 0.13) < 0.02  # the shift is seen (KID of identical distributions: 0)


# --------------------------------------------------------------------------- classifier


class _Toy(torch.utils.data.Dataset):
    """Separable toy data: class k is a bright 8x8 square at one of 4 corners (+ noise)."""

    channels, image_size, num_classes = 1, 16, 4

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        x = torch.rand(n, 1, 16, 16, generator=g) * 0.4 - 1.0
        for i, k in enumerate(self.y.tolist()):
            r, c = divmod(k, 2)
            x[i, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 1.5
        self.x = x.clamp(-1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def uint8(self):
        return to_uint8(self.x), self.y.numpy()


@pytest.fixture(scope="module")
def toy_classifier():
    return train_classifier(_Toy(), steps=60, batch_size=32, width=8, feature_dim=32, lr=5e-3, seed=0)


def test_classifier_trains_to_high_accuracy(toy_classifier, tmp_path):
    imgs, labels = _Toy(n=64, seed=1).uint8()
    assert classifier_accuracy(toy_classifier, imgs, labels) >= 0.95
    # RGB input is converted to the classifier's single channel
    assert classifier_accuracy(toy_classifier, np.repeat(imgs, 3, -1), labels) >= 0.95
    out = save_classifier(toy_classifier, tmp_path / "clf")
    assert (out / "classifier.safetensors").is_file() and (out / "classifier.json").is_file()
    loaded = load_classifier(out)
    assert classifier_accuracy(out, imgs, labels) >= 0.95  # a path works too
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.allclose(loaded(x), toy_classifier(x), atol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        classifier_accuracy(toy_classifier, imgs, labels + 4)
    (out / "classifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable classifier weights"):
        load_classifier(out)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_classifier(tmp_path / "no_such_dir")


def test_classifier_features_fid_and_accuracy(toy_classifier, tmp_path):
    ext = ClassifierExtractor(toy_classifier, batch_size=16)
    a_imgs, a_lab = _Toy(n=128, seed=2).uint8()
    b_imgs, _ = _Toy(n=128, seed=3).uint8()
    feats, probs = ext.features_and_probs(a_imgs)
    assert feats.shape == (128, 32) and feats.dtype == np.float64 and probs.shape == (128, 4)
    assert np.allclose(probs.sum(1), 1) and np.allclose(ext(torch.from_numpy(a_imgs[:5])), feats[:5])
    save_samples_npz(tmp_path / "a.npz", a_imgs, a_lab)
    save_samples_npz(tmp_path / "b.npz", b_imgs)
    res = evaluate(tmp_path / "a.npz", tmp_path / "b.npz", "fid,is,pr,kid,acc", ext, cache_dir=tmp_path / "cache")
    assert res["acc"] >= 0.95 and res["is"] > 3.0 and res["precision"] > 0.8
    same = evaluate(tmp_path / "a.npz", tmp_path / "a.npz", "fid", ext, use_cache=False)
    assert abs(same["fid"]) < 1e-4 and res["fid"] > same["fid"]
    # uniform noise images are far from the toy data in classifier-feature space
    noise = evaluate(ArrayImages(_images(128, size=16, c=1)), tmp_path / "b.npz", "fid", ext, use_cache=False)
    assert noise["fid"] > 10 * res["fid"]


def test_stats_cache_and_stats_file_reference(toy_classifier, tmp_path):
    ext = ClassifierExtractor(toy_classifier)
    imgs, _ = _Toy(n=64, seed=4).uint8()
    src = ArrayImages(imgs)
    fs = compute_feature_set(src, ext, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1 and fs.path == cached[0]
    again = compute_feature_set(ArrayImages(imgs.copy()), ext, cache_dir=tmp_path)
    assert np.allclose(again.mu, fs.mu) and again.extractor == ext.name
    # a cached file is a reference statistics file
    res = evaluate(imgs, cached[0], "fid,pr", ext, use_cache=False)
    assert abs(res["fid"]) < 1e-3 and res["reference_stats"] == "stored"
    # stats from another extractor are refused
    save_stats(tmp_path / "other.npz", FeatureSet(fs.mu, fs.sigma, 64, "classifier-other"))
    with pytest.raises(ValueError, match="computed with classifier-other"):
        evaluate(imgs, tmp_path / "other.npz", "fid", ext)
    loaded = load_stats(tmp_path / "other.npz")
    assert loaded.features is None and loaded.extractor == "classifier-other"
    # ADM-style reference (images + mu/sigma, no extractor entry): stored stats are
    # Inception statistics, so another extractor recomputes from the images
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048))
    res = evaluate(imgs, tmp_path / "adm.npz", "fid", ext, use_cache=False)
    assert res["reference_stats"] == "computed" and abs(res["fid"]) < 1e-3
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="use --feature inception"):
        evaluate(imgs, tmp_path / "stats_only.npz", "fid", ext)


def test_evaluate_errors(toy_classifier, tmp_path):
    ext = ClassifierExtractor(toy_classifier)
    save_samples_npz(tmp_path / "a.npz", _images(8, 16, 1))
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        evaluate(tmp_path / "a.npz", tmp_path / "nothere.npz", "fid", ext)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(tmp_path / "a.npz", tmp_path / "a.npz", "fid,bleu", ext)
    with pytest.raises(ValueError, match="need a reference"):
        evaluate(tmp_path / "a.npz", None, "fid", ext)
    with pytest.raises(ValueError, match="needs class labels"):
        evaluate(tmp_path / "a.npz", None, "acc", ext)


# --------------------------------------------------------------------------- Inception




@needs_inception
def test_inception_features_are_2048_d_and_finite(tmp_path):
    from dcdit.evaluation import InceptionV3

    ext = InceptionV3(batch_size=2)
    assert ext.name == "inception-v3-tf2015"
    imgs = _images(3, size=32)
    feats = ext(imgs)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # pool_3 features follow a ReLU
    assert np.allclose(ext(imgs[1:2]), feats[1:2], atol=1e-4)  # batching does not change features
    assert ext(imgs[:1, :, :, :1]).shape == (1, 2048)  # grayscale is expanded to RGB
    save_samples_npz(tmp_path / "s.npz", imgs)
    with pytest.raises(ValueError, match="class probabilities"):
        evaluate(tmp_path / "s.npz", None, "is", ext)


@needs_inception
def test_fast_inception_equals_the_torchscript_up_to_fp32_rounding():
    """The library's channels-last, batch-norm-folded pass gives today's features (the TorchScript's)."""
    from dcdit.evaluation import InceptionV3, inception

    fast, plain = InceptionV3(batch_size=4), InceptionV3(batch_size=4, fast=False)
    assert isinstance(fast.fast, inception.FastInception) and plain.fast is None and fast.name == plain.name
    imgs = np.concatenate([_images(3, size=32), _images(2, size=32, c=1, seed=1)[..., [0, 0, 0]]])
    f, ref = fast(imgs), plain(imgs)
    scale = np.abs(ref).max()
    assert scale > 0.5 and np.abs(f - ref).max() < 1e-5 * scale  # fp32 rounding (measured: ~2e-6)
    with pytest.raises(ValueError, match="fid-helper InceptionV3 layout"):
        inception.FastInception(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_and_train_classifier(tmp_path, capsys, monkeypatch, toy_classifier):
    from dcdit.cli import main
    from dcdit.cli import train_classifier as tc

    clf_dir = save_classifier(toy_classifier, tmp_path / "clf")
    a_imgs, a_lab = _Toy(n=64, seed=5).uint8()
    save_samples_npz(tmp_path / "a.npz", a_imgs, a_lab)
    code = main(["evaluate", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--metrics", "fid,acc",
                 "--feature", f"classifier:{clf_dir}", "--json", str(tmp_path / "r.json"), "--no-cache", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FID" in out and "acc" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert abs(res["fid"]) < 1e-4 and res["acc"] >= 0.95
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--metrics", "is",
                 "--feature", f"classifier:{clf_dir}"]) == 2
    assert "missing.npz" in capsys.readouterr().err

    # train-classifier with a stand-in for dcdit.data
    monkeypatch.setattr(tc, "build_data", lambda source, **kw: _Toy(n=64, seed=kw.get("seed", 0)))
    code = main(["train-classifier", "--source", "shapes", "--steps", "5", "--batch-size", "16",
                 "--width", "8", "--feature-dim", "16", "--out", str(tmp_path / "c2")])
    assert code == 0
    meta = json.loads((tmp_path / "c2" / "classifier.json").read_text())
    assert meta["config"]["feature_dim"] == 16 and "train_accuracy" in meta and "heldout_accuracy" in meta
    assert load_classifier(tmp_path / "c2").config.num_classes == 4
    assert main(["train-classifier", "--source", "npz"]) == 2
    assert "--data-path" in capsys.readouterr().err


# --------------------------------------------------------------------------- TorchScript


class _StyleGANLike(torch.nn.Module):
    """Mimics the StyleGAN2-ADA detector's call convention on tiny inputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        f = self.conv(img / 255.0).mean(dim=(2, 3))
        return f if return_features else torch.softmax(self.fc(f), dim=1)


class _Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x[:, :2]  # (N, 2, H, W): spatially averaged by the extractor


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
def test_torchscript_extractors(tmp_path):
    from dcdit.evaluation import TorchScriptExtractor, build_extractor

    torch.jit.script(_StyleGANLike()).save(str(tmp_path / "sg.pt"))
    torch.jit.script(_Plain()).save(str(tmp_path / "plain.pt"))
    imgs = _images(4, size=8)
    sg = build_extractor(f"torchscript:{tmp_path / 'sg.pt'}", batch_size=3)
    feats, probs = sg.features_and_probs(imgs)
    assert sg.has_probs and feats.shape == (4, 6) and probs.shape == (4, 5)
    assert np.allclose(probs.sum(1), 1)
    plain = TorchScriptExtractor(tmp_path / "plain.pt", input_range=(0, 1))
    expected = imgs[..., :2].astype(np.float64).mean(axis=(1, 2)) / 255.0
    assert not plain.has_probs and np.allclose(plain(imgs), expected, atol=1e-5)
    assert plain.name != TorchScriptExtractor(tmp_path / "plain.pt").name  # contract is in the name
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_extractor(f"torchscript:{tmp_path / 'nope.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript"):
        build_extractor(f"torchscript:{tmp_path / 'junk.pt'}")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("vgg")
