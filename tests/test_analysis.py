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
