"""Score a DC-DiT router against ground truth.

The built-in ``shapes`` data set knows where its detail is (edges and texture,
``ShapesDataset.get_with_detail``). Noising an image to timestep t and reading
the router's boundary probability p on the token grid gives two questions:

* segmentation: does p rank detail tokens above flat ones? (ROC-AUC of p
  against "the token's cell holds detail pixels"; 0.5 = chance, 1 = perfect);
* timestep adaptivity: what share of tokens does the router keep at each t?
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from dcdit.data.shapes import DETAIL_THRESHOLD


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) identity, ties averaged."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both positive and negative items")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def edge_detail_map(x: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
    """(H, W) bool: pixels whose largest change to a 4-neighbour (over channels) exceeds ``threshold``.

    x: (C, H, W) in model space [-1, 1]; changes are measured in [0, 1] units.
    The same rule the shapes data set applies to its clean pictures
    (``dcdit.data.shapes.DETAIL_THRESHOLD``): on data without a background
    gradient, such as MNIST, it marks the strokes' outlines.
    """
    thr = DETAIL_THRESHOLD if threshold is None else threshold
    img = (x.float() + 1) / 2  # (C, H, W) in [0, 1]
    pad = torch.nn.functional.pad(img[None], (1, 1, 1, 1), mode="replicate")[0]
    H, W = img.shape[-2:]
    change = torch.zeros(H, W)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        change = torch.maximum(change, (pad[:, dy:dy + H, dx:dx + W] - img).abs().amax(0))
    return change > thr


@torch.no_grad()
def routing_vs_detail(
    model: torch.nn.Module,
    diffusion,
    dataset,
    timesteps: Sequence[int] = (50, 250, 500, 750, 950),
    num_images: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Per timestep: ROC-AUC of the first stage's p against detail cells, and kept shares.

    Besides the AUC of p (a ranking over all tokens, most of which sit below the boundary threshold),
    ``detail_kept`` / ``other_kept`` are the shares of detail and of other cells that the router
    actually keeps: what the main network sees.

    ``dataset`` provides ``get_with_detail(i) -> (x, y, detail (H, W))`` (shapes), or
    else its images' own :func:`edge_detail_map` is the ground truth.
    The router's grid may be coarser than the image (patch size p): a token is
    "detail" when its p x p cell contains any detail pixel. Forced tokens (the
    first and last, p = 1 by construction) are left out of the AUC.
    """
    n = min(num_images, len(dataset))
    if hasattr(dataset, "get_with_detail"):
        items = [dataset.get_with_detail(i) for i in range(n)]
    else:  # data without a background gradient (MNIST): the shapes rule applied to the image itself
        items = [(x, y, edge_detail_map(x)) for x, y in (dataset[i] for i in range(n))]
    x0 = torch.stack([it[0] for it in items])
    y = torch.stack([it[1] for it in items]).long()
    detail = torch.stack([it[2] for it in items]).float()  # (n, H, W)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    results = []
    for t_val in timesteps:
        probs, keeps, naturals, masks = [], [], [], []
        for s in range(0, len(x0), batch_size):
            xb, nb, yb = x0[s:s + batch_size], noise[s:s + batch_size], y[s:s + batch_size]
            t = torch.full((len(xb),), int(t_val), dtype=torch.long)
            _, routing = model(diffusion.q_sample(xb, t, noise=nb), t, yb)
            stage = routing[0]
            probs.append(stage.boundary_prob.float())
            masks.append(stage.keep_mask)
            keeps.append(stage.kept_share())
            naturals.append(stage.kept_share(natural=True))
        p, kept = torch.cat(probs), torch.cat(masks)  # (n, L) each
        gh, gw = routing[0].grid
        H, W = detail.shape[-2:]
        cell = torch.nn.functional.adaptive_max_pool2d(detail[:, None], (gh, gw))[:, 0].reshape(len(p), -1) > 0
        inner = torch.ones(p.shape[1], dtype=torch.bool)
        inner[0] = inner[-1] = False  # forced boundaries say nothing about the router
        results.append(dict(
            t=int(t_val),
            auc=roc_auc(p[:, inner].numpy(), cell[:, inner].numpy()),
            kept_share=float(torch.cat(keeps).mean()),
            natural_share=float(torch.cat(naturals).mean()),
            detail_share=float(cell.float().mean()),
            detail_kept=float(kept[:, inner][cell[:, inner]].float().mean()),
            other_kept=float(kept[:, inner][~cell[:, inner]].float().mean()),
        ))
    return results


