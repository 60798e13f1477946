"""The canvas data source: MNIST digits at seeded random positions on a black canvas."""
import numpy as np
import pytest
import torch

from dcdit.data import DataConfig, DataError, build_dataset

pytest.importorskip("mnist")

from dcdit.data.canvas import DIGIT, INK_THRESHOLD, CanvasDataset, canvas_positions  # noqa: E402
from dcdit.data.mnist import load_mnist_splits  # noqa: E402


@pytest.fixture(scope="module")
def test_split():
    return build_dataset(DataConfig(source="canvas", split="test"))


def test_splits_sizes_labels_and_defaults(test_split):
    splits = load_mnist_splits()
    assert len(test_split) == 10000 and np.array_equal(test_split.labels, splits["test"][1])
    assert (test_split.image_size, test_split.channels, test_split.num_classes) == (64, 1, 10)
    assert len(build_dataset(DataConfig(source="canvas", split="val"))) == 10000
    assert len(build_dataset(DataConfig(source="canvas", split="trainval"))) == 60000
    assert len(build_dataset(DataConfig(source="canvas"))) == 50000  # train by default


def test_items_are_the_mnist_digit_pasted_on_black(test_split):
    digits = load_mnist_splits()["test"][0]
    for i in (0, 1, 777, 9999):
        x, y = test_split[i]
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y) == int(test_split.labels[i])
        u8 = np.rint((x[0].numpy() + 1) * 127.5).astype(np.uint8)  # the mnist source's scaling, inverted
        top, left = test_split.positions[i]
        assert np.array_equal(u8[top:top + DIGIT, left:left + DIGIT], digits[i])
        u8[top:top + DIGIT, left:left + DIGIT] = 0
        assert not u8.any()  # black elsewhere: x = -1
        assert float(x.min()) == -1.0 and float(x.max()) <= 1.0


def test_positions_are_a_function_of_seed_and_index():
    a = canvas_positions(0, np.arange(5000))
    assert a.dtype == np.int64 and a.min() == 0 and a.max() == 64 - DIGIT  # both ends reached
    assert np.array_equal(canvas_positions(0, [4321, 7]), a[[4321, 7]])  # item i alone = item i in bulk
    assert not np.array_equal(canvas_positions(1, np.arange(5000)), a)
    assert abs(a.mean() - (64 - DIGIT) / 2) < 0.5  # uniform over 0..36
    ds0 = CanvasDataset("test", seed=3)
    ds1 = CanvasDataset("test", seed=3)
    assert torch.equal(ds0[123][0], ds1[123][0])
    sub = build_dataset(DataConfig(source="canvas", split="test", num_samples=20, seed=3))
    i = int(sub.indices[5])
    assert torch.equal(sub[5][0], ds0[i][0])  # a subset keeps each item's place


def test_other_sizes_and_channels():
    ds = build_dataset(DataConfig(source="canvas", split="test", image_size=28, channels=3))
    x, _ = ds[0]
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[2])
    assert (ds.positions == 0).all()  # a 28x28 canvas is plain MNIST
    assert build_dataset(DataConfig(source="canvas", split="test", image_size=96))[0][0].shape == (1, 96, 96)


def test_detail_map_is_the_ink(test_split):
    for i in (0, 5, 4242):
        x, y, detail = test_split.get_with_detail(i)
        assert detail.dtype == torch.bool and detail.shape == (64, 64)
        assert torch.equal(x, test_split[i][0]) and int(y) == int(test_split.labels[i])
        assert torch.equal(detail, (x[0] + 1) * 127.5 > INK_THRESHOLD + 0.5)
        assert torch.equal(test_split.detail_map(i), detail)
        top, left = test_split.positions[i]
        rows, cols = detail.nonzero().T
        assert rows.min() >= top and rows.max() < top + DIGIT and cols.min() >= left and cols.max() < left + DIGIT
    share = np.mean([test_split.detail_map(i).float().mean().item() for i in range(200)])
    assert 0.015 < share < 0.04  # sparse: ~2.5% of the canvas is ink


def test_routing_vs_detail_reads_the_canvas_detail(test_split):
    from dcdit.analysis import routing_vs_detail
    from dcdit.diffusion import create_diffusion
    from dcdit.models import DCDiT
    from dcdit.models.config import DCDiTConfig

    model = DCDiT(DCDiTConfig(input_size=64, patch_size=4, in_channels=1, num_classes=10, d_model=[32, 32],
                              num_heads=[2, 2], arch_layout=["c1", ["D1"], "c1"], enc_dec_dim_factor=[2, None],
                              norm_groups=8)).eval()
    rows = routing_vs_detail(model, create_diffusion(""), test_split, timesteps=(50,), num_images=4)
    assert 0.0 <= rows[0]["auc"] <= 1.0 and 0.05 < rows[0]["detail_share"] < 0.3  # 4x4 cells touching ink


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=16), "canvas needs data.image_size >= 28"),
    (dict(split="dev"), "unknown split 'dev'"),
    (dict(channels=2), "channels must be 1 or 3"),
])
def test_bad_config_values_are_one_line_errors(kw, message):
    with pytest.raises(DataError, match=message) as e:
        build_dataset(DataConfig(source="canvas", **kw))
    assert "\n" not in str(e.value)


def test_canvas_classifier_pools_by_max_and_round_trips(tmp_path):
    import json

    from dcdit.evaluation import load_classifier, save_classifier, train_classifier

    data = build_dataset(DataConfig(source="canvas", split="test", image_size=32, num_samples=64))
    clf = train_classifier(data, steps=2, batch_size=16, width=8, feature_dim=16)
    assert clf.config.pool == "max" and clf.config.image_size == 32
    x = torch.stack([data[i][0] for i in range(4)])
    back = load_classifier(save_classifier(clf, tmp_path / "c"))
    assert back.config.pool == "max" and torch.equal(back.features(x), clf.features(x))
    assert all(m.padding_mode == "replicate" for m in clf.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(clf.features(x), torch.relu(clf.proj(clf.body(x).amax(dim=(2, 3)))))
    meta = json.loads((tmp_path / "c" / "classifier.json").read_text())
    del meta["config"]["pool"]  # a classifier saved before the option: mean pooling, as it was trained
    (tmp_path / "c" / "classifier.json").write_text(json.dumps(meta))
    assert load_classifier(tmp_path / "c").config.pool == "mean"
