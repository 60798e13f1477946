import numpy as np
import pytest
import torch

from dcdit.analysis import roc_auc, routing_vs_detail


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count half
    # 3 of the 4 (pos, neg) pairs ordered correctly
    assert roc_auc([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1]) == 0.75
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([0.1, 0.2], [1, 1])


def test_routing_vs_detail_scores_an_oracle_router():
    """A stand-in 'model' whose p is the true detail cell map must score AUC 1."""
    from dcdit.chunking import select_boundaries
    from dcdit.data import DataConfig, build_dataset
    from dcdit.diffusion import create_diffusion

    ds = build_dataset(DataConfig(source="shapes", num_samples=8, image_size=16))
    truth = torch.stack([ds.get_with_detail(i)[2] for i in range(8)]).float()
    cells = torch.nn.functional.max_pool2d(truth[:, None], 2)[:, 0].reshape(8, -1)

    class Oracle(torch.nn.Module):
        def forward(self, x, t, y):
            p = cells[: len(x)] * 0.5 + 0.25
            return x, [select_boundaries(p, torch.ones_like(p, dtype=torch.bool), grid=(8, 8))]

    rows = routing_vs_detail(Oracle(), create_diffusion(""), ds, timesteps=(10, 900), num_images=8, batch_size=8)
    assert [r["t"] for r in rows] == [10, 900]
    for r in rows:
        assert r["auc"] == pytest.approx(1.0)
        assert r["kept_share"] == pytest.approx(float(cells.mean()))
        assert 0 < r["detail_share"] < 1
        assert r["detail_kept"] == pytest.approx(1.0) and r["other_kept"] == pytest.approx(0.0)  # keeps = detail


def test_edge_detail_map_reproduces_the_shapes_ground_truth():
    """The generic rule (used for data without detail maps, e.g. MNIST) matches shapes' own map."""
    from dcdit.analysis.routing import edge_detail_map
    from dcdit.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(source="shapes", num_samples=16, image_size=32))
    agree = [(edge_detail_map(x) == d.bool()).float().mean().item()
             for x, _, d in (ds.get_with_detail(i) for i in range(16))]
    assert min(agree) > 0.99  # differences: uint8 rounding and the background gradient


def test_edge_detail_map_marks_a_square_outline_only():
    from dcdit.analysis.routing import edge_detail_map

    x = -torch.ones(1, 8, 8)
    x[:, 2:6, 2:6] = 1.0  # a white square on black
    d = edge_detail_map(x)
    assert d[2, 2] and d[1, 3] and d[5, 4]  # the square's border pixels and their outer neighbours
    assert not d[3, 3] and not d[0, 0]  # flat interior and background
    # 12 inner-border pixels + 16 outer 4-neighbours (the square's corners' diagonals are not neighbours)
    assert int(d.sum()) == 12 + 16 and not d[1, 1]


def test_what_tokens_buy_reads_the_loss_pull_toward_the_detail_cells():
    """A stand-in model whose loss falls only when p rises on detail cells: the pull is positive there,
    zero elsewhere (ROC-AUC 1), and dropping tokens (here: a known penalty per dropped fraction) has value."""
    from dcdit.analysis import what_tokens_buy
    from dcdit.chunking import select_boundaries
    from dcdit.data import DataConfig, build_dataset
    from dcdit.diffusion import create_diffusion

    ds = build_dataset(DataConfig(source="shapes", num_samples=8, image_size=16))
    x0 = torch.stack([ds.get_with_detail(i)[0] for i in range(8)])
    truth = torch.stack([ds.get_with_detail(i)[2] for i in range(8)]).float()
    cells = torch.nn.functional.max_pool2d(truth[:, None], 2)[:, 0]  # (8, 8, 8)

    class Oracle(torch.nn.Module):
        def forward(self, x, t, y, tail_drop=0.0):
            p = torch.full((len(x), 64), 0.4, requires_grad=True).clone()
            p[:, 0] = p[:, -1] = 1.0  # forced boundaries
            p_px = torch.nn.functional.interpolate(p.reshape(-1, 1, 8, 8), scale_factor=2)
            mask_px = torch.nn.functional.interpolate(cells[: len(x), None], scale_factor=2)
            out = x0[: len(x)] - mask_px * (1 - p_px) - 0.1 * tail_drop  # x0 prediction, off by (1 - p) on detail
            return out, [select_boundaries(p, torch.ones_like(p, dtype=torch.bool), tail_drop, grid=(8, 8))]

    diffusion = create_diffusion("", prediction="x0", learn_sigma=False)
    rows = what_tokens_buy(Oracle(), diffusion, ds, timesteps=(10, 900), fractions=(0.0, 0.5), num_images=8)
    assert [r["t"] for r in rows] == [10, 900]
    for r in rows:
        assert r["pull_auc"] == pytest.approx(1.0)
        assert r["pull"] > 0
        assert r["token_value"] == pytest.approx(r["mse"]["0.5"] - r["mse"]["0"]) and r["token_value"] > 0
