"""`dcdit info`: the model registry with parameter counts and compute."""
from __future__ import annotations

# dcdit's torch-heavy modules are imported inside the functions: `dcdit --help` imports every subcommand's
# module (dcdit.cli), so they wait until a command runs. dcdit.cli.options imports argparse only.

HELP = "List the model registry (DiT and DC-DiT presets) and the shipped pretrained checkpoints."


def add_arguments(parser) -> None:
    parser.add_argument("--image-size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--filter", default="", help="only names containing this string")


def run(args) -> int:
    import torch

    from dcdit import __version__
    from dcdit.flops import dit_macs
    from dcdit.models import DIT_CONFIGS, build_dit

    if args.image_size < 8 or args.image_size % 8:
        raise ValueError(f"--image-size must be a positive multiple of 8 (the SD-VAE downsamples by 8), "
                         f"got {args.image_size}")
    latent = args.image_size // 8
    meta = torch.device("meta")  # parameter counts without allocating weights
    print(f"dcdit {__version__} | torch {torch.__version__} | input {args.image_size}px = {latent}x{latent}x4 latent")
    print("GMACs per forward of one image (FLOPs = 2 x MACs). 'GMACs' counts linear layers, convolutions and")
    print("attention (the DiT paper's convention); 'no-attn' leaves attention out (PyTorch's FlopCounterMode on CPU).")
    print(f"{'model':<16} {'params (M)':>11} {'tokens':>8} {'GMACs':>9} {'no-attn':>9}")
    skipped = []
    for name in DIT_CONFIGS:
        if args.filter not in name:
            continue
        patch = DIT_CONFIGS[name]["patch_size"]
        if latent % patch:
            skipped.append(name)
            continue
        with meta:
            model = build_dit(name, input_size=latent).eval()
        n_params = sum(p.numel() for p in model.parameters())
        # Analytic count, equal to FlopCounterMode on a real forward (tests/test_flops.py).
        gmacs, no_attn = dit_macs(**model.config) / 1e9, dit_macs(**model.config, attention=False) / 1e9
        print(f"{name:<16} {n_params / 1e6:>11.1f} {model.x_embedder.num_patches:>8d} {gmacs:>9.2f} {no_attn:>9.2f}")
    if skipped:
        print(f"(not shown: {', '.join(skipped)}: the patch size does not divide the {latent}x{latent} latent)")
    from dcdit.flops import nominal_dcdit_report
    from dcdit.models import DCDIT_PRESETS

    print()
    print("DC-DiT presets (patch-1 stem, L = %d tokens; DC-DiT-MNIST-N4: patch 2, L = %d): main network counted"
          % (latent**2, (latent // 2) ** 2))
    print("at the nominal K = L/N kept tokens, scaffold (stem, encoder, router, dechunk, decoder, final layer) on a")
    print("real forward.")
    print(f"{'model':<16} {'params (M)':>11} {'kept':>8} {'GMACs':>9} {'scaffold':>9}")
    skipped = []
    for name in DCDIT_PRESETS:
        if args.filter not in name:
            continue
        if latent % DCDIT_PRESETS[name].get("patch_size", 1):
            skipped.append(name)
            continue
        r = nominal_dcdit_report(name, input_size=latent)
        print(f"{name:<16} {r['params'] / 1e6:>11.1f} {r['kept']:>8d} {r['macs'] / 1e9:>9.2f} {r['scaffold_macs'] / 1e9:>9.2f}")
    if skipped:
        print(f"(DC-DiT presets not shown: {', '.join(skipped)}: the patch size does not divide the "
              f"{latent}x{latent} latent)")
    print_pretrained(args.filter)
    return 0


def print_pretrained(filter_: str = "") -> None:
    """The checkpoints shipped with the package (use as --ckpt pretrained:NAME)."""
    from dcdit.pretrained import list_pretrained

    shipped = {k: v for k, v in list_pretrained().items() if filter_ in k}
    print()
    print("Pretrained checkpoints shipped with dcdit (--ckpt pretrained:NAME; EMA weights; scores measured on")
    print("samples of DDIM-25, class accuracy by an independent classifier, FID with InceptionV3 against MNIST test):")
    if not shipped:
        print("  (none)")
    for name, e in shipped.items():
        scores = ", ".join(f"{k} {v}" for k, v in e.get("scores", {}).items())
        print(f"  pretrained:{name:<14} {e.get('description', '')}")
        print(f"  {'':<25} trained: {e.get('trained', '?')}")
        if scores:
            print(f"  {'':<25} scores: {scores}")
