"""Backbone registry and the UNet builder.

One dict registry, ``BACKBONES``, in the segmentation-models-pytorch style: every entry names an smp
encoder (``tu-NAME`` for a timm one) and the decoder shape that goes with it. The default is the
paper's UNet-ResNet34; the other entries are the seed papers' efficient / searched families, and
``tiny`` is a test variant (timm's ``test_resnet``, flagged ``test_only``) that runs the real smp
UNet code path in milliseconds.

Nothing is ever downloaded: ``encoder_weights`` defaults to ``None`` and named weights load only from a
local file or an existing cache (:mod:`fedseg.pretrained`).
"""

from __future__ import annotations

import copy
import functools
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedseg.config import ModelSpec, TrainablePart
from fedseg.pretrained import load_encoder_weights

_DEFAULT_DECODER = (256, 128, 64, 32, 16)  # smp's UNet default
# Every entry trains under DP-SGD through ``fedseg._dp_compat.make_dp_compatible`` (BatchNorm ->
# GroupNorm, out-of-place residual adds and activations), tested for each in tests/test_privacy.py;
# plain ``hooks`` fails without those fixes (in-place ``out += identity`` on hooked outputs).


@dataclass(frozen=True)
class BackboneSpec:
    """One pluggable UNet encoder and the decoder shape that goes with it."""

    encoder: str  # smp encoder name; "tu-" prefix = timm universal encoder
    family: str
    description: str  # which seed paper / family it stands for
    decoder_channels: tuple[int, ...] = _DEFAULT_DECODER
    encoder_depth: int = 5
    # Encoder submodules the forward pass never uses; removed so they are neither trained, sent to the
    # server, nor trip Opacus (a trainable parameter without a per-sample gradient).
    unused_modules: tuple[str, ...] = ()
    # A variant for tests and smoke runs only: never a deployment candidate (fedseg-search leaves it
    # out unless it is named explicitly).
    test_only: bool = False
    # A seed list's declared negative control: searched so that the table shows it losing (large and
    # slow), never expected to be chosen. Per-backbone tests only build it (tests/test_models.py).
    negative_control: bool = False
    # Opacus grad_sample_mode values that cannot give this encoder per-sample gradients (refused before
    # a run starts, fedseg.settings.check_choices).
    unsupported_grad_sample_modes: tuple[str, ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    "resnet34": BackboneSpec("resnet34", "ResNet", "default; the paper's UNet-ResNet34"),
    "resnet18": BackboneSpec("resnet18", "ResNet", "shallower ResNet (Revisiting ResNets family)"),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", "MobileNet", "MobileNetV2 inverted residuals"),
    "efficientnet-b0": BackboneSpec(
        "efficientnet-b0", "EfficientNet", "EfficientNet-B0 (EfficientNet U-Net++ paper family)",
        unused_modules=("_conv_head", "_bn1"),  # smp keeps the classifier stem; forward skips it
    ),
    "mobilenetv3_large": BackboneSpec(
        "tu-mobilenetv3_large_100", "MobileNetV3", "Searching for MobileNetV3 (platform-aware NAS)"
    ),
    "mobileone_s0": BackboneSpec("mobileone_s0", "MobileOne", "re-parameterisable mobile backbone"),
    "spnasnet_100": BackboneSpec(
        "tu-spnasnet_100", "Single-Path NAS", "Single-Path NAS: hardware-efficient ConvNets"
    ),
    "fbnetv3_b": BackboneSpec("tu-fbnetv3_b", "FBNetV3", "FBNetV3: joint architecture-recipe search"),
    "tinynet_e": BackboneSpec(
        "tu-tinynet_e", "TinyNet", "Model Rubik's Cube: twisting resolution, depth and width"
    ),
    "mnasnet_100": BackboneSpec(
        "tu-mnasnet_100", "MnasNet", "MnasNet: platform-aware neural architecture search for mobile"
    ),
    # timm's PyTorch-padded port: the tf_ twin pads dynamically ("SAME"), slower and clumsier in ONNX.
    "efficientnet_lite0": BackboneSpec(
        "tu-efficientnet_lite0", "EfficientNet-Lite",
        "EfficientNet-Lite0: EfficientNet without squeeze-excite and swish, for edge/INT8 hardware",
    ),
    "resnetrs50": BackboneSpec(
        "tu-resnetrs50", "ResNet-RS", "ResNet-RS-50: Revisiting ResNets (training and scaling strategies)"
    ),
    # Stride-4 stem (ConvNeXt-style): smp's timm encoder leaves the stride-2 skip empty.
    "inception_next_tiny": BackboneSpec(
        "tu-inception_next_tiny", "InceptionNeXt", "InceptionNeXt-T: when Inception meets ConvNeXt",
        unsupported_grad_sample_modes=("ew",),  # torch's expanded weights cannot reshape its layer scale
    ),
    # ~85 M encoder parameters (101 M as a UNet), ~400 MB fp32: over every vehicle profile's model_mb.
    "nasnetalarge": BackboneSpec(
        "tu-nasnetalarge", "NASNet",
        "NASNet-A Large (learned transferable architectures): negative control, large and slow, "
        "expected to lose", negative_control=True,
    ),
    # timm's test_resnet at depth 3 with a narrow decoder: ~0.1 M parameters, still smp's UNet.
    "tiny": BackboneSpec(
        "tu-test_resnet", "ResNet", "test variant for unit tests and smoke runs",
        decoder_channels=(32, 16, 8), encoder_depth=3, test_only=True,
    ),
}
DEFAULT_BACKBONE = "resnet34"


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by registry name; an unknown name lists the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_model(
    backbone: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    encoder_weights: str | None = None,
    decoder_channels: Sequence[int] | None = None,
    encoder_depth: int | None = None,
) -> nn.Module:
    """Build an ``smp.Unet`` for a registry backbone.

    ``encoder_weights``: ``None`` (random init), a path to a ``.pth``/``.pt``/``.safetensors`` file
    holding an encoder (or whole-UNet) state dict, or a weights name such as ``"imagenet"``, which is
    looked up in the local Hugging Face / torch hub caches only. Nothing is downloaded; a missing
    file raises ``FileNotFoundError`` saying where it looked. ``encoder_depth``: how many encoder
    stages feed the decoder (default: the registry's); fewer drop the deepest, widest ones.
    """
    spec = get_backbone(backbone)
    depth = spec.encoder_depth if encoder_depth is None else int(encoder_depth)
    if not 1 <= depth <= spec.encoder_depth:
        raise ValueError(f"encoder_depth={depth} for backbone {backbone!r}; valid: 1 to {spec.encoder_depth}")
    channels = tuple(decoder_channels) if decoder_channels is not None else spec.decoder_channels[-depth:]
    if len(channels) != depth:
        raise ValueError(
            f"decoder_channels {channels} must have {depth} entries "
            f"(encoder depth of backbone {backbone!r})"
        )
    import segmentation_models_pytorch as smp  # here, not at the top: its timm import costs 7 s of a
    # command (fedseg-sim) that only checks registry names before its processes build models

    # Always build without weights: smp would otherwise download them.
    model = smp.Unet(
        spec.encoder, encoder_weights=None, encoder_depth=depth,
        decoder_channels=channels, in_channels=in_channels, classes=num_classes,
    )
    for name in spec.unused_modules:
        delattr(model.encoder, name)
    if encoder_weights is not None:
        load_encoder_weights(model.encoder, encoder_weights, backbone=backbone, encoder=spec.encoder,
                             in_channels=in_channels)
    return model


