"""Differential privacy for one vehicle: Opacus DP-SGD, accounted across rounds and budgeted.

Privacy unit: one camera frame. Each local step is Opacus' sampled Gaussian mechanism (Poisson
sampling at ``q = 1 / steps_per_epoch``, each frame's gradient clipped to ``max_grad_norm``,
Gaussian noise ``noise_multiplier * max_grad_norm``). A vehicle trains in many rounds, so its
accountant history, a list of ``(noise_multiplier, sample_rate, steps)``, outlives the process
(:class:`ClientPrivacy`); epsilon is always Opacus' own accountant applied to that history.

The ``PRIVACY`` registry holds one typed spec per mode (``none``, ``dpsgd``, ``central``); each spec
gives the vehicle its :class:`LocalTrainer`, so DP-SGD wraps local training and a client's ``fit``
has no privacy branch. Client-level DP (``privacy=central``) is Flower's business (a strategy
wrapper and a client mod, composed in ``server/compose.py`` and ``clients/``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from fedseg._dp_compat import (
    PerSampleSegmentationLoss,
    make_dp_compatible,
    per_sample_segmentation_loss,
    unwrap_model,
    unwrap_state_dict,
)
from fedseg.config import bounded, parse_choice
from fedseg.training import TrainResult, train

# Measured on UNet-ResNet34 (scripts/bench/dp_step.py; numbers in conf/privacy/dpsgd.yaml): ghost
# (fast gradient clipping) ties hooks for speed at the default image size and needs half the memory.
GradSampleMode = Literal["ghost", "hooks", "functorch", "ew"]
DEFAULT_GRAD_SAMPLE_MODE: GradSampleMode = "ghost"
GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = typing.get_args(GradSampleMode)
Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[Accountant, ...] = typing.get_args(Accountant)
History = list[tuple[float, float, int]]

# Opacus hooks the image-facing first conv, whose input never requires grad; PyTorch then warns on
# every backward. Expected here, and it would bury real warnings in every client's log.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "PRIVACY",
    "CentralDPSpec",
    "ClientPrivacy",
    "DPSGDTrainer",
    "DPSpec",
    "LocalTrainer",
    "NoPrivacy",
    "PerSampleSegmentationLoss",
    "PlainTrainer",
    "PrivacySpec",
    "RoundOutcome",
    "VehicleBudget",
    "calibrate_noise",
    "default_delta",
    "epsilon_of",
    "make_dp_compatible",
    "parse_privacy",
    "per_sample_segmentation_loss",
    "private_round",
    "steps_per_epoch",
    "unwrap_model",
    "unwrap_state_dict",
]


class LocalTrainer(Protocol):
    """How a vehicle trains one round: plainly, or wrapped by a privacy mechanism (DP-SGD)."""

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int, proximal_mu: float, device: str) -> RoundOutcome: ...

    def state(self) -> bytes | None:
        """What must survive the process (an accountant), or ``None`` if nothing."""


@dataclass(frozen=True)
class RoundOutcome:
    """A vehicle's round: the training result (``None``: it did not train) and what to report."""

    result: TrainResult | None
    metrics: dict[str, Any] = field(default_factory=dict)


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
    """No per-frame privacy: ``training.train`` as it is (also under client-level DP, which the mods add)."""

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int, proximal_mu: float, device: str) -> RoundOutcome:
        return RoundOutcome(train(model, loader, optimizer, epochs=epochs, proximal_mu=proximal_mu,
                                  device=device))

    def state(self) -> bytes | None:
        return None


