"""Pretrained encoder weights from local files and caches only: fedseg never downloads.

``model.encoder_weights`` is a path to a ``.safetensors``/``.pth``/``.pt`` file (an encoder or whole-UNet
state dict, also timm's own checkpoints), or a weights name such as ``"imagenet"``, looked up in the
torch hub and Hugging Face caches that are already on this machine. A miss is a ``FileNotFoundError``
saying where it looked and where to put the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def load_encoder_weights(encoder_module: nn.Module, weights: str, *, backbone: str, encoder: str,
                         in_channels: int) -> None:
    """Load ``weights`` (a file, or a name found in the local caches) into a UNet's ``encoder_module``.

    ``backbone``: the registry name (``fedseg.models.BACKBONES``); ``encoder``: its smp encoder name
    (``tu-NAME`` for timm). A 3-channel stem is adapted when ``in_channels`` differs.
    """
    path = _find_weights_file(backbone, encoder, weights)
    _load_encoder_state(encoder_module, _read_state_dict(path), in_channels, path)


def _find_weights_file(backbone: str, encoder: str, weights: str) -> Path:
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
    hf_repo, hf_file = _cached_hf_weights(encoder, weights)
    if hf_file is not None:
        return hf_file
    places = [str(p) for p in looked] + [f"Hugging Face cache, repo {hf_repo!r}" if hf_repo else "no HF repo"]
    raise FileNotFoundError(
        f"encoder_weights={weights!r} for backbone {backbone!r} ({encoder}): no local copy found, "
        f"and fedseg never downloads. Looked in: {'; '.join(places)}. Provide the file: pass "
        f"encoder_weights='/path/to/encoder.safetensors' (or .pth, an encoder or UNet state dict), "
        f"or put it at {looked[0]}."
    )


def _cached_hf_weights(encoder: str, weights: str) -> tuple[str | None, Path | None]:
    """(repo id, cached file or None) for a named weight set, from the local HF cache only."""
    from huggingface_hub import hf_hub_download

    repo, revision = None, None
    if encoder.startswith("tu-"):
        import timm

        timm_name = encoder[3:] if weights == "imagenet" else f"{encoder[3:]}.{weights}"
        cfg = timm.models.get_pretrained_cfg(timm_name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    else:
        import segmentation_models_pytorch as smp

        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        if weights not in settings:
            raise ValueError(
                f"unknown weights {weights!r} for encoder {encoder!r}; valid: {sorted(settings)}"
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
