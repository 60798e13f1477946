"""The reproduction's scoring protocol over the library: class-balanced DDIM samples -> FID, class accuracy,
GFLOPs and kept shares (``dcdit.sampling.generate_local``, ``dcdit.evaluation.ReferenceScorer``)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dcdit.evaluation import ReferenceScorer, build_extractor, classifier_accuracy, load_classifier
from dcdit.sampling import generate_local, resolve_precision, sample, sampling_diffusion_for
from dcdit.viz.plots import plot_class_grid

from .runs import dataset, dataset_uint8
from .settings import SAMPLE_PRECISION, Settings


class Ctx:
    """One reproduction directory: its settings, its in-domain classifier and a scorer per feature kind.

    ``kind`` is ``"inception"`` (FID proper) or ``"classifier"`` (the classifier's features: --smoke).
    The reference is the first ``s.n_ref`` test images of the run's data.
    """

    def __init__(self, out: Path, s: Settings, smoke: bool):
        self.out, self.s, self.smoke = out, s, smoke
        self._scorers: dict[str, ReferenceScorer] = {}
        self._clf = None

    @property
    def clf_dir(self) -> Path:
        return self.out / "classifier"

    def classifier(self):
        if self._clf is None:
            self._clf = load_classifier(self.clf_dir)
        return self._clf

    def scorer(self, kind: str | None = None) -> ReferenceScorer:
        kind = kind or self.s.extractor
        if kind not in self._scorers:
            spec = "inception" if kind == "inception" else f"classifier:{self.clf_dir}"
            extractor = build_extractor(spec, batch_size=50 if spec == "inception" else 256)
            images, labels = dataset_uint8(dataset(self.s, "test"), self.s.n_ref)
            cache = self.out / "stats_cache" if self.smoke else None  # None: the default statistics cache
            self._scorers[kind] = ReferenceScorer.from_images(extractor, images, labels, f"{self.s.source}-test",
                                                              cache_dir=cache)
        return self._scorers[kind]


def score(ctx: Ctx, model, n: int, seed: int, tail_drop: float, tag: str, grid: bool = False,
          kind: str | None = None) -> dict:
    """``n`` class-balanced DDIM samples of ``model`` scored: FID (also of the first 250 / 500 / 1000 /
    ``n_small``), class accuracy, GFLOPs per image (counted on the first ``flop_images``) and kept shares."""
    s = ctx.s
    kind = kind or s.extractor
    got = generate_local(model, sampling_diffusion_for(model, "ddim", s.ddim_steps), n, batch_size=s.sample_batch,
                         seed=seed, flop_images=s.flop_images or None, tail_drop=tail_drop, clip_denoised=True,
                         precision=SAMPLE_PRECISION)
    imgs, labels, st = got.images, got.labels, got.stats
    fid, fid_at = ctx.scorer(kind).fid(imgs, labels, tag, first={250, 500, 1000, s.n_small})
    res = {"n": int(n), "tail_drop": tail_drop, "features": kind, "fid": fid,
           "class_acc": classifier_accuracy(ctx.classifier(), imgs, labels),
           "gflops_per_image": st.gflops_per_image, "ddim_steps": s.ddim_steps,
           "gflops_by_component": {k: v / 1e9 for k, v in st.flops_by_component.items()},
           "sampling_seconds": round(got.seconds, 1), **st.kept_summary()}
    # FID of the first k samples too, so points scored with fewer samples can be compared at equal n
    res["fid_at"] = {str(k): v for k, v in fid_at.items()}
    if n > s.n_small:
        res["fid_small"] = res["fid_at"][str(s.n_small)]
    if grid:
        plot_class_grid(imgs[:200], labels[:200], ctx.out / f"samples_{tag}.png", per_class=10,
                        title=f"{tag}: DDIM {s.ddim_steps} steps")
    if st.kept_share is not None:
        res["timesteps"] = [int(t) for t in st.timesteps]  # the DDIM steps that kept_share_by_t follows
        np.savez(ctx.out / f"cost_{tag}.npz", timesteps=np.asarray(st.timesteps), kept_share=st.kept_share,
                 flops=st.flops_per_step if st.flops_per_step is not None else np.zeros(0))
    return res


def sampling_speed(models: dict, s: Settings, seed: int) -> dict:
    """Sampling images/s of every model in this one process: DDIM ``s.ddim_steps``, batch ``s.speed_batch``,
    three rounds over the models (forward, backward, forward order), the median round per model."""
    diffusions = {n: sampling_diffusion_for(m, "ddim", s.ddim_steps) for n, m in models.items()}
    names = list(models)
    labels = np.arange(s.speed_batch) % 10
    times: dict[str, list] = {n: [] for n in names}
    for rnd in range(3):
        for n in (names if rnd % 2 == 0 else names[::-1]):
            t0 = time.time()
            sample(models[n], diffusions[n], labels, seed=seed, measure_flops=False, clip_denoised=True,
                   precision=SAMPLE_PRECISION)
            times[n].append(time.time() - t0)
    return {"batch": s.speed_batch, "ddim_steps": s.ddim_steps, "precision": resolve_precision(SAMPLE_PRECISION),
            "threads": torch.get_num_threads(), "round_seconds": times,
            "images_per_sec": {n: s.speed_batch / float(np.median(t)) for n, t in times.items()}}
