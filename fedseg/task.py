"""What the Flower apps and the centralized baseline share: the run's model and data.

Kept here (not in ``clients/``/``server/``) so the apps stay thin adapters and so the centralized
baseline trains the very same model on the very same split.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedseg.config import DataSpec, ModelSpec
from fedseg.data import FleetData, load_data
from fedseg.models import build_model


@functools.lru_cache(maxsize=4)
def cached_data(spec: DataSpec, num_clients: int, seed: int, progress: bool = False) -> FleetData:
    """Load (once per process) the fleet; Ray reuses actor processes across rounds.

    Files are not re-validated here: the entry point (``fedseg-sim``) has checked them once.
    """
    return load_data(spec, num_clients=num_clients, seed=seed, progress=progress, check=False)


def run_model(spec: ModelSpec, num_classes: int, *, seed: int, dp: bool = False) -> torch.nn.Module:
    """The run's UNet, initialised identically everywhere from ``seed``.

    ``dp``: the DP-SGD-compatible variant (GroupNorm, out-of-place residuals). Server and vehicles
    must agree on it, since GroupNorm has no running-statistics buffers.
    """
    torch.manual_seed(seed)
    model = build_model(spec.backbone, num_classes, encoder_weights=spec.encoder_weights,
                        decoder_channels=spec.decoder_channels)
    if dp:
        from fedseg.privacy import check_dp_capable, make_dp_compatible

        check_dp_capable(spec.backbone)
        model = make_dp_compatible(model)
    return model


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A loader whose shuffling is reproducible from ``seed`` (no worker processes: tiny frames)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from (run seed, round, vehicle, ...), independent of hash randomisation."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def model_meta(spec: ModelSpec, data: FleetData, data_spec: DataSpec, extra: dict[str, Any]) -> dict:
    """What a checkpoint needs besides the weights to be rebuilt anywhere (export, edge boxes)."""
    return {
        "backbone": spec.backbone,
        "decoder_channels": list(spec.decoder_channels) if spec.decoder_channels else None,
        "num_classes": data.label_map.num_classes,
        "class_names": list(data.label_map.class_names),
        "tagset": data_spec.tagset,
        "task": data_spec.task,
        "input": data_spec.input,
        "image_size": list(data_spec.image_size),
        **extra,
    }
