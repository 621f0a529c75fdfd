"""Measure one model on this machine: size, compute, latency, peak memory (inference and DP-SGD), INT8.

Following ProxylessNAS / Once-for-All, latency is *measured* on the machine that runs the search,
not predicted from MACs: light encoders save MACs that a wide UNet decoder then spends anyway.

How each number is obtained (all at batch 1 unless stated):

* ``params``: trainable and frozen parameters (equals ``fedseg.models.count_parameters``).
* ``macs``: ``torch.utils.flop_counter.FlopCounterMode`` flops / 2 for one forward pass
  (convolutions and matrix products; elementwise ops are not counted, as is customary).
* ``size_mb``: bytes of the ``torch.save``'d fp32 state dict. 1 MB = 2**20 bytes throughout.
* ``latency_ms`` / ``latency_p95_ms``: median and 95th percentile of ``repeats`` timed forwards
  after ``warmup`` untimed ones, with torch set to ``threads`` threads (restored afterwards; see
  :mod:`fedseg.measurement`, which also times ``fedseg-export``). The sim package sets
  ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (see ``fedseg/sim/__init__.py``): with spinning OpenMP
  workers, timings on cores shared with other work swing by 10x.
* ``memory_mb`` (peak inference memory): the model's parameters, buffers and the input, plus the
  peak of *live tensor storage* during one forward (:func:`fedseg.measurement.inference_memory_mb`:
  each new storage counted once, uncounted when Python frees it; deterministic, unlike RSS).
* ``train_step_memory_mb``: the same peak over one plain Adam step at the training batch and size.
* ``dp_step_memory_mb``: the same peak over one Opacus DP-SGD step (forward, per-sample clipping,
  noise, optimizer step) of the DP-compatible model (``fedseg._dp_compat.make_dp_compatible``) with
  Adam, at the training batch size and image size; ``None`` with ``dp_note`` saying why when it
  cannot be measured.
* INT8: the model is exported to ONNX and statically quantized (``fedseg.export``); latencies are
  ONNX Runtime's with the same thread count, next to ONNX fp32 for a like-for-like ratio.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedseg.export import deployable, export_onnx, quantize_int8
from fedseg.labels import IGNORE_INDEX
from fedseg.measurement import (
    MB,
    inference_memory_mb,
    onnx_latency,
    state_dict_mb,
    step_memory_mb,
    torch_latency,
    torch_threads,
)
from fedseg.privacy import DEFAULT_GRAD_SAMPLE_MODE


@dataclass(frozen=True)
class Profile:
    """What one model costs on this machine (see the module docstring for how each is measured)."""

    params: int
    macs: int
    size_mb: float
    latency_ms: float
    latency_p95_ms: float
    memory_mb: float
    image_size: tuple[int, int]
    threads: int
    train_step_memory_mb: float | None = None  # plain Adam step at the training batch and size
    dp_step_memory_mb: float | None = None  # Opacus DP-SGD step, same batch and size
    dp_note: str = ""
    onnx_latency_ms: float | None = None  # ONNX Runtime fp32, batch 1
    int8_latency_ms: float | None = None  # ONNX Runtime INT8 (QDQ), batch 1
    int8_latency_p95_ms: float | None = None
    int8_size_mb: float | None = None
    int8_note: str = ""


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward (FLOP counter's flops / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops()) // 2


def dp_step_memory_mb(model: nn.Module, *, batch_size: int, image_size: Sequence[int],
                      num_classes: int) -> tuple[float | None, str]:
    """Peak memory of one DP-SGD step of a DP-compatible copy of ``model``, or (None, reason)."""
    try:  # Opacus (and timm, through _dp_compat) only where a DP step is measured
        from opacus import PrivacyEngine

        from fedseg._dp_compat import PerSampleSegmentationLoss, make_dp_compatible
    except ImportError as err:  # DP is an optional feature of the search
        return None, f"DP not available: {err}"
    try:
        return _dp_step_peak(model, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                             make_dp_compatible=make_dp_compatible, mode=DEFAULT_GRAD_SAMPLE_MODE,
                             criterion=PerSampleSegmentationLoss(), engine_cls=PrivacyEngine)
    except Exception as err:  # noqa: BLE001  (a backbone Opacus cannot wrap is a finding, not a crash)
        return None, f"DP step failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _dp_step_peak(model: nn.Module, *, batch_size: int, image_size: Sequence[int], num_classes: int,
                  make_dp_compatible: Any, mode: str, criterion: nn.Module,
                  engine_cls: Any) -> tuple[float, str]:
    dp_model = make_dp_compatible(model).train()
    x, y = _random_batch(batch_size, image_size, num_classes)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.Adam(dp_model.parameters(), lr=1e-3)
    kwargs: dict[str, Any] = {"criterion": criterion} if mode == "ghost" else {}
    # "Secure RNG turned off", and Opacus' hooks "firing ... since no inputs require grad" (the batch needs
    # none): irrelevant to a memory measurement, and once per candidate in fedseg-search's log otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapped = engine_cls().make_private(
            module=dp_model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode=mode, poisson_sampling=False, **kwargs)  # fixed batch: a steady measurement
        dp_module, dp_optimizer = wrapped[0], wrapped[1]
        criterion = wrapped[2] if mode == "ghost" else criterion
        peak = step_memory_mb(dp_module, dp_optimizer, criterion, x, y)
    return peak, f"opacus grad_sample_mode={mode}, batch {batch_size} at {tuple(x.shape[-2:])}"


def train_step_memory_mb(model: nn.Module, *, batch_size: int, image_size: Sequence[int],
                         num_classes: int) -> float:
    """Peak memory of one plain (non-DP) Adam step of a copy of ``model``, for runs without DP."""
    train_model = copy.deepcopy(model).train()
    x, y = _random_batch(batch_size, image_size, num_classes)
    optimizer = torch.optim.Adam(train_model.parameters(), lr=1e-3)
    return step_memory_mb(train_model, optimizer, nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), x, y)


def _random_batch(batch_size: int, image_size: Sequence[int], num_classes: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    height, width = int(image_size[0]), int(image_size[1])
    x = torch.randn(batch_size, 3, height, width, generator=generator)
    return x, torch.randint(0, num_classes, (batch_size, height, width), generator=generator)


def int8_measurements(model: nn.Module, *, image_size: Sequence[int], threads: int, repeats: int,
                      warmup: int, calibration_images: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """ONNX fp32 and INT8 latency plus INT8 file size; on failure, Nones and the reason in ``int8_note``."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", image_size=image_size)
            int8 = Path(tmp) / "int8.onnx"
            granularity = quantize_int8(fp32, int8, calibration_images)
            fp32_latency = onnx_latency(fp32, image_size, threads=threads, repeats=repeats, warmup=warmup)
            int8_latency = onnx_latency(int8, image_size, threads=threads, repeats=repeats, warmup=warmup)
            return {"onnx_latency_ms": fp32_latency.median_ms, "int8_latency_ms": int8_latency.median_ms,
                    "int8_latency_p95_ms": int8_latency.p95_ms, "int8_size_mb": int8.stat().st_size / MB,
                    "int8_note": f"onnxruntime static QDQ, {granularity} weights"}
    except Exception as err:  # noqa: BLE001  (one encoder failing to export must not end the search)
        return {"int8_note": f"INT8 failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def _training_memory(model: nn.Module, *, batch_size: int, image_size: Sequence[int], num_classes: int,
                     dp: bool) -> dict[str, Any]:
    """``train_step_memory_mb`` and, with ``dp``, ``dp_step_memory_mb`` and ``dp_note``."""
    measured: dict[str, Any] = {"train_step_memory_mb": train_step_memory_mb(
        model, batch_size=batch_size, image_size=image_size, num_classes=num_classes)}
    if dp:
        measured["dp_step_memory_mb"], measured["dp_note"] = dp_step_memory_mb(
            model, batch_size=batch_size, image_size=image_size, num_classes=num_classes)
    return measured


