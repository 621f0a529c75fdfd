"""Measure each candidate network: cost on this machine, accuracy after an equal training budget.

A candidate is an :class:`fedseg.search.space.Architecture` (backbone, decoder width, encoder depth,
input resolution). Its cost is measured once; its accuracy by :func:`score_architecture`, which
successive halving (:mod:`fedseg.search.halving`) calls with growing budgets. Every candidate gets
the same seed, frames, batch size, optimizer and learning rate, so within a rung the mIoU
differences are the networks', not the budget's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from fedseg.data import FleetData
from fedseg.export import AtResolution, deployable
from fedseg.measurement import calibration_images, interleaved_latency, round_robin_indices
from fedseg.metrics import scores
from fedseg.models import BACKBONES, build_model
from fedseg.search.hardware import HardwareBudget
from fedseg.search.profile import Profile, profile_model
from fedseg.search.select import Candidate
from fedseg.search.space import Architecture
from fedseg.training import evaluate, make_loader, make_optimizer, steps_per_epoch, train

PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class SearchSpec:
    """The ``search`` block of ``conf/search.yaml``."""

    backbones: tuple[str, ...] | None = None
    reference: str = "resnet34"
    train_epochs: int = 3
    train_frames: int | None = 96
    eval_frames: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"
    warmup: int = 3
    repeats: int = 20
    int8: bool = True
    calibration_frames: int = 8
    precision: str = "fp32"
    # Search dimensions beside the backbone (fedseg.search.space):
    decoder_scales: tuple[float, ...] = (1.0,)  # times the registry's decoder_channels
    encoder_depths: tuple[int | None, ...] = (None,)  # None: the registry's depth
    image_sizes: tuple[tuple[int, int], ...] | None = None  # deployment (H, W); None: the profile's
    # Successive halving (fedseg.search.halving): rung r trains train_epochs * eta**r epochs.
    rungs: int = 1
    eta: int = 2
    stability_seeds: tuple[int, ...] = ()  # the last rung retrained with each: does the order hold?

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"search.precision={self.precision!r}; valid: {list(PRECISIONS)}")
        if self.precision == "int8" and not self.int8:
            raise ValueError("search.precision=int8 needs search.int8=true "
                             "(INT8 must be measured to be checked)")
        for name in ("train_epochs", "batch_size", "repeats", "calibration_frames", "rungs"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.eta < 2:
            raise ValueError(f"search.eta must be >= 2 (each rung keeps 1/eta), got {self.eta}")
        for key in ("decoder_scales", "encoder_depths", "image_sizes"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"search.{key} is empty; give at least one value")
        if any(scale <= 0 for scale in self.decoder_scales):
            raise ValueError(f"search.decoder_scales={list(self.decoder_scales)}: every scale must be > 0")
        if any(depth is not None and not 1 <= depth <= 5 for depth in self.encoder_depths):
            raise ValueError(f"search.encoder_depths={list(self.encoder_depths)}: valid: null or 1 to 5")
        if any(min(size) < 1 for size in self.image_sizes or ()):
            raise ValueError(f"search.image_sizes={self.image_sizes}: every [H, W] must be positive")


@dataclass(frozen=True)
class SearchData:
    """What every candidate is trained and evaluated on (identical for all of them)."""

    train: Subset[Any]
    heldout: Subset[Any]
    num_classes: int
    class_names: tuple[str, ...]
    train_image_size: tuple[int, int]
    calibration: torch.Tensor  # (N,3,H,W) training frames at the deployment image size


@dataclass(frozen=True)
class BackboneResult:
    """One candidate's measurements (``name`` is its :class:`Architecture`'s)."""

    name: str
    family: str
    profile: Profile
    miou: float | None  # None: not trained (over budget, or not DP-capable under DP)
    pixel_acc: float | None
    train_loss: float | None
    train_s: float
    architecture: Architecture | None = None
    epochs: int | None = None  # the budget ``miou`` was reached with (its successive-halving rung's)


def resolve_backbones(names: Sequence[str] | None) -> list[str]:
    """The backbones to search, in order; ``None``: every registry entry but the test-only ones."""
    if names is None:
        return [name for name, backbone in BACKBONES.items() if not backbone.test_only]
    unknown = [name for name in names if name not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown} in search.backbones; valid: {sorted(BACKBONES)}")
    if not names:
        raise ValueError(f"search.backbones is empty; name some of {sorted(BACKBONES)} or null for all")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def prepare_data(fleet: FleetData, spec: SearchSpec, *, train_image_size: Sequence[int],
                 deploy_image_size: Sequence[int]) -> SearchData:
    """Pool the vehicles' frames (each vehicle represented), cut the held-out set, take calibration frames."""
    order = round_robin_indices([len(d) for d in fleet.clients], spec.train_frames)
    pooled: Subset[Any] = Subset(ConcatDataset(fleet.clients), order)
    count = len(fleet.heldout) if spec.eval_frames is None else min(spec.eval_frames, len(fleet.heldout))
    heldout: Subset[Any] = Subset(fleet.heldout, list(range(count)))
    if len(heldout) == 0 or len(pooled) == 0:
        raise ValueError(f"search needs training and held-out frames; got {len(pooled)} and "
                         f"{len(fleet.heldout)}")
    # Calibration frames are the first training frames (same round-robin order), as in fedseg-export:
    # held-out frames stay unseen.
    calibration = calibration_images(fleet.clients, min(spec.calibration_frames, len(pooled)),
                                     deploy_image_size)
    return SearchData(pooled, heldout, fleet.label_map.num_classes, tuple(fleet.label_map.class_names),
                      (int(train_image_size[0]), int(train_image_size[1])), calibration)


