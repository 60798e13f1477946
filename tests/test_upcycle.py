"""Upcycling a DiT checkpoint into a DC-DiT, and training from the result."""
import json

import pytest
import torch

from dcdit.cli import main
from dcdit.models.dit import DiT
from dcdit.training.upcycle import describe_dit, upcycle

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