def profile_model(model: nn.Module, *, image_size: Sequence[int], threads: int = 2, warmup: int = 3,
                  repeats: int = 20, train_batch_size: int | None = None,
                  train_image_size: Sequence[int] | None = None, dp: bool = False,
                  int8_calibration: np.ndarray | torch.Tensor | None = None) -> Profile:
    """Measure ``model`` on this machine at batch 1 and ``image_size`` (H, W) with ``threads`` threads.

    Inference numbers are taken on the deployable form (:func:`fedseg.export.deployable`: eval mode,
    MobileOne branches fused), ``params`` on ``model`` as trained. ``train_batch_size``: also
    measure one training step at that batch size and ``train_image_size`` (default ``image_size``),
    plain and, with ``dp``, under DP-SGD. ``int8_calibration``: also export and quantize to INT8,
    calibrated on these (N,3,H,W) frames at ``image_size``. ``model`` is not modified; torch's
    thread count is restored.
    """
    height, width = int(image_size[0]), int(image_size[1])
    with torch_threads(threads):
        deployed = deployable(model)
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        latency = torch_latency(deployed, x, warmup=warmup, repeats=repeats)
        with torch.inference_mode():
            num_classes = int(deployed(x).shape[1])
        profile: dict[str, Any] = {
            "params": sum(p.numel() for p in model.parameters()), "macs": count_macs(deployed, x),
            "size_mb": state_dict_mb(deployed), "latency_ms": latency.median_ms,
            "latency_p95_ms": latency.p95_ms, "memory_mb": inference_memory_mb(deployed, x),
            "image_size": (height, width), "threads": int(threads),
            "dp_note": "not requested", "int8_note": "not requested",
        }
        if train_batch_size:
            profile.update(_training_memory(model, batch_size=train_batch_size, num_classes=num_classes,
                                            image_size=train_image_size or image_size, dp=dp))
        if int8_calibration is not None:
            profile.update(int8_measurements(model, image_size=image_size, threads=threads, repeats=repeats,
                                             warmup=warmup, calibration_images=int8_calibration))
        return Profile(**profile)