def build_run_model(spec: ModelSpec, num_classes: int, *, seed: int, dp: bool = False) -> nn.Module:
    """The run's UNet, initialised identically everywhere (server, vehicles, baseline) from ``seed``.

    ``dp``: the DP-compatible variant (GroupNorm, out-of-place residuals). Server and vehicles
    must agree on it, since GroupNorm has no running-statistics buffers.
    """
    torch.manual_seed(seed)
    model = build_model(spec.name, num_classes, encoder_weights=spec.encoder_weights,
                        decoder_channels=spec.decoder_channels, encoder_depth=spec.encoder_depth)
    if dp:
        from fedseg._dp_compat import make_dp_compatible  # local: pulls in Opacus

        model = make_dp_compatible(model)
    return model


def model_with_weights(spec: ModelSpec, num_classes: int, arrays: Sequence[np.ndarray], *, dp: bool = False
                       ) -> nn.Module:
    """The run's UNet holding ``arrays`` (from :func:`get_weights`), built without initialising it.

    The modules are created on PyTorch's meta device and then allocated empty: every parameter and
    buffer is overwritten by ``arrays`` anyway, so the random initialisation (0.2-0.3 CPU s a round
    for UNet-ResNet34 on a vehicle, docs/PERFORMANCE.md) is skipped. Same result as
    ``set_weights(build_run_model(...), arrays)``.
    """
    model = copy.deepcopy(_meta_template(spec, num_classes, dp)).to_empty(device="cpu")
    set_weights(model, arrays)
    return model