def what_tokens_buy(
    model: torch.nn.Module,
    diffusion,
    dataset,
    timesteps: Sequence[int] = (25, 100, 250, 500, 750, 950),
    fractions: Sequence[float] = (0.0, 0.5),
    num_images: int = 128,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """Per timestep: what the main network's tokens are worth to the training loss, and how strongly
    that timestep trains the router.

    ``diffusion`` is the training diffusion (its prediction type and Min-SNR weight: with Min-SNR the
    epsilon and v losses are the same function of the predicted x_0, ``min(SNR, gamma) |x0_hat - x0|^2``,
    so the numbers compare across objectives). Held-out images are noised to t (one fixed noise draw)
    and the weighted MSE is measured at each tail-drop fraction in ``fractions``.

    Rows: ``t``; ``mse`` and ``kept_share`` per fraction; ``token_value`` = MSE at the largest fraction
    minus MSE at the smallest (what the dropped tokens were worth at t: the discrete value of the
    tokens); ``pull`` = mean over tokens of ``-dL/dp`` at the smallest fraction, the router's training
    signal from the diffusion loss at t (before the ratio loss). Its magnitude says how much timestep
    t trains the router; its sign is not a token count, since p acts through the STE and the dechunk
    weights, not through the discrete mask. ``pull_auc`` = ROC-AUC of ``-dL/dp`` against the detail
    cells.
    """
    n = min(num_images, len(dataset))
    if hasattr(dataset, "get_with_detail"):
        items = [dataset.get_with_detail(i) for i in range(n)]
    else:
        items = [(x, y, edge_detail_map(x)) for x, y in (dataset[i] for i in range(n))]
    x0 = torch.stack([it[0] for it in items])
    y = torch.stack([torch.as_tensor(it[1]) for it in items]).long()
    detail = torch.stack([torch.as_tensor(it[2]) for it in items]).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    lo, hi = min(fractions), max(fractions)
    rows = []
    for t_val in timesteps:
        row: dict = {"t": int(t_val), "mse": {}, "kept_share": {}}
        pulls, probs_grid = [], None
        for f in sorted(set(fractions)):
            total, kept = 0.0, []
            for s in range(0, n, batch_size):
                xb, nb, yb = x0[s:s + batch_size], noise[s:s + batch_size], y[s:s + batch_size]
                t = torch.full((len(xb),), int(t_val), dtype=torch.long)
                with torch.enable_grad():
                    terms = diffusion.training_losses(model, xb, t, model_kwargs={"y": yb, "tail_drop": f}, noise=nb)
                    mse = terms["mse"] * diffusion.mse_weight(t) if diffusion.min_snr_gamma is not None else terms["mse"]
                    stage = terms["extras"][0]
                    if f == lo:
                        p = stage.boundary_prob
                        p.retain_grad()
                        mse.sum().backward()
                        pulls.append(-p.grad.detach().float())
                        probs_grid = stage.grid
                total += float(mse.detach().sum())
                kept.append(stage.kept_share().detach())
            row["mse"][f"{f:g}"] = total / n
            row["kept_share"][f"{f:g}"] = float(torch.cat(kept).mean())
        model.zero_grad(set_to_none=True)
        pull = torch.cat(pulls)  # (n, L)
        gh, gw = probs_grid
        cell = torch.nn.functional.adaptive_max_pool2d(detail[:, None], (gh, gw))[:, 0].reshape(n, -1) > 0
        inner = torch.ones(pull.shape[1], dtype=torch.bool)
        inner[0] = inner[-1] = False
        row["token_value"] = row["mse"][f"{hi:g}"] - row["mse"][f"{lo:g}"]
        row["pull"] = float(pull[:, inner].mean())
        row["pull_auc"] = roc_auc(pull[:, inner].numpy(), cell[:, inner].numpy())
        rows.append(row)
    return rows
