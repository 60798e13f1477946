"""Upcycling a DiT checkpoint into a DC-DiT, and training from the result."""
import json

import pytest
import torch

from dcdit.cli import main
from dcdit.models.dit import DiT, describe_dit
from dcdit.training.upcycle import upcycle

from test_training import CONFIGS

pytest.importorskip("dcdit.models.dcdit")

# The reference fixture's shape: DiT hidden 64, depth 2, 4 heads on a 16x16x4 latent, 10 classes.
TINY_DCDIT = {"d_model": [64, 64], "num_heads": [4, 4], "arch_layout": ["c2", ["D2"], "c2"],
              "enc_dec_dim_factor": [2, None]}


def tiny_dit(depth: int = 2, hidden: int = 64) -> DiT:
    torch.manual_seed(1)
    m = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no zero-initialised tensors: copies are visible
    return m


@pytest.mark.parametrize("layout", ["ema", "bare"])
def test_upcycle_released_pt_layout(tmp_path, layout):
    dit = tiny_dit()
    sd = dit.state_dict()
    path = tmp_path / "dit.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd} if layout == "ema" else sd, path)
    model, summary = upcycle(path, "DC-DiT-S-N4", TINY_DCDIT)
    assert describe_dit(sd) == {"hidden_size": 64, "depth": 2, "in_channels": 4, "patch_size": 2,
                                "table_rows": 11, "input_size": 16}
    got = model.state_dict()
    prefix = summary["main_prefix"]
    for i in range(2):
        for name in ("attn.qkv.weight", "attn.proj.bias", "mlp.fc2.weight", "adaLN_modulation.1.weight"):
            assert torch.equal(got[f"{prefix}{i}.{name}"], sd[f"blocks.{i}.{name}"])
    for name in ("t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight"):
        assert torch.equal(got[name], sd[name])
    assert model.config["input_size"] == 16 and model.config["num_classes"] == 10
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    out, routing = model.eval()(x, t, y)
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("dit_kwargs, overrides, message", [
    ({"depth": 3}, {}, "depth mismatch"),
    ({"hidden": 96}, {"num_heads": [4, 4]}, "width mismatch"),
    ({}, {"num_classes": 20}, "classes mismatch"),
])
def test_upcycle_mismatch_errors(tmp_path, dit_kwargs, overrides, message):
    path = tmp_path / "dit.pt"
    torch.save(tiny_dit(**dit_kwargs).state_dict(), path)
    with pytest.raises(ValueError, match=message):
        upcycle(path, "DC-DiT-S-N4", {**TINY_DCDIT, **overrides})