@dataclass(frozen=True)
class NoPrivacy:
    """``privacy=none``: vehicles train plainly, the server sees each update (or SecAgg+'s sum)."""

    name: ClassVar[str] = "none"
    dp_model: ClassVar[bool] = False  # the plain (BatchNorm) UNet

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
    max_epsilon: float | None = bounded(None, gt=0)  # a vehicle stops training before it would pass this
    secure_rng: bool = False  # cryptographic RNG for noise and sampling (needs torchcsprng)
    state_dir: str | None = None  # None: <run dir>/privacy

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: set exactly one of noise_multiplier and target_epsilon "
                             f"(got {self.noise_multiplier} and {self.target_epsilon})")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r}; valid: {list(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"privacy.grad_sample_mode={self.grad_sample_mode!r}; "
                             f"valid: {list(GRAD_SAMPLE_MODES)}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")

    def check_fleet(self, partition_sizes: Sequence[int], *, batch_size: int, rounds: int,
                    local_epochs: int) -> None:
        """Fail before training, in one line, where a vehicle's accountant would refuse these settings."""
        for n in sorted(set(partition_sizes)):
            delta = self.delta if self.delta is not None else default_delta(n)
            if delta >= 1.0 / n:
                raise ValueError(f"privacy.delta={delta:g} must be below 1/N = {1 / n:.3g} for a vehicle with "
                                 f"{n} frames (a mechanism leaking one frame outright would pass)")
            if self.target_epsilon is None:
                continue
            steps = rounds * local_epochs * steps_per_epoch(n, batch_size)
            try:
                calibrate_noise(self.target_epsilon, delta, 1.0 / steps_per_epoch(n, batch_size), steps,
                                self.accountant)
            except ValueError as err:
                raise ValueError(f"privacy.target_epsilon={self.target_epsilon:g} is out of reach for a vehicle "
                                 f"with {n} frames ({steps} DP-SGD steps, delta {delta:.3g}): Opacus' "
                                 f"accountant says '{err}'; raise it or train fewer steps") from None

    def vehicle_trainer(self, budget: VehicleBudget) -> LocalTrainer:
        """DP-SGD with this vehicle's accountant: from its disk file, then context.state if that spent more."""
        planned = budget.rounds * budget.local_epochs * steps_per_epoch(budget.num_examples, budget.batch_size)
        state_dir = Path(self.state_dir) if self.state_dir else budget.state_dir
        privacy = ClientPrivacy(self, num_examples=budget.num_examples, batch_size=budget.batch_size,
                                planned_steps=planned, state_path=state_dir / f"vehicle_{budget.vehicle}.json")
        if budget.saved_state is not None:
            privacy.load_state(budget.saved_state)
        return DPSGDTrainer(privacy)


@dataclass(frozen=True)
class CentralDPSpec:
    """Client-level DP (``conf/privacy/central.yaml``) for Flower's client-side fixed clipping.

    The vehicle trains plainly; ``fixedclipping_mod`` clips its update and the server wrapper adds the
    noise (both composed in ``clients/`` and ``server/compose.py``).
    """

    name: ClassVar[str] = "central"
    # Flower's noise lands on every array: noised BatchNorm statistics (or step counters) wreck a model.
    dp_model: ClassVar[bool] = True

    noise_multiplier: float = bounded(0.5, ge=0)
    clipping_norm: float = bounded(1.0, gt=0)
    num_sampled_clients: int | None = bounded(None, ge=1)  # None: the vehicles sampled per round

    def check_fleet(self, partition_sizes: Sequence[int], *, batch_size: int, rounds: int,
                    local_epochs: int) -> None:
        """Nothing per vehicle: the server's accountant covers the fleet (``server/compose.py``)."""

    def vehicle_trainer(self, budget: VehicleBudget) -> LocalTrainer:
        return PlainTrainer()


PrivacySpec = NoPrivacy | DPSpec | CentralDPSpec
# The privacy registry, mirrored one to one by conf/privacy/*.yaml.
PRIVACY: dict[str, type[PrivacySpec]] = {"none": NoPrivacy, "dpsgd": DPSpec, "central": CentralDPSpec}


def parse_privacy(block: Mapping[str, Any] | None) -> PrivacySpec:
    """The ``privacy`` block as its registry spec (``name`` picks it; errors name key and choices)."""
    return parse_choice(PRIVACY, block, key="privacy", default="none")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches a (``drop_last=False``) loader yields; Opacus samples at ``1 / steps_per_epoch``."""
    return math.ceil(num_examples / batch_size)


def default_delta(num_examples: int) -> float:
    """Delta well below 1/N (a mechanism leaking one frame with prob. 1/N would pass 1/N): min(1e-5, 0.1/N)."""
    return min(1e-5, 0.1 / max(num_examples, 1))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier (Opacus' search) keeping ``steps`` steps within ``target_epsilon``."""
    with warnings.catch_warnings():  # the search probes extreme noise levels, where RDP warns
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """Opacus' epsilon for a ``(noise, sample_rate, steps)`` history; 0 before any step."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(entry) for entry in history]
    with warnings.catch_warnings():  # PRV warns about its own numerical error bounds
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class ClientPrivacy:
    """One vehicle's DP-SGD state across rounds: its noise, accountant history, budget and disk copy.

    A round: ``can_train(round_steps(epochs))`` -> ``attach(...)`` -> ``engine.train`` -> ``commit()``.
    ``attach`` first records the round's planned steps as *pending* and saves, so a process killed
    mid-round restarts counting them as spent: the reported epsilon can be too high, never too low.
    """

    def __init__(self, spec: DPSpec, *, num_examples: int, batch_size: int, planned_steps: int,
                 state_path: str | os.PathLike[str] | None = None) -> None:
        """``planned_steps``: this vehicle's DP steps over the whole run (calibrates ``target_epsilon``);
        ``state_path``: JSON file loaded now if it exists and rewritten on every ``attach``/``commit``."""
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch(num_examples, batch_size)
        self.sample_rate = 1.0 / self.steps_per_epoch  # what Opacus' DPDataLoader samples at
        self.delta = spec.delta if spec.delta is not None else default_delta(num_examples)
        if spec.noise_multiplier is not None:
            self.noise_multiplier = float(spec.noise_multiplier)
        else:
            assert spec.target_epsilon is not None  # DPSpec guarantees one of the two
            self.noise_multiplier = calibrate_noise(spec.target_epsilon, self.delta, self.sample_rate,
                                                    max(planned_steps, 1), spec.accountant)
        self.state_path = Path(state_path) if state_path is not None else None
        self._history: History = []  # committed steps
        self._pending: tuple[float, float, int] | None = None  # steps reserved by the round in flight
        self._engine: PrivacyEngine | None = None
        self._wrapped: nn.Module | None = None  # Opacus' wrapper of the round in flight
        if self.state_path is not None and self.state_path.exists():
            self.load_state(self.state_path.read_bytes())

    def round_steps(self, epochs: int) -> int:
        """DP steps of one round of ``epochs`` local epochs."""
        return epochs * self.steps_per_epoch

    def spent_history(self) -> History:
        """Committed history plus any pending reservation: what must be counted as spent."""
        return self._history + ([self._pending] if self._pending else [])

    def epsilon(self) -> float:
        """Epsilon spent so far at ``self.delta`` (Opacus' accountant over :meth:`spent_history`)."""
        return epsilon_of(self.spent_history(), self.delta, self.spec.accountant)

    def can_train(self, steps: int) -> tuple[bool, float]:
        """Would ``steps`` more steps keep epsilon within ``max_epsilon``? Returns (ok, epsilon after)."""
        after = epsilon_of(self.spent_history() + [(self.noise_multiplier, self.sample_rate, steps)],
                           self.delta, self.spec.accountant)
        return (self.spec.max_epsilon is None or after <= self.spec.max_epsilon), after

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
               seed: int, epochs: int = 1) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Any]:
        """Wrap for DP-SGD; returns (model, optimizer, Poisson loader, criterion) for ``engine.train``.

        ``model`` must come from :func:`make_dp_compatible`; ``loader`` must not drop its last batch
        (its length sets the sampling rate). ``seed`` and the steps already taken fix the Poisson
        sampling and the noise (ignored with ``secure_rng``).
        """
        if self._pending is not None:
            raise RuntimeError("ClientPrivacy.attach: the previous round was not committed")
        if len(loader) != self.steps_per_epoch or loader.drop_last:
            raise ValueError(f"loader has {len(loader)} batches (drop_last={loader.drop_last}); "
                             f"ClientPrivacy was sized for {self.steps_per_epoch} with drop_last=False")
        with warnings.catch_warnings():  # "Secure RNG turned off": a choice made in the config
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=self.spec.accountant, secure_mode=self.spec.secure_rng)
        engine.accountant.history = list(self._history)  # epsilon continues across rounds
        # Seeded sampling and noise (Opacus would fall back to the global RNG), mixed with the steps
        # already taken: a caller passing the same seed every round must not get the same noise.
        noise = None
        if not self.spec.secure_rng:
            taken = sum(entry[2] for entry in self._history)
            sampling, noise = (torch.Generator().manual_seed(int(s)) for s in
                               np.random.SeedSequence([seed, taken]).generate_state(2))
            loader = DPDataLoader.from_data_loader(loader, generator=sampling)
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=PerSampleSegmentationLoss(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.spec.max_grad_norm,
            grad_sample_mode=self.spec.grad_sample_mode, poisson_sampling=self.spec.secure_rng,
            noise_generator=noise)
        if self.spec.grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = wrapped
        else:  # same per-frame loss definition in every mode, so clipping bounds the same quantity
            (model, optimizer, loader), criterion = wrapped, PerSampleSegmentationLoss()
        model.forbid_grad_accumulation()  # type: ignore[operator]  # make_private only does it with Poisson
        self._engine, self._wrapped = engine, model
        self._pending = (self.noise_multiplier, self.sample_rate, self.round_steps(epochs))
        self.save()
        return model, optimizer, loader, criterion

    def commit(self) -> float:
        """End the round: keep the steps really taken, drop the reservation, save; returns epsilon.

        Also removes Opacus' hooks, so the plain model can be attached again next round (its state
        is still readable through :func:`unwrap_state_dict` of the wrapper).
        """
        if self._engine is not None:
            self._history = [(float(n), float(q), int(k)) for n, q, k in self._engine.accountant.history]
        if self._wrapped is not None:
            unwrap_model(self._wrapped)
        self._engine, self._wrapped, self._pending = None, None, None
        self.save()
        return self.epsilon()

    def state(self) -> dict[str, Any]:
        """JSON-able state (for Flower's ``context.state`` and the disk copy)."""
        return {"version": 1, "accountant": self.spec.accountant, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "history": [list(e) for e in self._history],
                "pending": list(self._pending) if self._pending else None}

    def to_bytes(self) -> bytes:
        """:meth:`state` as UTF-8 JSON."""
        return json.dumps(self.state()).encode()

    def load_state(self, blob: bytes | str | Mapping[str, Any]) -> None:
        """Adopt a saved state if it has spent more than this one (so two copies never lose steps).

        A saved pending reservation counts as spent: nobody knows how much of that round ran.
        """
        if self._engine is not None:
            raise RuntimeError("ClientPrivacy.load_state during a round (after attach, before commit)")
        state = json.loads(blob) if isinstance(blob, bytes | str) else dict(blob)
        saved: History = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
        if state.get("pending"):
            n, q, s = state["pending"]
            saved.append((float(n), float(q), int(s)))
        current = self.spent_history()
        if epsilon_of(saved, self.delta, self.spec.accountant) > epsilon_of(current, self.delta,
                                                                              self.spec.accountant):
            self._history, self._pending = saved, None

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write :meth:`state` atomically (temp file + rename) to ``path`` or ``state_path``, if any."""
        target = Path(path) if path is not None else self.state_path
        if target is None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.to_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)


def private_round(privacy: ClientPrivacy, model: nn.Module, loader: DataLoader,
                  optimizer: torch.optim.Optimizer, *, epochs: int, seed: int, proximal_mu: float = 0.0,
                  device: str | torch.device = "cpu") -> TrainResult | None:
    """One vehicle's DP-SGD round; ``None`` (nothing trained, nothing spent) if the budget forbids it.

    After it returns, ``model`` (the plain, unwrapped module) holds the trained weights with the same
    state-dict keys as without DP.
    """
    ok, _ = privacy.can_train(privacy.round_steps(epochs))
    if not ok:
        return None
    dp_model, dp_optimizer, dp_loader, criterion = privacy.attach(model, optimizer, loader, seed=seed,
                                                                  epochs=epochs)
    result = train(dp_model, dp_loader, dp_optimizer, epochs=epochs, criterion=criterion,
                   proximal_mu=proximal_mu, device=device)
    privacy.commit()
    return result


class DPSGDTrainer:
    """DP-SGD around local training: Opacus wraps model, optimizer and loader for each round."""

    def __init__(self, privacy: ClientPrivacy) -> None:
        self.privacy = privacy

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int, proximal_mu: float, device: str) -> RoundOutcome:
        result = private_round(self.privacy, model, loader, optimizer, epochs=epochs, seed=seed,
                               proximal_mu=proximal_mu, device=device)
        metrics: dict[str, Any] = {"epsilon": self.privacy.epsilon(), "delta": self.privacy.delta,
                                   "noise_multiplier": self.privacy.noise_multiplier}
        if result is None:  # budget exhausted: say so; the server leaves this vehicle out
            metrics |= {"skipped": True, "reason": "privacy budget exhausted"}
        return RoundOutcome(result, metrics)

    def state(self) -> bytes | None:
        return self.privacy.to_bytes()


