"""Smoke test of benchmarks/reproduce.py (the benchmarks/reproduction package): every stage runs end to end
at toy size, then resumes from its cache."""
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_smoke(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mnist")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/reproduce.py` has it
    repro = importlib.import_module("reproduction")
    out = tmp_path / "repro"
    assert repro.main(["--out", str(out), "--smoke"]) == 0
    res = json.loads((out / "results.json").read_text())
    for n in repro.MODELS:
        ev = res["eval"][n][0]
        assert ev["n"] == 24 and ev["gflops_per_image"] > 0 and 0 <= ev["class_acc"] <= 1
    ev = res["eval"]["dcdit_n4"][0]
    assert ev["kept_share_noisiest"] is not None
    assert len(ev["timesteps"]) == len(ev["kept_share_by_t"]) and ev["timesteps"][0] == ev["t_noisiest"]
    assert set(res["elastic"]) == {"0.2", "0.4", "0.6"}
    assert res["shapes"][0]["per_t"][0]["auc"] is not None
    assert {p["init"] for p in res["upcycle"][0]["points"]} == {"scratch", "upcycled"}
    assert res["upcycle"][0]["init"]["params_copied"] > 0  # the DiT/4's blocks went into the DC-DiT
    router = res["upcycle"][0]["init"]["router"]  # the library's calibration, on MNIST: ~1/N kept at init
    assert router["on"] == "data" and router["data"] == "mnist" and abs(router["kept_share"] - 0.25) < 0.02
    assert res["upcycle"][0]["init"]["diffusion"]["prediction"] == "v"  # the DiT/4's, carried over
    assert set(res["speed"][0]["images_per_sec"]) == set(repro.MODELS)
    # every claim of the issue is measured on the smoke run (held or not is the toy run's business)
    assert len(res["claims"]) == 7 and all(c["held"] is not None for c in res["claims"])
    assert 0 < repro.scaffold_share(res["eval"]["dcdit_n4"][0]) < 1
    # FID against training compute: three points per model, compute growing with the steps
    for n in repro.MODELS:
        pts = res["curve"][0][n]["points"]
        assert [p["steps"] for p in pts] == [2, 4, 8] and pts[0]["train_gflops"] < pts[-1]["train_gflops"]
    assert (out / "fid_vs_train_flops.png").is_file()
    table = (out / "table.md").read_text()
    assert table.count("| DC-DiT N=4 | ~64 of 256") == 1 and table.count("| yes |") + table.count("| no |") == 7
    assert (out / "fid_vs_gflops.png").is_file() and (out / "upcycling.png").is_file()
    # a second run finds every stage cached and only rebuilds the report: no stage JSON and no
    # checkpoint is written again (compared by modification time, not by how long it took)
    # (the report's files and the upcycling and curve summaries, assembled from cached points, are rebuilt)
    rebuilt = lambda p: p.name in ("results.json", "table.md", "settings.json") or p.suffix == ".png" \
        or re.fullmatch(r"(upcycle_result|curve)_s\d+\.json", p.name)
    cached = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not rebuilt(p)}
    assert repro.main(["--out", str(out), "--smoke"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert not [p for p in out.rglob("*") if p.is_file() and not rebuilt(p) and p not in cached]
    # the on-request shapes ablation: one run per variant, its own table in the report
    assert repro.main(["--out", str(out), "--smoke", "--only", "shapes-ablation"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["shapes_ablation"]) == set(repro.SHAPES_VARIANTS)
    for v, (label, _) in repro.SHAPES_VARIANTS.items():
        assert res["shapes_ablation"][v][0]["per_t"][0]["auc"] is not None
        assert f"| {label} |" in (out / "table.md").read_text()
    cfg = yaml.safe_load((out / "runs" / "shapes_epsilon_dcdit_s0" / "config.yaml").read_text())
    assert cfg["diffusion"]["prediction"] == "epsilon" and cfg["multibudget"]["enabled"]
    # other settings in the same directory are refused
    with pytest.raises(SystemExit):
        repro.main(["--out", str(out)])


def test_canvas_claims_per_seed(monkeypatch):
    """Issue 25's canvas goals from canvas.py's results: ratios within a seed, time as 1 / img/s, a goal held
    only when it holds on every seed that measured it, None where a model was not scored."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    repro = importlib.import_module("reproduction")
    seg = lambda auc: {"auc_ink_late": auc}
    res = lambda fid_dc, ips_dc, auc, noisy: {
        "eval": {"dcdit": {"fid": fid_dc, "segmentation": seg(auc), "kept_share_noisiest": noisy,
                           "kept_share_cleanest": 0.4},
                 "dcdit_grid": {"fid": 100.0}, "dit8": {"fid": 100.0}},
        "speed": {"images_per_sec": {"dcdit": ips_dc, "dit8": 10.0}}}
    rows = {c["claim"].removeprefix("canvas: "): c
            for c in repro.canvas_claims([res(70.0, 10.0, 0.9, 0.2), res(90.0, 5.0, 0.8, 0.2), None])}
    fid8 = rows["DC-DiT FID / FLOP-matched DiT/8's"]
    assert fid8["per_seed"][:2] == pytest.approx([0.7, 0.9]) and fid8["per_seed"][2] is None
    assert fid8["held"] is False  # seed 1 misses
    t8 = rows["DC-DiT sampling time / DiT/8's"]
    assert t8["per_seed"][:2] == pytest.approx([1.0, 2.0])  # half the img/s = twice the time
    assert rows["kept share at the noisiest step / at the cleanest"]["held"] is True  # 0.5 on both seeds
    assert rows["router ROC-AUC vs the digit's ink, t <= 250"]["held"] is False
    for absent in ("DC-DiT FID / parameter-matched DiT/4's", "learned router FID / random router's (same share)"):
        assert rows[absent]["per_seed"] == [None, None, None] and rows[absent]["held"] is None
    # a results file may name another DC-DiT as the one judged; its controls are NAME_grid / NAME_random
    other = {"eval": {"dcdit": {"fid": 500.0}, "w32": {"fid": 80.0}, "w32_random": {"fid": 100.0}, "dit8": {"fid": 100.0}},
             "speed": {"images_per_sec": {"dcdit": 1.0, "w32": 8.0, "dit8": 10.0}}, "dcdit_model": "w32"}
    rows = {c["claim"].removeprefix("canvas: "): c for c in repro.canvas_claims([other])}
    assert rows["DC-DiT FID / FLOP-matched DiT/8's"]["per_seed"] == pytest.approx([0.8])
    assert rows["DC-DiT sampling time / DiT/8's"]["per_seed"] == pytest.approx([1.25])
    assert rows["learned router FID / random router's (same share)"]["per_seed"] == pytest.approx([0.8])
    assert rows["learned router FID / fixed lattice router's (same share)"]["per_seed"] == [None]
