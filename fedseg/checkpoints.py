"""Checkpoints: the global model plus what rebuilding it anywhere needs (export, edge boxes, resume).

A checkpoint is one ``torch.save`` file holding ``model_state`` and plain metadata (backbone, classes,
image size, the run's config, round). Loading uses ``weights_only=True``: no arbitrary object is ever
unpickled, and a file that is not a fedseg checkpoint gets a one-line error naming it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedseg.config import DataSpec, ModelSpec
from fedseg.labels import LabelMap

REQUIRED_KEYS = ("model_state", "backbone", "num_classes")


def checkpoint_meta(model: ModelSpec, data: DataSpec, label_map: LabelMap, extra: dict[str, Any]
                    ) -> dict[str, Any]:
    """What a checkpoint needs besides the weights to be rebuilt anywhere (export, edge boxes)."""
    return {
        "backbone": model.name,
        "decoder_channels": list(model.decoder_channels) if model.decoder_channels else None,
        "num_classes": label_map.num_classes,
        "class_names": list(label_map.class_names),
        "tagset": data.tagset,
        "task": data.task,
        "input": data.input,
        "image_size": list(data.image_size),
        **extra,
    }


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s state and ``meta`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model_state": model.state_dict(), **meta}, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain metadata only); a one-line error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected <run_dir>/checkpoints/global.pt "
                                "written by fedseg-sim or fedseg-train)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a torch/pickle file holding more than tensors and plain data
        raise ValueError(f"{path} is not a fedseg checkpoint: it holds objects other than tensors and "
                         "plain metadata, which fedseg never unpickles") from err
    except Exception as err:  # zip, EOF and torch errors alike: not a torch file at all
        raise ValueError(f"{path} is not a fedseg checkpoint: not a torch file ({type(err).__name__})") from err
    missing = [key for key in REQUIRED_KEYS if not isinstance(content, dict) or key not in content]
    if missing:
        raise ValueError(f"{path} is not a fedseg checkpoint: it lacks {missing}")
    return content


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the UNet saved at ``path`` (``<run_dir>/checkpoints/global.pt``); returns (model, metadata).

    A DP run's model has GroupNorm where the registry's has BatchNorm, so the DP-compatible rebuild
    is tried when the plain one does not match the saved keys.
    """
    from fedseg._dp_compat import make_dp_compatible
    from fedseg.models import build_model

    content = read_checkpoint(path)
    model = build_model(content["backbone"], int(content["num_classes"]),
                        decoder_channels=content.get("decoder_channels"))
    state = content["model_state"]
    for candidate in (model, make_dp_compatible(model)):
        if set(candidate.state_dict()) == set(state):
            candidate.load_state_dict(state)
            return candidate.eval(), {k: v for k, v in content.items() if k != "model_state"}
    extra = sorted(set(state) - set(model.state_dict()))[:3]
    raise ValueError(f"{path}: weights do not match backbone {content['backbone']!r} (plain or DP-compatible), "
                     f"e.g. unexpected keys {extra}")
