"""Differential privacy: the privacy registry, its typed specs, and how a vehicle trains under each.

``privacy=dpsgd``: per-frame DP-SGD on every vehicle. Each local step is Opacus' sampled Gaussian
mechanism (Poisson sampling at ``q = 1 / steps_per_epoch``, each frame's gradient clipped to
``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``); a vehicle's accountant
history outlives its process, and epsilon is always Opacus' own accountant over it. The Opacus
machinery is :mod:`fedseg.dpsgd`, imported only when a vehicle trains under DP-SGD.

The ``PRIVACY`` registry holds one typed spec per mode (``none``, ``dpsgd``, ``central``); each spec
gives the vehicle its :class:`LocalTrainer`, so DP-SGD wraps local training and a client's ``fit``
has no privacy branch. Client-level DP (``privacy=central``) is Flower's business (a strategy
wrapper and a client mod, composed in ``fedseg/server/compose.py`` and ``clients/``).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedseg.config import TrainablePart, bounded, parse_choice
from fedseg.models import set_trainable
from fedseg.training import RoundOutcome, steps_per_epoch, train

# Measured on UNet-ResNet34 (scripts/bench/dp_step.py --json, quiet machine; numbers in
# conf/privacy/dpsgd.yaml): hooks is the fastest mode both for the default decoder-only training
# (1.44x a plain full step, 0.83x its memory) and for all parameters (3.6x; ghost 4.4x but half the memory).
GradSampleMode = Literal["ghost", "hooks", "functorch", "ew"]
DEFAULT_GRAD_SAMPLE_MODE: GradSampleMode = "hooks"
GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = typing.get_args(GradSampleMode)
Accountant = Literal["rdp", "prv"]
# What one round spends on a vehicle's frames under DP-SGD: (noise multiplier, sample rate, steps), the
# entries of Opacus' accountant history. None: the round has no per-frame noise on the vehicle.
Mechanism = tuple[float, float, int]
# How privacy=central bounds a vehicle's update: a fixed clipping norm, or Andrew et al.'s (2021) adaptive
# one, tracking a quantile of the vehicles' update norms (Flower's *AdaptiveClipping wrapper and mod).
Clipping = Literal["fixed", "adaptive"]



class LocalTrainer(Protocol):
    """How a vehicle trains one round: plainly, or wrapped by a privacy mechanism (DP-SGD)."""

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int | None, proximal_mu: float, device: str) -> RoundOutcome:
        """One round; ``seed`` fixes its randomness (simulation), ``None``: the OS's entropy (a deployed vehicle)."""

    def planned_round(self, epochs: int) -> Mechanism | None:
        """What a round of ``epochs`` would spend on this vehicle's frames; ``None``: no per-frame noise."""

    def state(self) -> bytes | None:
        """What must survive the process (an accountant), or ``None`` if nothing."""


@dataclass(frozen=True)
class VehicleBudget:
    """What a vehicle's privacy state is sized by (its data and plan) and where it persists."""

    vehicle: int
    num_examples: int
    batch_size: int
    rounds: int
    local_epochs: int
    state_dir: Path  # the run's default home of accountant files (a spec's state_dir wins)
    saved_state: bytes | None = None  # accountant copy from Flower's context.state, if any


class PlainTrainer:
    """No per-frame privacy: ``training.train`` as it is (also under client-level DP, which the mods add).
    ``trainable``: the part of the model it trains (``fedseg.models.set_trainable``); the rest is left
    exactly as received, so its update is zero."""

    def __init__(self, trainable: TrainablePart = "all") -> None:
        self.trainable = trainable

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int | None, proximal_mu: float, device: str) -> RoundOutcome:
        if self.trainable != "all":  # frozen parameters get no gradient, so no optimizer (or decay) moves them
            set_trainable(model, self.trainable)
        return RoundOutcome(train(model, loader, optimizer, epochs=epochs, proximal_mu=proximal_mu,
                                  device=device))

    def planned_round(self, epochs: int) -> Mechanism | None:
        return None  # no noise on the vehicle: unbounded epsilon

    def state(self) -> bytes | None:
        return None


