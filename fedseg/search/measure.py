"""Measure each candidate backbone: cost on this machine, accuracy after an equal, fixed training budget.

Every candidate gets the same seed, frames, epochs, batch size, optimizer and learning rate, so the
mIoU differences are the backbones', not the budget's (ProxylessNAS/OFA-style "train each briefly,
rank on a proxy"). The budget is short, so the ranking is a proxy for the fully-trained one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Subset

from fedseg.data import FleetData
from fedseg.export import deployable
from fedseg.measurement import calibration_images, interleaved_latency, round_robin_indices
from fedseg.metrics import scores
from fedseg.models import BACKBONES, build_model
from fedseg.search.hardware import HardwareBudget
from fedseg.search.profile import Profile, profile_model
from fedseg.search.select import Candidate
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

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"search.precision={self.precision!r}; valid: {list(PRECISIONS)}")
        if self.precision == "int8" and not self.int8:
            raise ValueError("search.precision=int8 needs search.int8=true "
                             "(INT8 must be measured to be checked)")
        for name in ("train_epochs", "batch_size", "repeats", "calibration_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")


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
    """One candidate's measurements."""

    name: str
    family: str
    profile: Profile
    miou: float | None  # None: not trained (not DP-capable under DP)
    pixel_acc: float | None
    train_loss: float | None
    train_s: float


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
                                                               epochs=spec.train_epochs)
    start = time.perf_counter()
    result = train(trained, loader, optimizer, epochs=spec.train_epochs, criterion=criterion, device=device)
    seconds = time.perf_counter() - start
    if privacy is not None:
        privacy.commit()  # removes Opacus' hooks: ``model`` evaluates as a plain module
    heldout = make_loader(data.heldout, batch_size=spec.batch_size, shuffle=False, seed=seed)
    evaluation = evaluate(model, heldout, num_classes=data.num_classes, device=device)
    s = scores(evaluation.confmat, list(data.class_names))
    return float(s["miou"]), float(s["pixel_acc"]), float(result.loss), seconds


def measure_backbone(name: str, data: SearchData, spec: SearchSpec, budget: HardwareBudget, *,
                     seed: int, threads: int, dp: Any = None, device: str = "cpu") -> BackboneResult:
    """Profile ``name`` at the budget's image size and threads, then train it and score it.

    The DP-SGD step's memory is always measured; ``dp`` (a ``DPSpec``) also trains under DP.
    """
    torch.manual_seed(seed)  # every candidate starts from the same seed
    model = build_model(name, data.num_classes)
    profile = profile_model(
        model, image_size=budget.image_size, threads=threads, warmup=spec.warmup, repeats=spec.repeats,
        train_batch_size=spec.batch_size, train_image_size=data.train_image_size, dp=True,  # always reported
        int8_calibration=data.calibration if spec.int8 else None)
    miou, pixel_acc, loss, seconds = train_and_score(model, data, spec, seed=seed, dp=dp, device=device)
    return BackboneResult(name, BACKBONES[name].family, profile, miou, pixel_acc, loss, seconds)


def retime_interleaved(results: Sequence[BackboneResult], num_classes: int, budget: HardwareBudget, *,
                       threads: int, repeats: int) -> list[BackboneResult]:
    """``results`` with PyTorch fp32 latency re-measured by :func:`interleaved_latency` (same run)."""
    models = {r.name: deployable(build_model(r.name, num_classes)) for r in results}  # weights don't matter
    latency = interleaved_latency(models, budget.image_size, threads=threads, repeats=repeats)
    return [dataclasses.replace(r, profile=dataclasses.replace(
        r.profile, latency_ms=latency[r.name].median_ms, latency_p95_ms=latency[r.name].p95_ms))
        for r in results]


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
