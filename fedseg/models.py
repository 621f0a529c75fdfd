"""Backbone registry and the UNet builder.

One dict registry, ``BACKBONES``, in the segmentation-models-pytorch style: every entry names an smp
encoder (``tu-NAME`` for a timm one) and the decoder shape that goes with it. The default is the
paper's UNet-ResNet34; the other entries are the seed papers' efficient / searched families, and
``tiny`` is a test variant (timm's ``test_resnet``, flagged ``test_only``) that runs the real smp
UNet code path in milliseconds.

Nothing is ever downloaded: ``encoder_weights`` defaults to ``None`` and named weights load only from a
local file or an existing cache (see :func:`build_model`).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseg.config import ModelSpec, TrainablePart

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
) -> nn.Module:
    """Build an ``smp.Unet`` for a registry backbone.

    ``encoder_weights``: ``None`` (random init), a path to a ``.pth``/``.pt``/``.safetensors`` file
    holding an encoder (or whole-UNet) state dict, or a weights name such as ``"imagenet"``, which is
    looked up in the local Hugging Face / torch hub caches only. Nothing is downloaded; a missing
    file raises ``FileNotFoundError`` saying where it looked.
    """
    spec = get_backbone(backbone)
    channels = tuple(decoder_channels) if decoder_channels is not None else spec.decoder_channels
    if len(channels) != spec.encoder_depth:
        raise ValueError(
            f"decoder_channels {channels} must have {spec.encoder_depth} entries "
            f"(encoder depth of backbone {backbone!r})"
        )
    import segmentation_models_pytorch as smp  # here, not at the top: its timm import costs 7 s of a
    # command (fedseg-sim) that only checks registry names before its processes build models

    # Always build without weights: smp would otherwise download them.
    model = smp.Unet(
        spec.encoder, encoder_weights=None, encoder_depth=spec.encoder_depth,
        decoder_channels=channels, in_channels=in_channels, classes=num_classes,
    )
    for name in spec.unused_modules:
        delattr(model.encoder, name)
    if encoder_weights is not None:
        path = _find_weights_file(backbone, spec, encoder_weights)
        _load_encoder_state(model.encoder, _read_state_dict(path), in_channels, path)
    return model


def build_run_model(spec: ModelSpec, num_classes: int, *, seed: int, dp: bool = False) -> nn.Module:
    """The run's UNet, initialised identically everywhere (server, vehicles, baseline) from ``seed``.

    ``dp``: the DP-compatible variant (GroupNorm, out-of-place residuals). Server and vehicles
    must agree on it, since GroupNorm has no running-statistics buffers.
    """
    torch.manual_seed(seed)
    model = build_model(spec.name, num_classes, encoder_weights=spec.encoder_weights,
                        decoder_channels=spec.decoder_channels)
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
    with torch.device("meta"):
        model = build_run_model(spec, num_classes, seed=0, dp=dp)
    model = model.to_empty(device="cpu")
    set_weights(model, arrays)
    return model


# Which parameters local training updates (``privacy.trainable``): the rest stay as received.
TRAINABLE_PARTS: tuple[TrainablePart, ...] = typing.get_args(TrainablePart)


def set_trainable(model: nn.Module, part: str) -> int:
    """Freeze all but ``part`` of a UNet (``all``; ``decoder``: decoder and segmentation head, the
    encoder frozen, so no gradient flows through it). Returns the number of trainable parameters."""
    if part not in TRAINABLE_PARTS:
        raise ValueError(f"trainable={part!r}; valid: {list(TRAINABLE_PARTS)}")
    for name, param in model.named_parameters():
        param.requires_grad_(part == "all" or not name.startswith("encoder."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


# ---------------------------------------------------------------- local pretrained weights

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _find_weights_file(backbone: str, spec: BackboneSpec, weights: str) -> Path:
    """Resolve ``encoder_weights`` to an existing local file, never touching the network."""
    given = Path(weights).expanduser()
    if given.is_file():
        return given
    if given.suffix in _WEIGHT_SUFFIXES or os.sep in weights:
        raise FileNotFoundError(f"encoder_weights file {str(given)!r} does not exist")
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    looked = [hub_dir / f"{backbone}-{weights}{suffix}" for suffix in (".safetensors", ".pth")]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    hf_repo, hf_file = _cached_hf_weights(spec, weights)
    if hf_file is not None:
        return hf_file
    places = [str(p) for p in looked] + [f"Hugging Face cache, repo {hf_repo!r}" if hf_repo else "no HF repo"]
    raise FileNotFoundError(
        f"encoder_weights={weights!r} for backbone {backbone!r} ({spec.encoder}): no local copy found, "
        f"and fedseg never downloads. Looked in: {'; '.join(places)}. Provide the file: pass "
        f"encoder_weights='/path/to/encoder.safetensors' (or .pth, an encoder or UNet state dict), "
        f"or put it at {looked[0]}."
    )


def _cached_hf_weights(spec: BackboneSpec, weights: str) -> tuple[str | None, Path | None]:
    """(repo id, cached file or None) for a named weight set, from the local HF cache only."""
    from huggingface_hub import hf_hub_download

    repo, revision = None, None
    if spec.encoder.startswith("tu-"):
        import timm

        timm_name = spec.encoder[3:] if weights == "imagenet" else f"{spec.encoder[3:]}.{weights}"
        cfg = timm.models.get_pretrained_cfg(timm_name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    else:
        import segmentation_models_pytorch as smp

        settings = smp.encoders.encoders[spec.encoder]["pretrained_settings"]
        if weights not in settings:
            raise ValueError(
                f"unknown weights {weights!r} for encoder {spec.encoder!r}; valid: {sorted(settings)}"
            )
        repo, revision = settings[weights]["repo_id"], settings[weights]["revision"]
    if repo is None:
        return None, None
    try:
        found = hf_hub_download(
            repo, "model.safetensors", revision=revision, local_files_only=True,
            cache_dir=os.environ.get("HF_HUB_CACHE"),  # read now, not at huggingface_hub import
        )
    except Exception:  # noqa: BLE001 - any miss (offline, not cached) means "not here"
        return repo, None
    return repo, Path(found)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file; unwrap common checkpoint layouts."""
    loaded: Any  # a torch file may hold any (weights-only) structure; checked below
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(path), device="cpu")
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise TypeError(f"{path} does not hold a state dict")
    state: dict[str, torch.Tensor] = {k.removeprefix("module."): v for k, v in loaded.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole-UNet checkpoint: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _load_encoder_state(
    encoder: nn.Module, state: dict[str, torch.Tensor], in_channels: int, path: Path
) -> None:
    """Load ``state`` into the encoder (or its timm model), adapting a 3-channel stem if needed."""
    from timm.models import adapt_input_conv

    # smp-native files match the encoder; timm checkpoints match the wrapped timm model.
    inner = getattr(encoder, "model", None)
    targets: list[nn.Module] = [encoder, *([inner] if isinstance(inner, nn.Module) else [])]
    target = max(targets, key=lambda m: len(state.keys() & m.state_dict().keys()))
    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of {len(own)} encoder tensors, e.g. {missing[:3]}")
    selected = {}
    for key, current in own.items():
        if key not in state:
            continue
        value = state[key]
        if value.shape != current.shape:
            if value.ndim == 4 and value.shape[1] == 3 and current.shape[1] == in_channels:
                value = adapt_input_conv(in_channels, value)  # the stem, for in_channels != 3
            else:
                raise ValueError(
                    f"{path}: {key!r} has shape {tuple(value.shape)}, encoder wants {tuple(current.shape)}"
                )
        selected[key] = value
    nn.Module.load_state_dict(target, selected, strict=False)  # skip smp's key-renaming overrides
