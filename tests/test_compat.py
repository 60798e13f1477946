"""Reference (AMD-AGI/DynamicChunkingDiT) checkpoints: key mapping both ways, configs, training files."""
from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from dcdit.compat import (
    config_from_reference,
    config_to_reference,
    convert_reference_state_dict,
    export_reference_state_dict,
    load_reference_checkpoint,
    load_reference_dcdit,
    read_reference_checkpoint,
)
from dcdit.models import DCDiT, DCDiTConfig

TINY = dict(input_size=16, in_channels=4, num_classes=10, arch_layout=["c1", ["D2"], "c1"], d_model=[64, 64],
            num_heads=[4, 4], enc_dec_dim_factor=[2, None])


def test_fixture_keys_round_trip(dcdit_fixture):
    sd, cfg = dcdit_fixture["state_dict"], dcdit_fixture["config"]
    model = load_reference_dcdit(sd, cfg)
    assert model.cfg.attn_qkv_bf16  # reference numerics by default
    exported = export_reference_state_dict(model)
    assert exported.keys() == sd.keys()
    for k in sd:
        assert torch.equal(exported[k], sd[k]), k
    assert config_from_reference(config_to_reference(model.cfg)) == model.cfg


def test_fixture_config_fields(dcdit_fixture):
    cfg = config_from_reference(dcdit_fixture["config"])
    assert cfg.arch_layout == ["c2", ["D2"], "c2"] and cfg.enc_dec_dim_factor == [2, None]
    assert cfg.input_hw == (16, 16) and cfg.num_classes == 10 and cfg.downsample_factor == 4.0
    assert not config_from_reference(dcdit_fixture["config"], reference_numerics=False).attn_qkv_bf16


def test_full_reference_config_dict():
    ref = {
        "model": {"name": "DC-DiT", "hnet": {"arch_layout": ["c2", ["D12"], "c2"], "d_model": [768, 768],
                                              "num_heads": [12, 12], "enc_dec_dim_factor": [4, None],
                                              "fp32_router_dechunk": True}, "mlp_ratio": 4.0},
        "training": {"class_dropout_prob": 0.1, "learn_sigma": True, "downsample_factor": 16.0, "epochs": 80},
        "data": {"image_size": 512, "num_classes": 1000, "feature_path": "x"},
        "diffusion": {}, "logging": {}, "ckpt": None,
    }
    cfg = config_from_reference(ref)
    assert cfg.input_hw == (64, 64) and cfg.downsample_factor == 16.0 and cfg.d_model == [768, 768]
    with pytest.raises(ValueError, match="bogus"):
        config_from_reference({"model": {"hnet": {"bogus": 1}}})


def test_nested_layout_key_mapping():
    cfg = DCDiTConfig(**{**TINY, "arch_layout": ["c1", ["c1", ["D1"], "c1"], "c1"], "d_model": [64, 64, 64],
                         "num_heads": [4, 4, 4], "enc_dec_dim_factor": [2, None, None], "downsample_factor": [4.0, 2.0]})
    model = DCDiT(cfg)
    exported = export_reference_state_dict(model)
    assert "hnet.main_network.main_network.main_network.layers.0.attn.qkv.weight" in exported
    assert "hnet.main_network.routing_module.proj.weight" in exported
    assert "hnet.main_network.encoder.layers.0.conv1.weight" in exported
    back = convert_reference_state_dict(exported, cfg)
    assert back.keys() == model.state_dict().keys()


def test_wrapper_prefixes_and_errors():
    model = DCDiT(DCDiTConfig(**TINY))
    sd = {"module." + k: v for k, v in export_reference_state_dict(model).items()}
    loaded = load_reference_dcdit(sd, TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    missing = dict(sd)
    missing.pop("module.hnet.routing_module.proj.weight")
    with pytest.raises(ValueError, match="missing"):
        load_reference_dcdit(missing, TINY)
    with pytest.raises(ValueError, match="pad_dimension"):
        load_reference_dcdit({**sd, "hnet.main_network.pad_dimension": torch.zeros(3)}, TINY)
    with pytest.raises(ValueError, match="no equivalent"):
        config_to_reference(DCDiTConfig(**{**TINY, "patch_size": 2}))


@pytest.fixture
def reference_config_module():
    """A stand-in for the reference's ``config`` module, so torch.save pickles its dataclasses."""
    mod = types.ModuleType("config")

    @dataclasses.dataclass
    class HNetConfig:
        arch_layout: list
        d_model: list
        num_heads: list
        enc_dec_dim_factor: list
        tie_embeddings: bool = False
        dechunk_kernel_sigma: float = 1.0
        fp32_router_dechunk: bool = True

    @dataclasses.dataclass
    class ModelConfig:
        hnet: HNetConfig
        name: str = "DC-DiT"
        mlp_ratio: float = 4.0

    @dataclasses.dataclass
    class DataConfig:
        image_size: int = 128
        num_classes: int = 10

    @dataclasses.dataclass
    class TrainingConfig:
        class_dropout_prob: float = 0.1
        learn_sigma: bool = True
        downsample_factor: float = 4.0

    @dataclasses.dataclass
    class Config:
        model: ModelConfig
        data: DataConfig
        training: TrainingConfig

    for cls in (HNetConfig, ModelConfig, DataConfig, TrainingConfig, Config):
        cls.__module__, cls.__qualname__ = "config", cls.__name__
        setattr(mod, cls.__name__, cls)
    sys.modules["config"] = mod
    yield mod
    del sys.modules["config"]


def test_training_checkpoint_with_pickled_config(tmp_path, reference_config_module):
    M = reference_config_module
    ref_cfg = M.Config(
        model=M.ModelConfig(hnet=M.HNetConfig(["c1", ["D2"], "c1"], [64, 64], [4, 4], [2, None])),
        data=M.DataConfig(), training=M.TrainingConfig(),
    )
    model, ema = DCDiT(DCDiTConfig(**TINY)), DCDiT(DCDiTConfig(**TINY))
    path = tmp_path / "0050000.pt"
    torch.save({"model": export_reference_state_dict(model), "ema": export_reference_state_dict(ema),
                "opt": {"state": {}}, "config": ref_cfg}, path)
    del sys.modules["config"]  # the reading side has no such module
    sys.modules["config"] = types.ModuleType("config")
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # plain weights_only loading refuses the dataclass
    ckpt = read_reference_checkpoint(path)
    assert ckpt["config"]["model"]["hnet"]["d_model"] == [64, 64] and ckpt["config"]["data"]["image_size"] == 128
    loaded = load_reference_checkpoint(path)  # EMA weights by default
    assert loaded.grid == (16, 16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    raw = load_reference_checkpoint(path, use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), model.state_dict().values()))


def test_bare_state_dict_needs_a_config(tmp_path):
    model = DCDiT(DCDiTConfig(**TINY))
    path = tmp_path / "weights.pt"
    torch.save(export_reference_state_dict(model), path)
    with pytest.raises(ValueError, match="config"):
        load_reference_checkpoint(path)
    loaded = load_reference_checkpoint(path, config=TINY)
    assert loaded.state_dict().keys() == model.state_dict().keys()
