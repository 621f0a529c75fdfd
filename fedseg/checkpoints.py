"""Checkpoints: the global model plus what rebuilding it anywhere needs (export, edge boxes, resume).

A checkpoint is one ``torch.save`` file holding ``model_state`` and plain metadata (backbone, classes,
image size, the run's config, round). Loading uses ``weights_only=True``: no arbitrary object is ever
unpickled, and a file that is not a fedseg checkpoint gets a one-line error naming it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedseg.config import DataSpec, ModelSpec
from fedseg.labels import LabelMap
from fedseg.models import build_model

REQUIRED_KEYS = ("model_state", "backbone", "num_classes")


def checkpoint_meta(model: ModelSpec, data: DataSpec, label_map: LabelMap, extra: dict[str, Any]
                    ) -> dict[str, Any]:
    """What a checkpoint needs besides the weights to be rebuilt anywhere (export, edge boxes)."""
    return {
        "backbone": model.name,
        "decoder_channels": list(model.decoder_channels) if model.decoder_channels else None,
        "encoder_depth": model.encoder_depth,
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
    except pickle.UnpicklingError as err:
        if not _looks_like_torch_file(path):  # a text file or any other bytes fail in the unpickler too
            raise ValueError(f"{path} is not a fedseg checkpoint: not a torch file") from err
        # a torch/pickle file holding more than tensors and plain data
        raise ValueError(f"{path} is not a fedseg checkpoint: it holds objects other than tensors and "
                         "plain metadata, which fedseg never unpickles") from err
    except Exception as err:  # zip, EOF and torch errors alike: not a torch file at all
        raise ValueError(f"{path} is not a fedseg checkpoint: not a torch file ({type(err).__name__})") from err
    missing = [key for key in REQUIRED_KEYS if not isinstance(content, dict) or key not in content]
    if missing:
        raise ValueError(f"{path} is not a fedseg checkpoint: it lacks {missing}")
    return content


def _looks_like_torch_file(path: Path) -> bool:
    """``torch.save``'s zip archive, or its legacy format (a pickle stream: protocol byte 0x80 first)."""
    with path.open("rb") as file:
        if zipfile.is_zipfile(file):
            return True
        file.seek(0)
        return file.read(1) == b"\x80"


def norm_form(state_keys: Iterable[str]) -> Literal["batch", "group"]:
    """The normalization a state dict was saved with: ``batch`` (BatchNorm running statistics), else
    ``group`` (the DP-compatible GroupNorm form, ``model.norm=group``, which has no running statistics)."""
    return "batch" if any(key.endswith("running_mean") for key in state_keys) else "group"


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the UNet saved at ``path`` (``<run_dir>/checkpoints/global.pt``); returns (model, metadata).

    A DP run's model has GroupNorm where the registry's has BatchNorm: the rebuild takes the form
    the saved weights have (:func:`norm_form`).
    """
    content = read_checkpoint(path)
    model = build_model(content["backbone"], int(content["num_classes"]),
                        decoder_channels=content.get("decoder_channels"),
                        encoder_depth=content.get("encoder_depth"))
    state = content["model_state"]
    if norm_form(state) != norm_form(model.state_dict()):
        # Here, not at the top: Opacus and timm, which fedseg-sim (runlog imports this module) avoids.
        from fedseg._dp_compat import make_dp_compatible

        model = make_dp_compatible(model)
    if set(model.state_dict()) != set(state):
        extra = sorted(set(state) - set(model.state_dict()))[:3]
        raise ValueError(f"{path}: weights do not match backbone {content['backbone']!r} (plain or "
                         f"DP-compatible), e.g. unexpected keys {extra}")
    model.load_state_dict(state)
    return model.eval(), {k: v for k, v in content.items() if k != "model_state"}


_NORM_NAMES = {"batch": "BatchNorm", "group": "GroupNorm"}


def load_initial_weights(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Load ``spec.init`` (a fedseg checkpoint) into ``model``, the run's freshly built UNet.

    The checkpoint must hold this backbone, class count and normalization form; a mismatch is a
    one-line ``ValueError`` naming the file and what differs. Returns ``model``.
    """
    if spec.init is None:
        return model
    content = read_checkpoint(spec.init)
    state, expected = content["model_state"], model.state_dict()
    head = list(expected.values())[-1]  # the segmentation head's bias: one value per class
    if content["backbone"] != spec.name or int(content["num_classes"]) != head.shape[0]:
        raise ValueError(f"model.init={spec.init}: a {content['backbone']} model with {content['num_classes']} "
                         f"classes; this run builds {spec.name} with {head.shape[0]}")
    if set(state) != set(expected):
        saved, run = norm_form(state), norm_form(expected)
        if saved != run:
            raise ValueError(f"model.init={spec.init} was trained with {_NORM_NAMES[saved]}, this run's model has "
                             f"{_NORM_NAMES[run]}: train it with model.norm={run} (DP-SGD and central DP need group)")
        raise ValueError(f"model.init={spec.init}: its weights do not match this run's model "
                         f"(e.g. {sorted(set(state) ^ set(expected))[:3]}; different decoder_channels?)")
    model.load_state_dict(state)
    return model


def check_start_checkpoint(path: str | Path, *, key: str, model: ModelSpec, data: DataSpec, label_map: LabelMap,
                           group_norm: bool) -> dict[str, Any]:
    """Read the checkpoint a run starts from (``key``: ``model.init``, or ``resume``'s ``global.pt``) and
    compare its metadata with what the run builds; returns its contents.

    Missing, not a checkpoint, or another backbone, decoder, class list, image size or normalization
    (BatchNorm vs GroupNorm) is one ``FileNotFoundError``/``ValueError`` line naming ``key``, the file
    and what differs. Only metadata and the weights' key names are read, so no model is built: the
    entry points call this before any data is rendered or Ray or a SuperLink starts.
    """
    try:
        content = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{key}: {err}") from None
    differs = []
    saved_classes = [str(name) for name in content.get("class_names") or []]
    if int(content["num_classes"]) != label_map.num_classes:
        differs.append(f"{content['num_classes']} classes (this run: {label_map.num_classes})")
    elif saved_classes and saved_classes != list(label_map.class_names):
        differs.append(f"classes {saved_classes} (this run: {list(label_map.class_names)})")
    run_decoder = list(model.decoder_channels) if model.decoder_channels else None
    for what, saved, run in (("backbone", content["backbone"], model.name),
                             ("decoder_channels", content.get("decoder_channels"), run_decoder),
                             ("encoder_depth", content.get("encoder_depth"), model.encoder_depth),
                             ("image_size", content.get("image_size"), list(data.image_size))):
        if what == "image_size" and saved is None:  # not recorded: nothing to compare
            continue
        if saved != run:
            differs.append(f"{what} {saved} (this run: {run})")
    saved_norm, run_norm = norm_form(content["model_state"]), "group" if group_norm else "batch"
    if saved_norm != run_norm:
        differs.append(f"{_NORM_NAMES[saved_norm]} (this run: {_NORM_NAMES[run_norm]}, model.norm={run_norm})")
    if differs:
        raise ValueError(f"{key}={Path(path).expanduser()} does not fit this run: {'; '.join(differs)}")
    return content
