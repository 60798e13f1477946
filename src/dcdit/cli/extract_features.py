"""``dcdit extract-features``: encode an image folder into VAE latent shards.

The output directory is the ``latents`` data source (``DataConfig(source="latents",
path=OUT)``): ``latents-00000.npy`` (n, 4, size/8, size/8) already multiplied by
0.18215, ``labels-00000.npy`` and ``index.json``. Every file is renamed into place
once complete and the index is written last, so an interrupted run leaves no
half-written shard and no index (the reader refuses it; rerun with --overwrite).
Images are centre-cropped like DiT. The VAE is a diffusers ``AutoencoderKL``
saved in a local folder; nothing is downloaded.
"""
from __future__ import annotations

from dcdit.cli.options import add_device, add_seed

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "Encode an image folder (one sub-folder per class) into VAE latent shards for the 'latents' data source."


def add_arguments(p) -> None:
    p.add_argument("--data-path", required=True, metavar="FOLDER", help="image folder: one sub-folder of images per class")
    p.add_argument("--vae", required=True, metavar="DIR",
                   help="local folder of a saved diffusers AutoencoderKL (config.json + weights, or a vae/ sub-folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and index.json")
    p.add_argument("--image-size", type=int, default=256, help="centre-crop size in pixels (default: 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward (default: 32)")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file (default: 4096)")
    p.add_argument("--mean", action="store_true",
                   help="store the posterior mean (deterministic) instead of a posterior sample as DiT does")
    p.add_argument("--flip", action="store_true",
                   help="also store each image's horizontal mirror right after it (2x the items): "
                        "flip augmentation for latent training")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (listed in index.json)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype (default: float32; float16 halves the disk)")
    add_seed(p, "seed of the posterior samples")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="encode only the first N images")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes (default: 0)")
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier extraction in --out")


class _Images:
    """(uint8 HWC image or None, label, error message or None) per file; errors are reported by the caller."""

    def __init__(self, files, labels, image_size: int):
        self.files, self.labels, self.image_size = files, labels, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from dcdit.data.config import DataError
        from dcdit.data.folder import load_image

        try:
            return load_image(self.files[i], self.image_size, 3), int(self.labels[i]), i, None
        except DataError as e:
            return None, int(self.labels[i]), i, str(e)


def _collate(items):
    return items  # a list; decoding to tensors happens in the main process


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from dcdit.cli.options import resolve_device
    from dcdit.data.config import DataError
    from dcdit.data.folder import list_image_folder
    from dcdit.data.latents import LatentShardWriter, check_out_dir
    from dcdit.data.transforms import from_uint8_images
    from dcdit.data.vae import SCALE, encode_images, load_vae, vae_downsample_factor

    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    data, out = Path(args.data_path).resolve(), Path(args.out).resolve()
    if out == data or data in out.parents:
        raise ValueError(f"--out {args.out} lies inside --data-path {args.data_path}: it would become a class folder")
    files, labels, class_names = list_image_folder(data)
    if args.limit is not None:
        files, labels = files[:args.limit], labels[:args.limit]
    check_out_dir(out, args.overwrite)  # fail before the slow VAE load
    device = resolve_device(args.device)
    vae = load_vae(args.vae, device=device)
    f = vae_downsample_factor(vae)
    if args.image_size % f:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor {f}")

    writer = LatentShardWriter(out, args.shard_size, args.dtype, overwrite=args.overwrite, meta={
        "image_size": args.image_size, "scale": SCALE, "class_names": class_names, "num_classes": len(class_names),
        "vae": str(Path(args.vae).resolve()), "source": str(data), "posterior": "mean" if args.mean else "sample",
        "seed": args.seed, "flip": bool(args.flip),
    })
    loader = DataLoader(_Images(files, labels, args.image_size), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=_collate)
    gen = torch.Generator().manual_seed(args.seed)  # CPU generator: same draws on any device
    skipped: list[str] = []
    t0 = time.time()
    with tqdm(total=len(files), unit="img", desc="encoding", disable=None) as bar:
        for batch in loader:
            good = []
            for img, y, i, err in batch:
                if err is None:
                    good.append((img, y))
                elif args.skip_corrupt:
                    skipped.append(str(Path(files[i]).relative_to(data)))
                else:
                    raise DataError(f"{err} (pass --skip-corrupt to skip unreadable images)")
            bar.update(len(batch))
            if not good:
                continue
            x = from_uint8_images(np.stack([g[0] for g in good]))
            y = torch.tensor([g[1] for g in good], dtype=torch.int64)
            if args.flip:  # original and mirror interleaved: items 2i, 2i+1 come from image i
                x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
                y = y.repeat_interleave(2)
            writer.add(encode_images(vae, x, sample=not args.mean, generator=gen), y)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) of {len(files)} (listed in index.json)", file=sys.stderr)
    if writer.num_items == 0:
        raise DataError(f"{args.data_path}: no readable images")
    index = writer.close(extra={"num_source_images": len(files) - len(skipped), "skipped": skipped})
    c, h, _ = index["latent_shape"]
    print(f"wrote {index['num_items']} latents ({c}x{h}x{h} {args.dtype}) from {args.image_size}px images in "
          f"{len(index['shards'])} shard(s) to {out}; {index['num_classes']} classes; {time.time() - t0:.1f}s")
    return 0
