"""The main job end to end, at toy size.

The MNIST one runs in the default suite (CI): it is ``make demo`` with a few steps, the shipped-model
section included (~15 s); the shapes variant is slow.
"""
import json

import pytest


@pytest.mark.slow
def test_demo_writes_report_with_class_accuracy_and_segmentation(tmp_path, monkeypatch):
    import dcdit.demo as demo

    monkeypatch.setattr(demo, "CLASSIFIER_STEPS", 20)
    report = demo.run_demo(tmp_path / "demo", steps=6, sample_steps=3, overrides=[
        "data.source=shapes", "data.num_samples=256", "train.global_batch_size=16", "train.ckpt_interval=1000",
        "train.progress=false", "train.num_threads=1"])
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["steps"] == 6 and s["data"] == "shapes" and s["num_samples"] == 100
    assert 0.0 <= s["sample_class_accuracy"] <= 1.0 and 0.0 <= s["segmentation_auc_late"] <= 1.0
    text = report.read_text()
    assert "Sample class accuracy" in text and "ROC-AUC" in text
    for name in ("samples_per_class.png", "boundary_maps.png", "kept_share_vs_timestep.png", "flops_vs_dit.png",
                 "elastic_grid.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 1000


def test_demo_report_shows_the_shipped_router_beside_the_run(tmp_path, monkeypatch):
    """The main job as `make demo` runs it (MNIST 16x16, the shipped epsilon model beside a v run), toy size."""
    import dcdit.demo as demo

    monkeypatch.setattr(demo, "CLASSIFIER_STEPS", 20)
    report = demo.run_demo(tmp_path / "demo", steps=4, sample_steps=3, overrides=[
        "train.global_batch_size=16", "train.ckpt_interval=1000", "train.progress=false", "train.num_threads=1"])
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["data"] == "mnist" and s["image_size"] == 16 and s["steps"] == 4
    assert 0.0 <= s["sample_class_accuracy"] <= 1.0 and s["num_samples"] == 100
    shipped = s["shipped"]
    assert shipped["name"] == "mnist16-dcdit-n4"
    # The shipped router finds the strokes (its weights and the probe are fixed: 0.74 here).
    assert shipped["segmentation_auc_late"] > 0.7  # chance: 0.5
    assert len(shipped["elastic"]) == 3
    assert shipped["elastic"][0]["gflops_run"] > shipped["elastic"][2]["gflops_run"]
    assert "pretrained:mnist16-dcdit-n4" in report.read_text()
    for name in ("shipped_boundary_maps.png", "shipped_elastic_grid.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 1000