@functools.lru_cache(maxsize=4)
def _meta_template(spec: ModelSpec, num_classes: int, dp: bool) -> nn.Module:
    """The run's UNet on PyTorch's meta device (no storage), built once per process: a vehicle's message
    deep-copies it (0.05 s for mobilenet_v2's UNet) instead of building it (0.2 s: smp's constructor,
    initialisation calls and the DP fixes), so a simulation worker serving many vehicles builds once."""
    with torch.device("meta"):
        return build_run_model(spec, num_classes, seed=0, dp=dp)


# Which parameters local training updates (``privacy.trainable``): the rest stay as received.
TRAINABLE_PARTS: tuple[TrainablePart, ...] = typing.get_args(TrainablePart)


def set_trainable(model: nn.Module, part: str) -> int:
    """Freeze all but ``part`` of a UNet (``all``; ``decoder``: decoder and segmentation head, the
    encoder frozen, so no gradient flows through it; ``norm``: every normalization layer's affine
    weight and bias, and the head; ``head``: the segmentation head alone). Returns the number of
    trainable parameters."""
    trained = trained_names(model, part)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def trained_names(model: nn.Module, part: str) -> set[str]:
    """Names of the parameters ``privacy.trainable=part`` trains (``set_trainable``)."""
    if part not in TRAINABLE_PARTS:
        raise ValueError(f"privacy.trainable={part!r}; valid: {list(TRAINABLE_PARTS)}")
    names = {name for name, _ in model.named_parameters()}
    if part == "all":
        return names
    if part == "decoder":
        return {name for name in names if not name.startswith("encoder.")}
    head = {name for name in names if name.startswith("segmentation_head.")}
    if part == "head":
        return head
    return head | {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                   if isinstance(module, _NORMS) for name, _ in module.named_parameters(recurse=False)}


def trained_mask(model: nn.Module, part: str) -> list[bool]:
    """Which arrays of :func:`get_weights` (state-dict order) ``part`` trains; buffers never are."""
    trained = trained_names(model, part)
    return [key in trained for key in model.state_dict()]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's state dict as numpy arrays, in state-dict order (buffers included)."""
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (same architecture) back into ``model``."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(
            f"got {len(arrays)} arrays but the model's state dict has {len(state)} entries "
            "(different backbone, decoder, or DP normalisation?)"
        )
    new_state = {}
    for (key, current), array in zip(state.items(), arrays, strict=True):
        if tuple(np.shape(array)) != tuple(current.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: got {np.shape(array)}, model has {tuple(current.shape)}"
            )
        # Cast to the model's dtype: aggregation may turn integer buffers into floats.
        new_state[key] = torch.as_tensor(np.asarray(array)).to(current.dtype)
    model.load_state_dict(new_state, strict=True)
