"""Plots: panel counts, inputs checked, and `dcdit visualize` on a small DC-DiT checkpoint."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.checkpoint import save_model_dir
from dcdit.cli import main
from dcdit.sampling import create_sampling_diffusion, sample
from dcdit.viz import (
    RoutingRecord,
    RoutingRecorder,
    choose_steps,
    image_grid,
    plot_boundary_maps,
    plot_class_grid,
    plot_cost_over_time,
    plot_quality_vs_compute,
    upsample_map,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_sampling import tiny_dcdit  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def record():
    """Routing of 3 samples over 5 DDIM steps of a tiny DC-DiT, recorded by the callback."""
    m = tiny_dcdit()
    d = create_sampling_diffusion("ddim", 5)
    recs = []
    for k in range(3):
        rec = RoutingRecorder()
        sample(m, d, [k], indices=[k], callback=rec)
        recs.append(rec.record)
    return RoutingRecord.concat(recs)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_shapes(record):
    assert record["x_t"].shape == (5, 3, 3, 8, 8) and record["pred_xstart"].shape == (5, 3, 3, 8, 8)
    assert record["boundary_prob"].shape == (5, 3, 8, 8) and record["keep_mask"].dtype == bool
    assert record["flops"].shape == (5, 3) and (record["flops"] > 0).all()
    assert record["timesteps"].tolist() == [800, 600, 400, 200, 0]


def test_boundary_maps_panels(record, tmp_path):
    plot = plot_boundary_maps(record, tmp_path / "maps.png", samples=[0, 2], steps=[0, 2, 4])
    assert plot.panels == 2 * 4 * 3  # samples x (x_t, x0, p, kept) x steps; the colorbar is not counted
    assert is_png(plot.path)
    with pytest.raises(ValueError, match="steps must lie"):
        plot_boundary_maps(record, tmp_path / "bad.png", steps=[9])
    with pytest.raises(ValueError, match="need routing"):
        plot_boundary_maps({**record, "boundary_prob": None}, tmp_path / "bad.png")


def test_cost_over_time_panels(record, tmp_path):
    kept = record["keep_mask"].reshape(5, 3, -1).mean(-1)  # (steps, n)
    two = plot_cost_over_time(record["timesteps"], tmp_path / "cost.png", kept_share=kept, flops=record["flops"])
    one = plot_cost_over_time(record["timesteps"], tmp_path / "flops.png", flops=record["flops"])
    assert (two.panels, one.panels) == (2, 1) and is_png(two.path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_cost_over_time([1, 0], tmp_path / "x.png")


def test_quality_vs_compute(tmp_path):
    records = [{"model": "DC-DiT-B-N4", "tail_drop": f, "gflops": g, "fid": fid}
               for f, g, fid in ((0.0, 46.0, 35.1), (0.2, 40.0, 36.0), (0.4, 33.0, 38.5))]
    records.append({"model": "DiT-B/2", "gflops": 46.0, "fid": 43.5})
    plot = plot_quality_vs_compute(records, tmp_path / "elastic.png")
    assert plot.panels == 1 and is_png(plot.path)
    with pytest.raises(ValueError, match="lacks fid"):
        plot_quality_vs_compute([{"model": "x", "gflops": 1.0}], tmp_path / "bad.png")


def test_class_grid_and_plain_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    plot = plot_class_grid(images, labels, tmp_path / "classes.png", per_class=3,
                           class_names={0: "disc", 1: "square", 2: "ring"})
    assert plot.panels == 7  # 3 rows x 3 columns, two cells empty
    gray = plot_class_grid(images[..., :1], labels, tmp_path / "gray.png", per_class=2)
    assert gray.panels == 6
    grid = image_grid(images, ncols=4, pad=1)
    assert grid.shape == (2 * 9 + 1, 4 * 9 + 1, 3)
    assert (grid[1:9, 1:9] == images[0]).all()


def test_map_helpers():
    m = np.arange(4).reshape(2, 2)
    up = upsample_map(m, (4, 6))
    assert up.shape == (4, 6) and up[0, 0] == 0 and up[0, 5] == 1 and up[3, 0] == 2 and up[3, 5] == 3
    assert choose_steps(10, 4) == [0, 3, 6, 9] and choose_steps(2, 6) == [0, 1]


def test_visualize_cli_writes_pngs(tmp_path, capsys):
    ck = save_model_dir(tmp_path / "tiny", tiny_dcdit())
    out = tmp_path / "viz"
    assert main(["visualize", "--ckpt", str(ck), "--out", str(out), "--steps", "4", "--classes", "0,3",
                 "--per-class", "2", "--rows", "2", "--columns", "3"]) == 0
    text = capsys.readouterr().out
    for name, panels in (("boundary_maps", 2 * 4 * 3), ("cost_vs_timestep", 2), ("class_grid", 4)):
        path = out / f"{name}.png"
        assert is_png(path) and f"{name}.png ({panels} panels)" in text
        assert min(Image.open(path).size) > 100
    assert main(["visualize", "--ckpt", str(ck), "--out", str(out), "--rows", "0"]) == 2
