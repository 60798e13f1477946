"""The scoring a reproduction needs, as library API: generate_local's batching, ReferenceScorer (FID against
cached reference statistics), classifier accuracy, kept-share summaries, interleaved timing, router bias."""
import numpy as np
import pytest
import torch

from dcdit.evaluation import (
    ArrayImages, ClassifierConfig, ClassifierExtractor, ReferenceScorer, SmallCNN, classifier_accuracy,
    compute_feature_set, feature_statistics, frechet_distance, load_stats,
)
from dcdit.evaluation.classifier import predict
from dcdit.sampling import SampleStats, generate_local, sampling_diffusion_for
from dcdit.sampling.cost import router_bias, set_router_bias, time_interleaved
from dcdit.sampling.generate import batch_bounds
from dcdit.utils import round_robin_seconds
from test_sampling import NUM_CLASSES, tiny_dcdit, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dcdit():
    return tiny_dcdit()


def run(model, n=5, **kw):
    return generate_local(model, sampling_diffusion_for(model, "ddim", 3), n, seed=7, clip_denoised=True, **kw)


# --------------------------------------------------------------------------- generation


def test_batch_bounds():
    assert batch_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert batch_bounds(7, 3, first=2) == [(0, 2), (2, 5), (5, 7)]
    assert batch_bounds(2, 3, first=5) == [(0, 2)]
    assert batch_bounds(0, 3) == []


def test_generate_local_batching_does_not_change_images(dcdit):
    one = run(dcdit, batch_size=5)
    split = run(dcdit, batch_size=2)
    head = run(dcdit, batch_size=4, flop_images=1)
    assert one.images.dtype == np.uint8 and one.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(one.images, split.images)
    np.testing.assert_array_equal(one.images, head.images)
    np.testing.assert_array_equal(one.labels, np.arange(5) % NUM_CLASSES)  # class-balanced by index
    np.testing.assert_array_equal(one.stats.kept_share, split.stats.kept_share)
    assert one.seconds > 0


def test_generate_local_counts_flops_on_the_first_images(dcdit):
    got = run(dcdit, batch_size=4, flop_images=2)
    assert got.stats.num_images == 5 and got.stats.kept_share.shape == (3, 1, 5)
    assert got.stats.flops_per_step.shape == (3, 2)  # counted on the first two images only
    first_two = run(dcdit, n=2, batch_size=2)
    np.testing.assert_array_equal(got.stats.flops_per_step, first_two.stats.flops_per_step)
    assert run(dcdit, batch_size=5, flops="none").stats.flops_per_step is None


def test_generate_local_passes_guidance_and_tail_drop(dcdit):
    plain, dropped = run(dcdit, batch_size=5), run(dcdit, batch_size=5, tail_drop=0.5)
    assert dropped.stats.tail_drop == 0.5
    assert dropped.stats.kept_share.mean() < plain.stats.kept_share.mean()
    guided = run(dcdit, batch_size=5, cfg_scale=3.0)
    assert not np.array_equal(guided.images, plain.images)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generate_local_workers_sample_the_same_images(dcdit, precision):
    """Batches sampled side by side in threads are the batches one worker samples: equal images, labels,
    kept shares and FLOP counts (the counted first batch runs alone), in index order; the threads come back."""
    kw = dict(n=7, batch_size=2, flop_images=1, precision=precision)
    one, many = run(dcdit, **kw), run(dcdit, workers=3, **kw)
    np.testing.assert_array_equal(one.images, many.images)
    np.testing.assert_array_equal(one.indices, many.indices)
    np.testing.assert_array_equal(one.stats.kept_share, many.stats.kept_share)
    np.testing.assert_array_equal(one.stats.flops_per_step, many.stats.flops_per_step)
    assert torch.get_num_threads() == 1  # the one_thread fixture's count, restored
    latents = run(dcdit, workers=2, keep_latents=True, flops="none", **{**kw, "flop_images": None})
    assert latents.images is None and latents.latents.shape == (7, 3, 8, 8)


def test_workers_option_is_checked():
    from dcdit.sampling import resolve_workers

    assert resolve_workers(3) == 3 and resolve_workers("2") == 2
    assert resolve_workers("auto", "cpu") == (2 if torch.get_num_threads() >= 2 else 1)
    assert resolve_workers("auto", "cuda") == 1
    for bad in (0, "-1", "two"):
        with pytest.raises(ValueError, match="workers must be a positive integer or 'auto', got"):
            resolve_workers(bad)
    with pytest.raises(ValueError, match="workers must be positive, got 0"):
        run(tiny_dit(), workers=0)


def test_generate_local_rejects_a_bad_flop_count(dcdit):
    with pytest.raises(ValueError, match="flop_images must be positive, got 0"):
        run(dcdit, flop_images=0)


