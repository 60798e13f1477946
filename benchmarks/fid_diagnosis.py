"""Why a class-correct MNIST model still has a high Inception FID: three probes.

    # per-timestep error of the epsilon prediction on MNIST test images (no sampling)
    python benchmarks/fid_diagnosis.py eps pretrained:mnist-dit4 runs/lc2/dit4_snr20/run
    # FID of the same samples with faint pixels (< thr / 255) set to 0: how much is background speckle
    python benchmarks/fid_diagnosis.py speckle pretrained:mnist-dit4 --n 500
    # FID and speckle statistics per sampler (sampler:steps:cfg)
    python benchmarks/fid_diagnosis.py samplers pretrained:mnist-dit4 --n 500 --variants ddim:25:3 ddim:100:3 ddpm:250:3

Samples are class-balanced, bf16 autocast, clipped x0, seed 1234 (as in
``learning_curve.py``); FID is Inception (fid-helper) against the cached 2000
MNIST test images of the learning-curve benchmark; class accuracy by its
independent classifier. Results are printed as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dcdit.evaluation import load_classifier
from learning_curve import generate, mnist_scorer, score
from reproduction import dataset_uint8, mnist

TIMESTEPS = (0, 10, 40, 100, 300, 600, 900)


def load(spec: str):
    from dcdit.checkpoint import load_model

    return load_model(spec, which="ema").eval()


def speckle_stats(imgs: np.ndarray) -> dict:
    """Share of exactly-black pixels and the mean of the dark ones (uint8); MNIST test: 0.86 and 2.7."""
    return {"frac_black": float((imgs == 0).mean()), "dark_mean": float(imgs[imgs < 128].mean())}


def eps_error(specs: list[str], n: int) -> None:
    from dcdit.diffusion import create_diffusion
    from dcdit.sampling import model_info

    imgs, labels = dataset_uint8(mnist("test"), n)
    x0 = torch.as_tensor(imgs).float().permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 1, 32, 32) in [-1, 1]
    y = torch.as_tensor(labels).long()
    for spec in specs:
        model, row = load(spec), {"model": spec}
        # Read the output as the model predicts it (epsilon, x0 or v), then compare in epsilon.
        diffusion = create_diffusion("", prediction=model_info(model)["prediction"])
        for t in TIMESTEPS:
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            tt = torch.full((n,), t)
            x_t = diffusion.q_sample(x0, tt, noise=eps)
            with torch.no_grad():
                x0_hat = diffusion.p_mean_variance(lambda x, t_: model(x, t_, y), x_t, tt,
                                                   clip_denoised=False)["pred_xstart"]
            eps_hat = diffusion.predict_eps_from_xstart(x_t, tt, x0_hat)
            row[f"t{t}"] = round(float(((eps_hat - eps) ** 2).mean()), 4)
        print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=("eps", "speckle", "samplers"))
    ap.add_argument("models", nargs="+", help="checkpoints (run dirs or pretrained:NAME)")
    ap.add_argument("--n", type=int, default=500, help="samples (or test images for eps)")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--thresholds", type=int, nargs="+", default=[0, 16, 32, 64])
    ap.add_argument("--variants", nargs="+", default=["ddim:25:3", "ddim:100:3", "ddpm:250:3", "ddim:25:1"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classifier", default="runs/mnist-classifier")
    ap.add_argument("--cache", default="runs/lc-cache")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.probe == "eps":
        eps_error(a.models, a.n)
        return 0
    scorer, classifier = mnist_scorer(Path(a.cache), 2000), load_classifier(Path(a.classifier))
    for spec in a.models:
        model = load(spec)
        if a.probe == "speckle":
            got = generate(model, a.n, a.cfg, 25)
            imgs, labels = got.images, got.labels
            for thr in a.thresholds:
                x = imgs.copy()
                x[x < thr] = 0
                print(json.dumps({"model": spec, "threshold": thr, **score(scorer, classifier, x, labels, fid=True),
                                  **speckle_stats(x)}), flush=True)
        else:
            from dcdit.data.transforms import to_uint8_images
            from dcdit.sampling import sample, sampling_diffusion_for

            labels = np.arange(a.n) % 10
            for v in a.variants:
                sampler, steps, cfg = v.split(":")
                t0 = time.time()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    x, _ = sample(model, sampling_diffusion_for(model, sampler, int(steps)), labels, seed=1234,
                                  sampler=sampler, cfg_scale=float(cfg), measure_flops=False, clip_denoised=True)
                imgs = to_uint8_images(x.float())
                print(json.dumps({"model": spec, "variant": v, "sample_s": round(time.time() - t0, 1),
                                  **score(scorer, classifier, imgs, labels, fid=True), **speckle_stats(imgs)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
