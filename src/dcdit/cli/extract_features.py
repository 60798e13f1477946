"""`dcdit extract-features`: encode an image folder into VAE latent shards.

The output directory is the ``latents`` data source (``DataConfig(source="latents",
path=OUT_DIR)``): ``latents_XXXXX.npy`` (n, 4, size/8, size/8) already scaled
by 0.18215, ``labels_XXXXX.npy`` and an ``index.json`` written last.
The VAE is a diffusers ``AutoencoderKL`` saved in a local folder; nothing is downloaded.
"""
from __future__ import annotations

HELP = "Encode an image folder (one sub-folder per class) into VAE latent shards for the 'latents' data source."


def add_arguments(parser) -> None:
    parser.add_argument("--data-path", required=True, help="image folder: one sub-folder of images per class")
    parser.add_argument("--vae", required=True, help="local folder of a saved diffusers AutoencoderKL (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory for the shards and index.json")
    parser.add_argument("--image-size", type=int, default=256, help="centre-crop size in pixels (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VAE forward (default 16)")
    parser.add_argument("--shard-size", type=int, default=4096, help="latents per shard file (default 4096)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype (default float16)")
    parser.add_argument("--mean", action="store_true", help="store the posterior mean instead of a posterior sample")
    parser.add_argument("--random-flip", action="store_true", help="flip each image horizontally with probability 1/2 first")
    parser.add_argument("--seed", type=int, default=0, help="seed for posterior sampling and flips (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N images")
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of failing")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace latents already in --out")


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    import torch

    from dcdit.data.folder import ImageFolderDataset
    from dcdit.data.latents import INDEX_NAME, LatentShardWriter
    from dcdit.data.vae import LATENT_SCALE, encode_images, load_vae, vae_downsample_factor

    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    ds = ImageFolderDataset(args.data_path, image_size=args.image_size, channels=3,
                            skip_corrupt=args.skip_corrupt, in_memory=False)
    if (Path(args.out) / INDEX_NAME).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already holds extracted latents; choose another --out or pass --overwrite")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(args.vae, device=device)
    f = vae_downsample_factor(vae)
    if args.image_size % f:
        raise ValueError(f"--image-size {args.image_size} is not divisible by the VAE's stride {f}")
    n = len(ds) if args.limit is None else min(len(ds), max(0, args.limit))
    writer = LatentShardWriter(args.out, args.shard_size, args.dtype, overwrite=args.overwrite, meta={
        "image_size": args.image_size, "scale": LATENT_SCALE, "sample_posterior": not args.mean,
        "random_flip": bool(args.random_flip), "class_names": ds.class_names, "num_classes": len(ds.class_names),
        "source": str(args.data_path), "vae": str(args.vae),
    })
    gen = torch.Generator(device=device).manual_seed(args.seed)
    flip_gen = torch.Generator().manual_seed(args.seed + 1)
    t0, done = time.time(), 0
    for start in range(0, n, args.batch_size):
        items = [ds[i] for i in range(start, min(start + args.batch_size, n))]
        x = torch.stack([it[0] for it in items])
        y = torch.stack([it[1] for it in items])
        if args.random_flip:
            flip = torch.rand(len(x), generator=flip_gen) < 0.5
            x[flip] = x[flip].flip(-1)
        writer.add(encode_images(vae, x, sample=not args.mean, generator=gen), y)
        done += len(x)
        if done == n or (start // args.batch_size) % 50 == 0:
            print(f"encoded {done}/{n} images ({done / max(time.time() - t0, 1e-9):.1f} img/s)", file=sys.stderr)
    index = writer.close()
    c, h = index["latent_channels"], index["latent_size"]
    print(f"wrote {index['num_samples']} latents ({c}x{h}x{h}, {args.dtype}) in {len(index['shards'])} shard(s) "
          f"to {args.out}; {index['num_classes']} classes")
    return 0