def test_kept_summary_by_hand():
    kept = np.array([[[0.2, 0.4]], [[0.6, 0.8]], [[1.0, 1.0]]])  # (steps 3, stages 1, n 2)
    natural = np.full_like(kept, 0.5)
    st = SampleStats([900, 500, 0], kept_share=kept, natural_share=natural, num_images=2)
    s = st.kept_summary()
    assert s["kept_share_noisiest"] == pytest.approx(0.3) and s["kept_share_cleanest"] == pytest.approx(1.0)
    assert (s["t_noisiest"], s["t_cleanest"]) == (900, 0)
    assert s["kept_share_mean"] == pytest.approx(4.0 / 6)
    assert s["kept_share_by_t"] == pytest.approx([0.3, 0.7, 1.0]) and s["natural_share_by_t"] == [0.5] * 3
    assert SampleStats([900, 0], num_images=2).kept_summary() == {}  # a DiT does not route


# --------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return ClassifierExtractor(SmallCNN(ClassifierConfig(in_channels=1, num_classes=4, image_size=8, width=4,
                                                         feature_dim=6)))


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_fid_of_a_set_against_its_own_statistics_is_zero(extractor, tmp_path):
    ref = images(40, 0)
    scorer = ReferenceScorer.from_images(extractor, ref, cache_dir=tmp_path)
    fid, _ = scorer.fid(ref)
    assert abs(fid) < 1e-6
    assert scorer.fid(images(40, 1))[0] > 1e-3
    # the reference statistics went into the cache, a valid statistics file
    cached = load_stats(scorer.reference.path)
    np.testing.assert_allclose(cached.mu, scorer.reference.mu)


def test_fid_of_the_first_k_images(extractor, tmp_path):
    scorer = ReferenceScorer.from_images(extractor, images(40, 0), cache_dir=tmp_path)
    smp = images(30, 2)
    fid, fid_at = scorer.fid(smp, first=(10, 20, 30, 50))
    assert list(fid_at) == [10, 20]  # prefixes at least as long as the set are left out
    for k, v in fid_at.items():
        feats = compute_feature_set(ArrayImages(smp[:k]), extractor, use_cache=False).features
        mu, sigma = feature_statistics(feats)
        assert v == pytest.approx(frechet_distance(mu, sigma, scorer.reference.mu, scorer.reference.sigma))
    assert fid == pytest.approx(scorer.fid_of_features(scorer.features(smp)))


def test_scored_sets_skip_the_cache_when_asked(extractor, tmp_path):
    ref = images(40, 0)
    cached = ReferenceScorer.from_images(extractor, ref, cache_dir=tmp_path / "a")
    fresh = ReferenceScorer.from_images(extractor, ref, cache_dir=tmp_path / "b", cache_samples=False)
    smp = images(30, 4)
    assert cached.fid(smp)[0] == fresh.fid(smp)[0]
    assert len(list((tmp_path / "a").glob("*.npz"))) == 2  # the reference and the samples
    assert len(list((tmp_path / "b").glob("*.npz"))) == 1  # the reference only


def test_classifier_accuracy_equals_a_hand_count(extractor):
    clf = extractor.model
    imgs = images(25, 3)
    pred = predict(clf, imgs)
    labels = pred.copy()
    labels[[0, 3, 7]] = (labels[[0, 3, 7]] + 1) % 4  # three wrong
    assert classifier_accuracy(clf, imgs, labels) == pytest.approx(22 / 25)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        classifier_accuracy(clf, imgs, np.full(25, 4))


# --------------------------------------------------------------------------- timing, router bias


def test_round_robin_seconds_interleaves():
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "ab"}
    times = round_robin_seconds(calls, repeats=2, warmup=1, before=lambda k: order.append(f"<{k}"),
                                after=lambda k: order.append(f"{k}>"))
    assert order == ["a", "b"] + ["<a", "a", "a>", "<b", "b", "b>"] * 2
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2} and all(t >= 0 for v in times.values() for t in v)
    with pytest.raises(ValueError, match="need repeats >= 1 and warmup >= 0, got 0 and 1"):
        round_robin_seconds(calls, repeats=0)


def test_time_interleaved_times_every_setup(dcdit):
    d = sampling_diffusion_for(dcdit, "ddim", 2)
    a, b = time_interleaved([(dcdit, d, [0, 1], {}), (dcdit, d, [0], {"tail_drop": 0.5})], repeats=2, warmup=0)
    assert (a.batch, a.steps, len(a.seconds), b.batch) == (2, 2, 2, 1)


def test_set_router_bias():
    m = tiny_dcdit()
    set_router_bias(m, 10.0)
    assert torch.all(router_bias(m) == 10.0)
    d = sampling_diffusion_for(m, "ddim", 2)
    st = generate_local(m, d, 2, flops="none").stats
    assert np.all(st.natural_share == 1.0)  # every token a natural boundary
    with pytest.raises(ValueError, match="DiT has no router to calibrate"):
        set_router_bias(tiny_dit(), 1.0)