def train_and_score(model: torch.nn.Module, data: SearchData, spec: SearchSpec, *, seed: int,
                    dp: Any = None, device: str = "cpu") -> tuple[float, float, float, float]:
    """Train ``model`` with the search's fixed budget; return (mIoU, pixel acc, train loss, seconds).

    ``dp``: a :class:`fedseg.privacy.DPSpec` to train under DP-SGD as the run would (a DP-compatible
    copy of ``model`` is trained; with ``target_epsilon`` the noise is calibrated to this short budget).
    """
    loader = make_loader(data.train, batch_size=spec.batch_size, shuffle=True, seed=seed)
    criterion, privacy = None, None
    if dp is not None:  # Opacus only where the search trains under DP-SGD
        from fedseg._dp_compat import make_dp_compatible
        from fedseg.dpsgd import ClientPrivacy

        model = make_dp_compatible(model)
        steps = spec.train_epochs * steps_per_epoch(len(data.train), spec.batch_size)
        privacy = ClientPrivacy(dp, num_examples=len(data.train), batch_size=spec.batch_size,
                                planned_steps=steps)
    optimizer = make_optimizer(model, name=spec.optimizer, lr=spec.lr)
    trained = model
    if privacy is not None:
        trained, optimizer, loader, criterion = privacy.attach(model, optimizer, loader, seed=seed,
                                                               epochs=spec.train_epochs, device=device)
    start = time.perf_counter()
    result = train(trained, loader, optimizer, epochs=spec.train_epochs, criterion=criterion, device=device,
                   on_empty=privacy.noise_only_step if privacy is not None else None)
    seconds = time.perf_counter() - start
    if privacy is not None:
        privacy.commit()  # removes Opacus' hooks: ``model`` evaluates as a plain module
    heldout = make_loader(data.heldout, batch_size=spec.batch_size, shuffle=False, seed=seed)
    evaluation = evaluate(model, heldout, num_classes=data.num_classes, device=device)
    s = scores(evaluation.confmat, list(data.class_names))
    return float(s["miou"]), float(s["pixel_acc"]), float(result.loss), seconds


def train_size(arch: Architecture, data: SearchData, deploy_image_size: Sequence[int]) -> tuple[int, int]:
    """The training resolution for ``arch``: the data's, scaled as ``arch``'s input is to the profile's
    (rounded to a multiple of ``2**encoder_depth``, which the UNet's skips need)."""
    if tuple(arch.image_size) == tuple(deploy_image_size):
        return data.train_image_size  # the data's own size, as every candidate had before sizes were searched
    step = 2**arch.encoder_depth
    height, width = (max(step, round(t * a / d / step) * step) for t, a, d in
                     zip(data.train_image_size, arch.image_size, deploy_image_size, strict=True))
    return height, width


