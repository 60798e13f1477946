import pytest
import torch

from dcdit.flops import count_model_flops, dit_macs
from dcdit.models import DiT, build_dit


def test_counter_matches_analytic_count_for_small_dit():
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    model = DiT(**cfg).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    for attention in (True, False):
        report, out = count_model_flops(model, x, t, y, attention=attention)
        assert out.shape == (3, 8, 8, 8)
        assert report.macs == 3 * dit_macs(**cfg, attention=attention)
        assert sum(report.by_component.values()) == report.total
    report, _ = count_model_flops(model, x, t, y)
    T, D = 16, 32
    assert report.by_component["main network"] == 3 * 2 * (D * 6 * D + T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D) * 2


@pytest.mark.parametrize(
    "name, no_attn, paper",
    [("DiT-S/2", 5.45, 6.06), ("DiT-B/2", 21.8, 23.0), ("DiT-XL/2", 114.4, 118.6)],
)
def test_gmacs_at_256px(name, no_attn, paper):
    with torch.device("meta"):
        model = build_dit(name, input_size=32)
    assert dit_macs(**model.config, attention=False) / 1e9 == pytest.approx(no_attn, rel=0.01)
    assert dit_macs(**model.config) / 1e9 == pytest.approx(paper, rel=0.01)


def test_counter_on_real_dit_s2():
    model = build_dit("DiT-S/2", input_size=32).eval()
    x, t, y = torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.tensor([3])
    report, _ = count_model_flops(model, x, t, y, attention=False)
    assert report.gmacs_per_image == pytest.approx(5.45, rel=0.01)
    report, _ = count_model_flops(model, x, t, y)
    assert report.gmacs_per_image == pytest.approx(6.06, rel=0.01)


def test_nominal_dcdit_report_splits_scaffold_and_main_network():
    from dcdit.flops import dit_block_macs, nominal_dcdit_report

    r4 = nominal_dcdit_report("DC-DiT-S-N4", input_size=16, num_classes=10)
    r16 = nominal_dcdit_report("DC-DiT-S-N16", input_size=16, num_classes=10)
    assert (r4["L"], r4["kept"], r16["kept"]) == (256, 64, 16)
    assert r4["main_macs"] == 12 * dit_block_macs(64, 384)
    assert r4["macs"] == r4["scaffold_macs"] + r4["main_macs"]
    assert r4["scaffold_macs"] == r16["scaffold_macs"] > 0  # N only changes the kept count
    assert {"encoder", "decoder", "routing", "embeddings", "final layer"} <= set(r4["by_component"])
