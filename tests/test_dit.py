import pytest
import torch

from dcdit.models import DIT_CONFIGS, DiT, build_dit


def fixture_model(fx) -> DiT:
    c = fx["config"]
    model = DiT(input_size=c["input_size"], patch_size=c["patch"], in_channels=c["in_ch"], hidden_size=c["hidden"],
                depth=c["depth"], num_heads=c["heads"], num_classes=c["classes"], learn_sigma=True)
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def test_forward_matches_reference(dit_fixture):
    model, i = fixture_model(dit_fixture), dit_fixture["inputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"])
    ref = dit_fixture["outputs"]["forward"]
    assert out.shape == ref.shape == (6, 8, 16, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_guided_forward_matches_reference_in_three_channel_mode(dit_fixture):
    model, c = fixture_model(dit_fixture), dit_fixture["inputs"]["cfg"]
    with torch.no_grad():
        out = model.forward_with_cfg(c["x"], c["t"], c["y"], c["scale"], guidance_channels=3)
        full = model.forward_with_cfg(c["x"], c["t"], c["y"], c["scale"])
    torch.testing.assert_close(out, dit_fixture["outputs"]["forward_with_cfg"], atol=1e-5, rtol=0)
    # Default guides every eps channel: channel 3 now differs, variance channels pass through.
    assert not torch.allclose(full[:, 3], out[:, 3])
    torch.testing.assert_close(full[:, :3], out[:, :3])
    torch.testing.assert_close(full[:, 4:], out[:, 4:])
    torch.testing.assert_close(full[:3, :4], full[3:, :4])  # both halves carry the guided eps


def test_zero_init_outputs_zero_and_keys_match_original():
    model = build_dit("DiT-S/8", input_size=16, num_classes=10)
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 9]))
    assert out.shape == (2, 8, 16, 16) and out.abs().max() == 0  # adaLN-Zero + zero final layer
    keys = set(model.state_dict())
    assert {"pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
            "blocks.11.adaLN_modulation.1.weight", "final_layer.linear.bias"} <= keys
    assert model.y_embedder.embedding_table.num_embeddings == 11  # null class row


def test_registry_has_all_original_names():
    assert set(DIT_CONFIGS) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with pytest.raises(ValueError, match="unknown DiT model 'DiT-M/2'"):
        build_dit("DiT-M/2")


@pytest.mark.parametrize(
    "kwargs, x_shape, y, match",
    [
        (dict(input_size=15, patch_size=2), (1, 4, 15, 15), [0], "not divisible by patch_size"),
        (dict(input_size=16, patch_size=2), (1, 3, 16, 16), [0], r"expected input of shape \(B, 4, 16, 16\)"),
        (dict(input_size=16, patch_size=2), (1, 4, 16, 16), [11], r"labels must lie in \[0, 10\]"),
        (dict(input_size=16, patch_size=2), (1, 4, 16, 16), [-1], r"labels must lie in \[0, 10\]"),
    ],
)
def test_bad_input_errors(kwargs, x_shape, y, match):
    with pytest.raises(ValueError, match=match):
        model = DiT(hidden_size=32, depth=1, num_heads=2, num_classes=10, **kwargs)
        model(torch.randn(x_shape), torch.tensor([5]), torch.tensor(y))


def test_training_mode_drops_labels_for_guidance():
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10, class_dropout_prob=0.5)
    labels = torch.zeros(2000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(labels)
    assert 0.45 < (dropped == 10).float().mean() < 0.55