def build_architecture(arch: Architecture, num_classes: int) -> nn.Module:
    """``arch``'s UNet (random init from the global seed)."""
    return build_model(arch.backbone, num_classes, decoder_channels=arch.decoder_channels,
                       encoder_depth=arch.encoder_depth)


def measure_architecture(arch: Architecture, data: SearchData, spec: SearchSpec, budget: HardwareBudget, *,
                         seed: int, threads: int) -> BackboneResult:
    """Profile ``arch`` at its input size and the budget's threads (not trained: ``miou`` is None).

    The DP-SGD step's memory is always measured, at ``arch``'s training resolution.
    """
    torch.manual_seed(seed)
    model = build_architecture(arch, data.num_classes)
    calibration = F.interpolate(data.calibration, size=arch.image_size, mode="bilinear", align_corners=False)
    profile = profile_model(
        model, image_size=arch.image_size, threads=threads, warmup=spec.warmup, repeats=spec.repeats,
        train_batch_size=spec.batch_size, train_image_size=train_size(arch, data, budget.image_size),
        dp=True, int8_calibration=calibration if spec.int8 else None)  # DP memory: always reported
    return BackboneResult(arch.name, BACKBONES[arch.backbone].family, profile, None, None, None, 0.0,
                          architecture=arch)


def score_architecture(arch: Architecture, data: SearchData, spec: SearchSpec, budget: HardwareBudget, *,
                       seed: int, epochs: int, dp: Any = None, device: str = "cpu"
                       ) -> tuple[float, float, float, float]:
    """Train ``arch`` from ``seed`` for ``epochs`` epochs; (mIoU, pixel acc, train loss, seconds)."""
    torch.manual_seed(seed)  # every candidate, every rung: the same start
    model = build_architecture(arch, data.num_classes)
    size = train_size(arch, data, budget.image_size)
    if size != data.train_image_size:
        model = AtResolution(model, size)
    return train_and_score(model, data, dataclasses.replace(spec, train_epochs=epochs), seed=seed, dp=dp,
                           device=device)


def retime_interleaved(results: Sequence[BackboneResult], num_classes: int, budget: HardwareBudget, *,
                       threads: int, repeats: int) -> list[BackboneResult]:
    """``results`` with PyTorch fp32 latency re-measured by :func:`interleaved_latency` (same run)."""
    sizes = {r.architecture.image_size for r in results if r.architecture is not None}
    timed = list(results)
    for size in sorted(sizes):  # interleaved_latency times one input size at a time
        group = {r.name: deployable(build_architecture(r.architecture, num_classes))  # weights don't matter
                 for r in results if r.architecture is not None and r.architecture.image_size == size}
        if len(group) > 1:
            latency = interleaved_latency(group, size, threads=threads, repeats=repeats)
            timed = [_with_latency(r, latency[r.name]) if r.name in latency else r for r in timed]
    return timed


def _with_latency(result: BackboneResult, latency: Any) -> BackboneResult:
    return dataclasses.replace(result, profile=dataclasses.replace(
        result.profile, latency_ms=latency.median_ms, latency_p95_ms=latency.p95_ms))


def to_candidate(result: BackboneResult, *, precision: str, dp: bool) -> Candidate:
    """The measurements the budget is checked against, for the precision that will be deployed.

    INT8 peak memory is not measured (ONNX Runtime allocates outside torch); the fp32 figure, an
    upper bound, stands in for it.
    """
    p = result.profile
    int8 = precision == "int8"
    return Candidate(
        name=result.name, miou=result.miou,
        latency_ms=p.int8_latency_ms if int8 else p.latency_ms,
        latency_p95_ms=p.int8_latency_p95_ms if int8 else p.latency_p95_ms,
        memory_mb=p.memory_mb, model_mb=p.int8_size_mb if int8 else p.size_mb, params=p.params,
        train_memory_mb=p.dp_step_memory_mb if dp else p.train_step_memory_mb)