@dataclass(frozen=True)
class NoPrivacy:
    """``privacy=none``: vehicles train plainly, the server sees each update (or SecAgg+'s sum)."""

    name: ClassVar[str] = "none"
    dp_model: ClassVar[bool] = False  # the plain (BatchNorm) UNet

    audit: bool = False  # the per-frame canary audit without noise: the audit's power (fedseg/server/audit.py)

    def check_fleet(self, partition_sizes: Sequence[int], *, batch_size: int, rounds: int,
                    local_epochs: int) -> None:
        """Nothing to check: no accountant."""

    def vehicle_trainer(self, budget: VehicleBudget) -> LocalTrainer:
        return PlainTrainer()


@dataclass(frozen=True)
class DPSpec:
    """Local DP-SGD settings (``conf/privacy/dpsgd.yaml``). Exactly one of noise / target epsilon."""

    name: ClassVar[str] = "dpsgd"
    # Per-sample gradients need GroupNorm (BatchNorm mixes a batch's frames).
    dp_model: ClassVar[bool] = True

    noise_multiplier: float | None = bounded(None, gt=0)
    target_epsilon: float | None = bounded(None, gt=0)  # whole run: noise calibrated from planned steps
    delta: float | None = bounded(None, gt=0, lt=1)  # None: default_delta(frames of this vehicle)
    max_grad_norm: float = bounded(1.0, gt=0)
    accountant: Accountant = "rdp"
    grad_sample_mode: GradSampleMode = DEFAULT_GRAD_SAMPLE_MODE
    # Expected frames per DP-SGD step (Poisson sampling at expected_batch_size / N); null: the
    # federation's batch_size. Larger: fewer, less noisy steps; frames still go through the model
    # federation.batch_size at a time (Opacus' BatchMemoryManager: virtual steps).
    expected_batch_size: int | None = bounded(None, ge=1)
    # Parameters DP-SGD trains (fedseg.models.TRAINABLE_PARTS): all, or decoder (the encoder stays as
    # received, e.g. from public pretraining: fewer noised dimensions, no backward through it).
    trainable: TrainablePart = "decoder"
    max_epsilon: float | None = bounded(None, gt=0)  # a vehicle stops training before it would pass this
    secure_rng: bool = False  # cryptographic RNG for noise and sampling (needs torchcsprng)
    state_dir: str | None = None  # None: <run dir>/privacy
    audit: bool = False  # Steinke et al.'s one-run audit in a separate audit run (fedseg/server/audit.py)

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: set exactly one of noise_multiplier and target_epsilon "
                             f"(got {self.noise_multiplier} and {self.target_epsilon})")

    def logical_batch(self, batch_size: int) -> int:
        """Expected frames per DP-SGD step: ``expected_batch_size``, else the physical ``batch_size``."""
        return self.expected_batch_size or batch_size

    def delta_for(self, num_examples: int) -> float:
        """``delta``, else :func:`default_delta` of a vehicle with ``num_examples`` frames."""
        return self.delta if self.delta is not None else default_delta(num_examples)

    def check_fleet(self, partition_sizes: Sequence[int], *, batch_size: int, rounds: int,
                    local_epochs: int) -> None:
        """Fail before training, in one line, where a vehicle's accountant would refuse these settings."""
        batch_size = self.logical_batch(batch_size)
        for n in sorted(set(partition_sizes)):
            if batch_size > n:
                raise ValueError(f"privacy.expected_batch_size={batch_size} exceeds the {n} frames of a vehicle: "
                                 f"at most {n}")
            delta = self.delta_for(n)
            if delta >= 1.0 / n:
                raise ValueError(f"privacy.delta={delta:g} must be below 1/N = {1 / n:.3g} for a vehicle with "
                                 f"{n} frames (a mechanism leaking one frame outright would pass)")
            if self.target_epsilon is None:
                continue
            steps = rounds * local_epochs * steps_per_epoch(n, batch_size)
            from fedseg.dpsgd import calibrate_noise  # Opacus: only where DP-SGD is configured

            try:
                calibrate_noise(self.target_epsilon, delta, 1.0 / steps_per_epoch(n, batch_size), steps,
                                self.accountant)
            except ValueError as err:
                raise ValueError(f"privacy.target_epsilon={self.target_epsilon:g} is out of reach for a vehicle "
                                 f"with {n} frames ({steps} DP-SGD steps, delta {delta:.3g}): Opacus' "
                                 f"accountant says '{err}'; raise it or train fewer steps") from None

    def vehicle_trainer(self, budget: VehicleBudget) -> LocalTrainer:
        """DP-SGD with this vehicle's accountant: from its disk file, then context.state if that spent more."""
        from fedseg.dpsgd import ClientPrivacy, DPSGDTrainer  # Opacus: only where DP-SGD is configured

        planned = budget.rounds * budget.local_epochs * steps_per_epoch(budget.num_examples,
                                                                         self.logical_batch(budget.batch_size))
        state_dir = Path(self.state_dir) if self.state_dir else budget.state_dir
        privacy = ClientPrivacy(self, num_examples=budget.num_examples, batch_size=budget.batch_size,
                                planned_steps=planned, state_path=state_dir / f"vehicle_{budget.vehicle}.json")
        if budget.saved_state is not None:
            privacy.load_state(budget.saved_state)
        return DPSGDTrainer(privacy)


