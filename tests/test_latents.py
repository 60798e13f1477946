"""VAE helpers, `dcdit extract-features` and the `latents` data source, with a tiny random AutoencoderKL."""
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from dcdit.cli import main  # noqa: E402
from dcdit.data import DataConfig, DataError, SubsetDataset, build_dataset  # noqa: E402
from dcdit.data.folder import load_image  # noqa: E402
from dcdit.data.latents import LatentsDataset, LatentShardWriter  # noqa: E402
from dcdit.data.transforms import from_uint8_images  # noqa: E402
from dcdit.data.vae import SCALE, decode_latents, encode_images, load_vae  # noqa: E402

SIZE = 16  # pixels; the 2-block VAE halves once -> 8x8 latents


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for k in ("cat", "dog"):
        (root / "img" / k).mkdir(parents=True)
        for j in range(3):  # non-square, larger than SIZE: exercises the centre crop
            Image.fromarray(rng.integers(0, 256, (20 + j, 24, 3), dtype=np.uint8)).save(root / "img" / k / f"{j}.png")
    return root


def extract(assets, out, *extra):
    argv = ["extract-features", "--data-path", str(assets / "img"), "--vae", str(assets / "vae"), "--out", str(out),
            "--image-size", str(SIZE), "--batch-size", "4", *extra]
    return main(argv)


def test_extract_mean_matches_direct_encoding_and_reads_back(assets, tmp_path):
    out = tmp_path / "lat"
    assert extract(assets, out, "--shard-size", "4", "--mean") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "labels-00000.npy", "labels-00001.npy", "latents-00000.npy", "latents-00001.npy"]
    index = json.loads((out / "index.json").read_text())
    assert index["num_items"] == 6 and [s["count"] for s in index["shards"]] == [4, 2]
    assert index["latent_shape"] == [4, 8, 8] and index["image_size"] == SIZE and index["scale"] == SCALE
    assert index["class_names"] == ["cat", "dog"] and index["num_classes"] == 2 and index["dtype"] == "float32"
    assert index["vae"] == str((assets / "vae").resolve())

    ds = build_dataset(DataConfig(source="latents", path=str(out)))
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes, ds.is_latent) == (6, 4, 8, 2, True)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.pixel_size == SIZE
    assert isinstance(ds._open()[0], np.memmap)
    z, y = ds[5]
    assert z.dtype == torch.float32 and z.shape == (4, 8, 8) and y.dtype == torch.int64 and int(y) == 1

    # --mean is deterministic: the stored latents are the scaled posterior means of the cropped images.
    vae = load_vae(assets / "vae")
    files = sorted((assets / "img").rglob("*.png"))
    x = from_uint8_images(np.stack([load_image(f, SIZE, 3) for f in files]))
    direct = encode_images(vae, x, sample=False)
    stored = torch.stack([ds[i][0] for i in range(6)])
    torch.testing.assert_close(stored, direct, rtol=0, atol=1e-5)
    torch.testing.assert_close(direct / SCALE, vae.encode(x).latent_dist.mean, rtol=1e-5, atol=1e-5)
    rec = decode_latents(vae, stored)
    assert rec.shape == (6, 3, SIZE, SIZE) and rec.min() >= -1 and rec.max() <= 1
    torch.testing.assert_close(rec, vae.decode(direct / SCALE).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)

    # both sizes are accepted; anything else names them
    assert len(build_dataset(DataConfig(source="latents", path=str(out), image_size=8))) == 6
    assert len(build_dataset(DataConfig(source="latents", path=str(out), image_size=SIZE))) == 6
    with pytest.raises(DataError, match=r"8x8, extracted from 16px images, not image_size=32"):
        build_dataset(DataConfig(source="latents", path=str(out), image_size=32))
    sub = build_dataset(DataConfig(source="latents", path=str(out), num_samples=4, seed=3))
    assert isinstance(sub, SubsetDataset) and len(sub) == 4 and sub.is_latent and sub.image_size == 8
    assert all(torch.equal(sub[i][0], ds[int(j)][0]) and int(sub[i][1]) == ds.labels[j]
               for i, j in enumerate(sub.indices))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[4][0], ds[4][0])  # memmaps reopen after pickling
    mem = build_dataset(DataConfig(source="latents", path=str(out), in_memory=True))
    assert not isinstance(mem._open()[1], np.memmap) and torch.equal(mem[5][0], z)

    # an existing extraction is kept unless --overwrite, which also removes stale shards
    assert extract(assets, out, "--mean") == 2
    assert extract(assets, out, "--mean", "--overwrite", "--shard-size", "100") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "labels-00000.npy", "latents-00000.npy"]
    torch.testing.assert_close(torch.stack([t[0] for t in LatentsDataset(out)]), stored, rtol=0, atol=0)


