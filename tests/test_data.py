import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.data import DataConfig, DataError, build_dataset, to_uint8_images


def test_shapes_deterministic_in_range_and_labelled():
    a = build_dataset(DataConfig(source="shapes", num_samples=40, seed=3))
    b = build_dataset(DataConfig(source="shapes", num_samples=40, seed=3))
    c = build_dataset(DataConfig(source="shapes", num_samples=40, seed=4))
    x, y = a[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert int(y) == 7 % 10 and (a.channels, a.image_size, a.num_classes, a.is_latent) == (3, 32, 10, False)
    assert torch.equal(a[7][0], b[7][0]) and not torch.equal(a[7][0], c[7][0])


def test_shapes_detail_map_marks_edges_and_texture():
    ds = build_dataset(DataConfig(source="shapes", num_samples=32))
    grads_detail, grads_flat = [], []
    for i in range(32):
        x, _, detail = ds.get_with_detail(i)
        g = x.mean(0)
        grad = torch.zeros_like(g)
        grad[:-1] += (g[1:] - g[:-1]).abs()
        grad[:, :-1] += (g[:, 1:] - g[:, :-1]).abs()
        assert 0 < detail.float().mean() < 0.9
        grads_detail.append(grad[detail].mean())
        grads_flat.append(grad[~detail].mean())
    assert torch.stack(grads_detail).mean() > 5 * torch.stack(grads_flat).mean()


def test_npz_round_trip_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=np.arange(6) % 3)
    ds = build_dataset(DataConfig(source="npz", path=str(tmp_path / "s.npz")))
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (6, 3, 8, 3)
    back = to_uint8_images(torch.stack([ds[i][0] for i in range(6)]))
    assert np.array_equal(back, imgs)
    np.savez(tmp_path / "bad.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(DataError, match="arr_0 must be uint8"):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "bad.npz")))
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "missing.npz")))


def test_image_folder_labels_crop_and_corrupt_files(tmp_path):
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for j in range(3):
            Image.new("RGB", (40, 30), (80 * k, 10 * j, 0)).save(tmp_path / name / f"{j}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=16))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=16, skip_corrupt=True))
    assert any("skipped 1 unreadable" in str(m.message) for m in w)
    assert len(ds) == 6 and ds.num_classes == 2 and ds[0][0].shape == (3, 16, 16)
    assert [int(ds[i][1]) for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_mnist_from_the_wheel():
    pytest.importorskip("mnist")
    ds = build_dataset(DataConfig(source="mnist", split="test", num_samples=50))
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and ds.num_classes == 10 and 0 <= int(y) < 10
    assert x[:, :2].max() == -1  # zero padding around the 28x28 digit


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        DataConfig(source="imagenet")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="data.path must name"):
        build_dataset(DataConfig(source="npz"))
