"""Backbone registry, UNet builder, weight exchange and offline pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg._dp_compat import batchnorm_to_groupnorm
from fedseg.models import (
    BACKBONES,
    build_model,
    count_parameters,
    get_weights,
    set_weights,
)


def gradient_checked(backbones=BACKBONES):
    """Registry names for per-backbone gradient tests: a negative control (nasnetalarge, ~100 M
    parameters, a minute per backward on 2 cores) is only built, in the test above them; its DP
    compatibility was checked by hand when it was registered (no dead parameter after
    make_dp_compatible)."""
    skip = pytest.mark.skip(reason="negative control: built only, too slow for a per-backbone backward in CI")
    return [pytest.param(name, marks=[skip] if spec.negative_control else []) for name, spec in
            sorted(backbones.items())]


@pytest.fixture(autouse=True)
def _empty_caches(tmp_path, monkeypatch):
    """Point every weight cache at an empty folder so no test sees (or fetches) real weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_and_segments_64px(backbone):
    # Prepare
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=5).eval()
    # Execute
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    # Assert
    assert out.shape == (2, 5, 64, 64)
    assert count_parameters(model) > 0


@pytest.mark.parametrize("backbone", gradient_checked())
def test_every_trainable_parameter_gets_a_gradient(backbone):
    """No dead parameters: Opacus refuses a trainable parameter without a per-sample gradient."""
    model = batchnorm_to_groupnorm(build_model(backbone, num_classes=3))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert dead == []


def test_tiny_is_small_and_the_only_test_only_backbone():
    assert count_parameters(build_model("tiny", num_classes=5)) < 200_000
    assert [name for name, spec in BACKBONES.items() if spec.test_only] == ["tiny"]


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as err:
        build_model("resnet9000", num_classes=5)
    assert "resnet34" in str(err.value) and "tiny" in str(err.value)


def test_decoder_channels_override_and_length_check():
    model = build_model("tiny", num_classes=2, decoder_channels=(16, 8, 4))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="must have 3 entries"):
        build_model("tiny", num_classes=2, decoder_channels=(16, 8))


def test_get_set_weights_round_trip():
    # Prepare: two differently initialised models of one architecture
    torch.manual_seed(0)
    source = build_model("tiny", num_classes=4)
    torch.manual_seed(1)
    target = build_model("tiny", num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    # Execute
    arrays = get_weights(source)
    set_weights(target, arrays)
    # Assert: buffers included, outputs identical
    assert len(arrays) == len(source.state_dict())
    assert any(k.endswith("running_mean") for k in source.state_dict())
    for a, b in zip(arrays, get_weights(target), strict=True):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(source.eval()(x), target.eval()(x))


def test_set_weights_accepts_float_buffers_from_aggregation():
    model = build_model("tiny", num_classes=4)
    arrays = [a.astype(np.float64) for a in get_weights(model)]  # e.g. averaged num_batches_tracked
    set_weights(model, arrays)
    assert all(t.dtype != torch.float64 for t in model.state_dict().values())


def test_set_weights_rejects_wrong_count_and_shape():
    model = build_model("tiny", num_classes=4)
    arrays = get_weights(model)
    with pytest.raises(ValueError, match="got 1 arrays"):
        set_weights(model, arrays[:1])
    other = get_weights(build_model("tiny", num_classes=7))
    with pytest.raises(ValueError, match="shape mismatch"):
        set_weights(model, other)


def test_named_weights_raise_clear_error_without_network():
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet34", num_classes=5, encoder_weights="imagenet")
    message = str(err.value)
    assert "never downloads" in message and "smp-hub/resnet34.imagenet" in message
    assert "resnet34-imagenet.safetensors" in message  # where to put the file


def test_timm_named_weights_raise_clear_error_without_network():
    with pytest.raises(FileNotFoundError, match="timm/test_resnet"):
        build_model("tiny", num_classes=5, encoder_weights="imagenet")


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown weights 'instagram'.*valid: \\['imagenet'"):
        build_model("resnet18", num_classes=5, encoder_weights="instagram")


def test_missing_weights_path_is_reported():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("tiny", num_classes=5, encoder_weights="/no/such/encoder.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_encoder_weights_load_from_local_file(tmp_path, suffix):
    # Prepare: save one model's encoder
    torch.manual_seed(0)
    source = build_model("tiny", num_classes=5)
    path = tmp_path / f"encoder{suffix}"
    state = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    # Execute
    torch.manual_seed(1)
    loaded = build_model("tiny", num_classes=5, encoder_weights=str(path))
    # Assert
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value)


def test_whole_unet_checkpoint_and_other_in_channels(tmp_path):
    source = build_model("tiny", num_classes=5)
    path = tmp_path / "unet.pth"
    torch.save(source.state_dict(), path)
    # A 3-channel stem is adapted to 1 input channel (timm's adapt_input_conv).
    loaded = build_model("tiny", num_classes=2, in_channels=1, encoder_weights=str(path))
    assert loaded(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_tiny_trains_under_opacus_ew():
    """The DP route really yields per-sample gradients (the tiny stand-in for resnet34)."""
    from opacus.grad_sample import wrap_model

    model = batchnorm_to_groupnorm(build_model("tiny", num_classes=3))
    wrapped = wrap_model(model, "ew", batch_first=True, loss_reduction="mean")
    wrapped(torch.randn(2, 3, 64, 64)).sum().backward()
    samples = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert all(s is not None and s.shape[0] == 2 for s in samples)


# privacy.grad_sample_mode=ew (torch's expanded weights) cannot reshape InceptionNeXt's layer-scale
# gamma; the default mode (hooks) trains it (tests/test_privacy.py), and a run asking for ew with it is
# refused before it starts (tests/test_bad_input.py). Strict: a fix upstream shows here, and then
# BackboneSpec.unsupported_grad_sample_modes should drop it.
_EW_FAILS = pytest.mark.xfail(strict=True, raises=RuntimeError,
                              reason="expanded weights: 'cannot handle function reshape' (layer scale)")


@pytest.mark.e2e
@pytest.mark.parametrize("backbone", [pytest.param(p.values[0], marks=[*p.marks, _EW_FAILS])
                                      if p.values[0] == "inception_next_tiny" else p for p in gradient_checked()])
def test_every_backbone_gives_per_sample_gradients(backbone):
    from opacus.grad_sample import wrap_model

    model = batchnorm_to_groupnorm(build_model(backbone, num_classes=3))
    wrapped = wrap_model(model, "ew", batch_first=True, loss_reduction="mean")
    wrapped(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)