def test_sampled_flip_float16(assets, tmp_path):
    args = ("--flip", "--dtype", "float16", "--shard-size", "5")
    assert extract(assets, tmp_path / "a", *args, "--seed", "7") == 0
    assert extract(assets, tmp_path / "b", *args, "--seed", "7") == 0
    assert extract(assets, tmp_path / "m", *args, "--mean") == 0
    a, b, m = (LatentsDataset(tmp_path / k) for k in "abm")
    assert len(a) == 12 and a.labels.tolist() == [0] * 6 + [1] * 6 and a.index["flip"]
    assert [s["count"] for s in a.index["shards"]] == [5, 5, 2] and a.index["posterior"] == "sample"
    assert np.load(tmp_path / "a" / "latents-00000.npy", mmap_mode="r").dtype == np.float16
    za, zb, zm = (torch.stack([d[i][0] for i in range(12)]) for d in (a, b, m))
    assert torch.equal(za, zb)  # same seed, same posterior draws

    # items 2i, 2i+1 are image i and its mirror
    vae = load_vae(assets / "vae")
    files = sorted((assets / "img").rglob("*.png"))
    x = from_uint8_images(np.stack([load_image(f, SIZE, 3) for f in files]))
    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
    post = vae.encode(x).latent_dist
    torch.testing.assert_close(zm, post.mean * SCALE, rtol=1e-3, atol=1e-3)  # float16 storage
    # the sampled latents are posterior draws: standardised residuals look like N(0, 1)
    r = (za - post.mean * SCALE) / (post.std * SCALE)
    assert 0.6 < r.abs().mean() < 1.0 and abs(r.mean()) < 0.1


def test_shards_are_atomic_and_unfinished_runs_are_refused(tmp_path, monkeypatch):
    z = torch.randn(5, 4, 2, 2)
    w = LatentShardWriter(tmp_path / "lat", shard_size=2)
    w.add(z[:3], torch.tensor([0, 1, 0]))  # one shard written, one item pending; never closed
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["labels-00000.npy", "latents-00000.npy"]
    with pytest.raises(DataError, match="no index.json.*interrupted"):
        LatentsDataset(tmp_path / "lat")
    with pytest.raises(DataError, match="unfinished extraction.*--overwrite"):
        LatentShardWriter(tmp_path / "lat")

    calls = []

    def dying_save(f, arr, *a, **k):  # write half a file, then crash
        calls.append(1)
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    w = LatentShardWriter(tmp_path / "crash", shard_size=2)
    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        w.add(z[:2], torch.tensor([0, 1]))
    monkeypatch.undo()
    assert calls and list((tmp_path / "crash").iterdir()) == []  # no half shard under any name

    w = LatentShardWriter(tmp_path / "ok", shard_size=2, dtype="float32", meta={"image_size": 4})
    w.add(z, torch.tensor([0, 1, 0, 2, 2]))
    index = w.close()
    assert [s["count"] for s in index["shards"]] == [2, 2, 1] and index["num_classes"] == 3
    ds = LatentsDataset(tmp_path / "ok")
    assert all(torch.equal(ds[i][0], z[i]) for i in range(5)) and torch.equal(ds[-1][0], z[4])
    with pytest.raises(IndexError):
        ds[5]


def test_errors_name_the_problem(assets, tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        load_vae(tmp_path / "missing")
    assert extract(assets, tmp_path / "o", "--vae", str(tmp_path / "missing")) == 2  # last --vae wins
    assert "VAE folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a saved AutoencoderKL"):
        load_vae(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(DataError, match="holds a UNet2DModel, not an AutoencoderKL"):
        load_vae(tmp_path / "unet")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((assets / "vae" / "config.json").read_text())
    with pytest.raises(DataError, match="cannot load the VAE"):
        load_vae(tmp_path / "noweights")
    assert extract(assets, tmp_path / "o", "--image-size", "15") == 2
    assert "not a multiple of the VAE's downsampling factor 2" in capsys.readouterr().err
    assert extract(assets, assets / "img" / "out") == 2
    assert "inside --data-path" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="latents directory not found"):
        build_dataset(DataConfig(source="latents", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="has no index.json"):
        build_dataset(DataConfig(source="latents", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="data.path must name"):
        build_dataset(DataConfig(source="latents"))

    w = LatentShardWriter(tmp_path / "lat", shard_size=3)
    w.add(torch.randn(5, 4, 2, 2), torch.zeros(5))
    w.close()
    np.save(tmp_path / "lat" / "labels-00001.npy", np.zeros(1, np.int64))
    with pytest.raises(DataError, match="shard count mismatch.*labels-00001.npy"):
        LatentsDataset(tmp_path / "lat")
    np.save(tmp_path / "lat" / "labels-00001.npy", np.zeros(2, np.int64))
    np.save(tmp_path / "lat" / "latents-00001.npy", np.zeros((3, 4, 2, 2), np.float32))
    with pytest.raises(DataError, match="shard count mismatch.*latents-00001.npy"):
        LatentsDataset(tmp_path / "lat")
    (tmp_path / "lat" / "latents-00001.npy").unlink()
    with pytest.raises(DataError, match="missing latents shard.*latents-00001.npy"):
        LatentsDataset(tmp_path / "lat")
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    (tmp_path / "lat" / "index.json").write_text(json.dumps({**index, "num_items": 9}))
    with pytest.raises(DataError, match="shard count mismatch: shards hold 5 items, num_items says 9"):
        LatentsDataset(tmp_path / "lat")

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(DataError, match="pip install diffusers"):
        load_vae(assets / "vae")