def test_cli_upcycle_then_train_from_it(tmp_path, capsys):
    path = tmp_path / "dit.pt"
    torch.save({"ema": tiny_dit().state_dict()}, path)
    out = tmp_path / "up"
    argv = ["upcycle", "--dit", str(path), "--preset", "DC-DiT-S-N4", "--out", str(out)]
    for k, v in TINY_DCDIT.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert main(argv) == 0
    assert "model.init_from" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["arch"] == "dcdit"

    from dcdit.checkpoint import load_model

    model = load_model(out)
    assert model.config["d_model"] == [64, 64]
    bad = main(["upcycle", "--dit", str(path), "--preset", "DC-DiT-S-N4", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert bad == 2 and len(err.splitlines()) == 1 and "mismatch" in err


def test_train_from_upcycled_model(tmp_path):
    """model.init_from: training starts from the upcycled weights (RGB 16px shapes, 3 channels)."""
    from dcdit.checkpoint import load_safetensors, save_model_dir
    from dcdit.training import load_train_config, train

    torch.manual_seed(1)
    dit = DiT(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    path = tmp_path / "dit.pt"
    torch.save(dit.state_dict(), path)
    model, _ = upcycle(path, "DC-DiT-S-N4", TINY_DCDIT)
    save_model_dir(tmp_path / "up", model, model)
    cfg = load_train_config(CONFIGS / "shapes_dcdit_cpu.yaml", [
        f"model.init_from={tmp_path / 'up'}", "model.overrides={}", "data.image_size=16", "data.num_samples=32",
        "train.steps=1", "train.global_batch_size=4", "train.progress=false", "samples.interval=0",
        "optim.lr=1e-12", "optim.warmup_steps=0"])
    run = train(cfg, out=tmp_path / "run")
    after = load_safetensors(run / "ckpt-0000001" / "model.safetensors")
    start = model.state_dict()
    key = "main_network.layers.0.attn.qkv.weight"
    torch.testing.assert_close(after[key], start[key], atol=1e-6, rtol=0)

    cfg.model.overrides = {"d_model": [128, 128]}
    with pytest.raises(ValueError, match="do not fit the weights of model.init_from"):
        train(cfg, out=tmp_path / "run2")


# --------------------------------------------------------------------------- issue 29: upcycling as a user runs it


def test_upcycle_pretrained_then_sample_keeps_a_quarter(tmp_path, capsys):
    """`dcdit upcycle --dit pretrained:mnist-dit4 --preset DC-DiT-MNIST-N4`, then `dcdit sample --ckpt U`:
    the router keeps ~1/N = 1/4 of the tokens from the start, and U predicts v like the DiT."""
    out = tmp_path / "U"
    assert main(["upcycle", "--dit", "pretrained:mnist-dit4", "--preset", "DC-DiT-MNIST-N4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "router calibrated on noise: keeps 0.250" in printed and "prediction v" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prediction"] == "v" and cfg["learn_sigma"] is True
    assert (cfg["input_size"], cfg["in_channels"], cfg["num_classes"], cfg["patch_size"]) == (32, 1, 10, 2)
    record = json.loads((out / "upcycle.json").read_text())
    assert record["router"]["on"] == "noise" and abs(record["router"]["kept_share"] - 0.25) <= 1 / 256
    assert record["params_copied"] / record["params_total"] > 0.9  # the DiT's 10 blocks are most of it

    stats = tmp_path / "stats.json"
    assert main(["sample", "--ckpt", str(out), "--num-samples", "8", "--steps", "5", "--npz", str(tmp_path / "s.npz"),
                 "--stats-json", str(stats), "--no-progress"]) == 0
    kept = json.loads(stats.read_text())["stats"]["mean_kept_share"][0]
    assert abs(kept - 0.25) <= 0.25 * 0.25, kept  # within +-25 % of 1/N on a real sampling run


def test_calibrate_router_on_data_and_to_a_target(tmp_path):
    """On noised data and to any share: the measured natural share is the target up to one token in 256."""
    from dcdit.training.upcycle import calibrate_router

    model, summary = upcycle("pretrained:mnist-dit4", "DC-DiT-MNIST-N4", calibrate=False)
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    r = calibrate_router(model, images=x, target_share=0.1)
    assert r["on"] == "data" and abs(r["kept_share"] - 0.1) <= 1 / 256
    assert model.routing_module.residual_scorer[-1].bias.item() == pytest.approx(r["bias"])
    # an uncalibrated fresh router keeps little more than the two forced tokens: the failure
    fresh, _ = upcycle("pretrained:mnist-dit4", "DC-DiT-MNIST-N4", calibrate=False)
    with torch.no_grad():
        _, routing = fresh.eval()(torch.randn(4, 1, 32, 32), torch.tensor([999, 500, 100, 0]), torch.arange(4))
    assert routing[0].kept_share(natural=True).mean().item() < 0.05
    with pytest.raises(ValueError, match="target kept share"):
        calibrate_router(model, target_share=1.0)


def test_upcycle_from_a_run_dir_carries_its_diffusion(tmp_path, capsys):
    """A DiT run directory: its noise schedule / T go to U's train_config.yaml, which `dcdit sample` reads."""
    from dcdit.checkpoint import save_model_dir
    from dcdit.sampling import read_train_config

    dit = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
              prediction="x0")
    run = tmp_path / "run"
    save_model_dir(run / "ckpt-0000010", dit, dit)
    (run / "latest").write_text("ckpt-0000010")
    (run / "config.yaml").write_text("data: {source: latents}\ndiffusion: {noise_schedule: cosine, diffusion_steps: 500}\n")
    out = tmp_path / "U"
    argv = ["upcycle", "--dit", str(run), "--preset", "DC-DiT-S-N4", "--out", str(out), "--keep-share", "0.3"]
    for k, v in TINY_DCDIT.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prediction x0" in printed and "noise schedule cosine over 500 steps" in printed
    assert "--set diffusion.noise_schedule=cosine" in printed
    assert json.loads((out / "config.json").read_text())["prediction"] == "x0"
    assert read_train_config(out) == {"diffusion": {"noise_schedule": "cosine", "diffusion_steps": 500},
                                      "data": {"source": "latents"}}
    assert abs(json.loads((out / "upcycle.json").read_text())["router"]["kept_share"] - 0.3) <= 1 / 256


def test_upcycle_released_dit_keeps_epsilon_and_fixed_sigma(tmp_path):
    """A bare released-format state dict: epsilon (DiT's), learn_sigma read off the final layer's width."""
    torch.manual_seed(1)
    dit = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
              learn_sigma=False)
    path = tmp_path / "dit.pt"
    torch.save(dit.state_dict(), path)
    model, summary = upcycle(path, "DC-DiT-S-N4", TINY_DCDIT)
    assert model.config["prediction"] == "epsilon" and model.config["learn_sigma"] is False
    assert summary["diffusion"]["recorded"] is False and summary["router"]["on"] == "noise"


def test_upcycle_cli_bad_calibration_options(tmp_path, capsys):
    base = ["upcycle", "--dit", "pretrained:mnist-dit4", "--preset", "DC-DiT-MNIST-N4", "--out", str(tmp_path / "u")]
    for extra, msg in ((["--keep-share", "1.5"], "--keep-share must lie in (0, 1)"),
                       (["--no-calibrate", "--keep-share", "0.2"], "--no-calibrate leaves the router"),
                       (["--data-path", "x.npz"], "--data-path needs --data-source")):
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert main(["upcycle", "--dit", "pretrained:nope", "--preset", "DC-DiT-MNIST-N4"]) == 2
    assert "unknown pretrained model 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_upcycle_finetune_benchmark_smoke(tmp_path):
    """benchmarks/upcycle_finetune.py end to end at 5 steps (the 500-step comparison is the lead's run)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("mnist")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "upcycle_finetune.py"
    spec = importlib.util.spec_from_file_location("upcycle_finetune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "ft"), "--smoke", "--classifier", str(tmp_path / "none")]) == 0
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(res["runs"]) == {"upcycled", "scratch", "upcycled_init"} and res["steps"] == 5
    assert abs(res["init_kept_share"] - 0.25) <= 1 / 256
    assert all(0 <= r["class_acc"] <= 1 and r["n"] == 10 for r in res["runs"].values())