@dataclass(frozen=True)
class CentralDPSpec:
    """Client-level DP (``conf/privacy/central.yaml``) for Flower's client-side fixed or adaptive clipping.

    The vehicle trains plainly (only ``trainable``); ``fixedclipping_mod`` (``adaptiveclipping_mod``) clips
    its update and the server wrapper adds the noise (composed in ``clients/`` and
    ``fedseg/server/compose.py``; the accounting in ``fedseg/server/central_dp.py``).
    """

    name: ClassVar[str] = "central"
    # Flower's noise lands on every array: noised BatchNorm statistics (or step counters) wreck a model.
    dp_model: ClassVar[bool] = True

    noise_multiplier: float = bounded(0.5, ge=0)
    clipping_norm: float = bounded(1.0, gt=0)
    num_sampled_clients: int | None = bounded(None, ge=1)  # None: the vehicles sampled per round
    audit: bool = False  # Andrew et al.'s canary vehicles in a separate audit run (fedseg/server/audit.py)
    # What vehicles train and the server noises (fedseg.models.TRAINABLE_PARTS); the rest stays model.init's.
    trainable: TrainablePart = "all"
    clipping: Clipping = "fixed"  # adaptive: clipping_norm is the initial norm (Flower's names below)
    target_clipped_quantile: float = bounded(0.5, ge=0, le=1)
    clip_norm_lr: float = bounded(0.2, gt=0)
    clipped_count_stddev: float | None = bounded(None, gt=0)  # None: Flower's num_sampled_clients / 20

    def check_fleet(self, partition_sizes: Sequence[int], *, batch_size: int, rounds: int,
                    local_epochs: int) -> None:
        """Nothing per vehicle: the server's accountant covers the fleet (``fedseg/server/compose.py``)."""

    def vehicle_trainer(self, budget: VehicleBudget) -> LocalTrainer:
        return PlainTrainer(self.trainable)


PrivacySpec = NoPrivacy | DPSpec | CentralDPSpec
# The privacy registry, mirrored one to one by conf/privacy/*.yaml.
PRIVACY: dict[str, type[PrivacySpec]] = {"none": NoPrivacy, "dpsgd": DPSpec, "central": CentralDPSpec}


def parse_privacy(block: Mapping[str, Any] | None) -> PrivacySpec:
    """The ``privacy`` block as its registry spec (``name`` picks it; errors name key and choices)."""
    return parse_choice(PRIVACY, block, key="privacy", default="none")


def default_delta(num_examples: int) -> float:
    """Delta well below 1/N (a mechanism leaking one frame with prob. 1/N would pass 1/N): min(1e-5, 0.1/N)."""
    return min(1e-5, 0.1 / max(num_examples, 1))
