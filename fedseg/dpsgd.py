"""DP-SGD on one vehicle with Opacus: noise calibration, accounting across rounds, the round itself.

Kept apart from :mod:`fedseg.privacy` (the privacy registry and its typed specs) so that a vehicle
or server that never trains under DP-SGD never imports Opacus (2 s of every process start, which a
deployed vehicle pays each round). Privacy unit: one camera frame of one vehicle.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import get_privacy_spent as rdp_privacy_spent
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import nn
from torch.utils.data import DataLoader

from fedseg._dp_compat import PerSampleSegmentationLoss, unwrap_model
from fedseg.models import set_trainable
from fedseg.training import RoundOutcome, TrainResult, steps_per_epoch, train

History = list[tuple[float, float, int]]

# Opacus hooks the image-facing first conv, whose input never requires grad; PyTorch then warns on
# every backward. Expected here, and it would bury real warnings in every client's log.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class DPSGDSettings(Protocol):
    """What this module reads of a DP-SGD spec, :class:`fedseg.privacy.DPSpec`. A protocol, not an
    import: the privacy registry imports this module (and Opacus) only where DP-SGD is configured."""

    @property
    def noise_multiplier(self) -> float | None: ...
    @property
    def target_epsilon(self) -> float | None: ...
    @property
    def max_grad_norm(self) -> float: ...
    @property
    def accountant(self) -> str: ...
    @property
    def grad_sample_mode(self) -> str: ...
    @property
    def trainable(self) -> str: ...
    @property
    def max_epsilon(self) -> float | None: ...
    @property
    def secure_rng(self) -> bool: ...
    def logical_batch(self, batch_size: int) -> int: ...
    def delta_for(self, num_examples: int) -> float: ...


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, and seconds of accounting a call
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier (Opacus' search) keeping ``steps`` steps within ``target_epsilon``.

    Under RDP a target at or below the accountant's floor (its epsilon with no privacy loss at all,
    set by ``delta`` and its largest order) is refused at once: Opacus' search would double the noise
    up to 1e6, a minute of accounting, before saying so."""
    if accountant == "rdp":
        orders = RDPAccountant.DEFAULT_ALPHAS
        with warnings.catch_warnings():  # "optimal order is the largest alpha": that is the floor
            warnings.simplefilter("ignore")
            floor, _ = rdp_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
        if target_epsilon <= floor:
            raise ValueError(f"The privacy budget is too low: RDP accounting cannot reach epsilon below "
                             f"{floor:.3g} at delta {delta:g}, whatever the noise")
    with warnings.catch_warnings():  # the search probes extreme noise levels, where RDP warns
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """Opacus' epsilon for a ``(noise, sample_rate, steps)`` history; 0 before any step."""
    if not history:
        return 0.0
    return _epsilon(tuple((float(n), float(q), int(k)) for n, q, k in history), float(delta), accountant)


# RDP accounting takes ~0.8 s a call at sample rate 0.5, and a vehicle asks about the same history more
# than once a round (the budget check, the commit, the next round's state merge).
@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # PRV warns about its own numerical error bounds
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class ClientPrivacy:
    """One vehicle's DP-SGD state across rounds: its noise, accountant history, budget and disk copy.

    A round: ``can_train(round_steps(epochs))`` -> ``attach(...)`` -> ``engine.train`` -> ``commit()``.
    ``attach`` first records the round's planned steps as *pending* and saves, so a process killed
    mid-round restarts counting them as spent: the reported epsilon can be too high, never too low.
    """

    def __init__(self, spec: DPSGDSettings, *, num_examples: int, batch_size: int, planned_steps: int,
                 state_path: str | os.PathLike[str] | None = None) -> None:
        """``batch_size``: frames per forward pass (the loader's); a DP-SGD step samples
        ``spec.expected_batch_size`` frames in expectation if set (virtual steps), else ``batch_size``.
        ``planned_steps``: this vehicle's DP steps over the whole run (calibrates ``target_epsilon``);
        ``state_path``: JSON file loaded now if it exists and rewritten on every ``attach``/``commit``."""
        self.spec = spec
        self.physical_batch = batch_size
        self.logical_batch = spec.logical_batch(batch_size)
        self.steps_per_epoch = steps_per_epoch(num_examples, self.logical_batch)
        self.sample_rate = 1.0 / self.steps_per_epoch  # what Opacus' DPDataLoader samples at
        self.delta = spec.delta_for(num_examples)
        self.state_path = Path(state_path) if state_path is not None else None
        # What target_epsilon was calibrated for; kept in the state, so a vehicle whose every round is
        # a fresh process (Flower's Deployment Engine) searches once per run, not once per round.
        self.calibration: list[Any] | None = None
        # The disk copy, read once: its calibration here, its spent budget below (a corrupt file raises)
        saved = (json.loads(self.state_path.read_bytes())
                 if self.state_path is not None and self.state_path.exists() else None)
        if spec.noise_multiplier is not None:
            self.noise_multiplier = float(spec.noise_multiplier)
        else:
            assert spec.target_epsilon is not None  # DPSpec guarantees one of the two
            self.calibration = [float(spec.target_epsilon), self.delta, self.sample_rate, max(planned_steps, 1),
                                spec.accountant]
            if isinstance(saved, dict) and saved.get("calibration") == self.calibration:
                self.noise_multiplier = float(saved["noise_multiplier"])
            else:
                self.noise_multiplier = calibrate_noise(*self.calibration)
        self._history: History = []  # committed steps
        self._pending: tuple[float, float, int] | None = None  # steps reserved by the round in flight
        self._engine: PrivacyEngine | None = None
        self._wrapped: nn.Module | None = None  # Opacus' wrapper of the round in flight
        self._optimizer: DPOptimizer | None = None  # and its optimizer
        if saved is not None:
            self.load_state(saved)

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
               seed: int | None, epochs: int = 1, device: str | torch.device | None = None,
               ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Any]:
        """Wrap for DP-SGD; returns (model, optimizer, Poisson loader, criterion) for ``engine.train``.

        ``model`` must come from :func:`make_dp_compatible`; ``loader`` (batches of the physical
        ``batch_size``) must not drop its last batch. Its frames are Poisson-sampled at
        ``logical_batch / N`` per step; a logical batch larger than the physical one is split (Opacus'
        virtual steps: one noised step per logical batch). Only ``spec.trainable`` parameters train.
        ``seed`` and the steps already taken fix the sampling and the noise (ignored with ``secure_rng``);
        ``seed=None`` (a deployed vehicle): both from the OS's entropy, see :func:`_generators`.
        ``device`` is where the model will train (default: where its parameters are now): Opacus draws
        the noise there, and a CUDA draw needs a CUDA generator.
        """
        if self._pending is not None:
            raise RuntimeError("ClientPrivacy.attach: the previous round was not committed")
        if loader.batch_size != self.physical_batch or loader.drop_last:
            raise ValueError(f"loader has batch_size={loader.batch_size} (drop_last={loader.drop_last}); "
                             f"ClientPrivacy was sized for {self.physical_batch} with drop_last=False")
        if self.logical_batch != self.physical_batch:
            loader = DataLoader(loader.dataset, batch_size=self.logical_batch, generator=loader.generator)
        if len(loader) != self.steps_per_epoch:
            raise ValueError(f"loader has {len(loader)} logical batches; ClientPrivacy was sized for "
                             f"{self.steps_per_epoch} (a different number of frames?)")
        set_trainable(model, self.spec.trainable)
        with warnings.catch_warnings():  # "Secure RNG turned off": a choice made in the config
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=self.spec.accountant, secure_mode=self.spec.secure_rng)
        engine.accountant.history = list(self._history)  # epsilon continues across rounds
        # Seeded sampling and noise (Opacus would fall back to the global RNG), mixed with the steps
        # already taken: a caller passing the same seed every round must not get the same noise.
        noise = None
        if not self.spec.secure_rng:
            where = torch.device(device) if device is not None else next(model.parameters()).device
            sampling, noise = _generators(seed, taken=sum(entry[2] for entry in self._history), device=where)
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
        if seed is None and not self.spec.secure_rng:
            # Opacus' noise robust to floating-point attacks (the sum of 4 Gaussians, arXiv:2107.10138), which
            # its secure_mode gives only with torchcsprng: the same N(0, sigma^2), 5 draws instead of 1.
            cast(DPOptimizer, optimizer).secure_mode = True
        if self.logical_batch > self.physical_batch:  # virtual steps: noise once per logical batch
            loader = wrap_data_loader(data_loader=loader, max_batch_size=self.physical_batch, optimizer=optimizer)
        else:
            model.forbid_grad_accumulation()  # type: ignore[operator]  # make_private only does it with Poisson
        self._engine, self._wrapped, self._optimizer = engine, model, cast(DPOptimizer, optimizer)
        self._pending = (self.noise_multiplier, self.sample_rate, self.round_steps(epochs))
        self.save()
        return model, optimizer, loader, criterion

    def noise_only_step(self) -> None:
        """The round's DP-SGD step on a Poisson batch that sampled no frame (``engine.train``'s ``on_empty``):
        the noise alone, which the accountant counts like any step.

        Poisson sampling's analysis releases every step: skipping an empty one would reveal that no frame
        was drawn, and the accountant (hooked on the optimizer's step) would not count it. This is
        Opacus' own handling of an empty batch, with zero-frame per-sample gradients given directly, since
        the functorch and ew engines cannot run a model on zero frames.
        """
        optimizer = self._optimizer
        if optimizer is None:
            raise RuntimeError("ClientPrivacy.noise_only_step outside a round (before attach or after commit)")
        optimizer.zero_grad(set_to_none=True)
        ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)  # ghost clipping: p.grad is the clipped sum
        for p in optimizer.params:
            if ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.step()

    def commit(self) -> float:
        """End the round: keep the steps really taken, drop the reservation, save; returns epsilon.

        Also removes Opacus' hooks, so the plain model can be attached again next round (its state
        is still readable through :func:`unwrap_state_dict` of the wrapper).
        """
        if self._engine is not None:
            self._history = [(float(n), float(q), int(k)) for n, q, k in self._engine.accountant.history]
        if self._wrapped is not None:
            unwrap_model(self._wrapped)
        self._engine, self._wrapped, self._optimizer, self._pending = None, None, None, None
        self.save()
        return self.epsilon()

    def state(self) -> dict[str, Any]:
        """JSON-able state (for Flower's ``context.state`` and the disk copy)."""
        return {"version": 1, "accountant": self.spec.accountant, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "calibration": self.calibration,
                "sample_rate": self.sample_rate,
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


def _generators(seed: int | None, *, taken: int,
                device: torch.device | None = None) -> tuple[torch.Generator, torch.Generator]:
    """Poisson sampling's generator (on the CPU, where the loader samples) and the noise's (on ``device``,
    where the gradients are).

    With a ``seed`` (simulation): derived from it and the steps already taken, so runs reproduce and a
    caller passing the same seed every round still gets new noise. ``None`` (a deployed vehicle): each
    seeded with 64 fresh bits from the OS (``secrets``), nothing the server chose or can see. That is
    unpredictable seeding of torch's Mersenne Twister, not a CSPRNG (``secure_rng`` needs torchcsprng):
    64 bits per generator, and the server only ever sees noised sums, never the raw draws."""
    if seed is None:
        seeds = [secrets.randbits(64), secrets.randbits(64)]
    else:
        seeds = [int(s) for s in np.random.SeedSequence([seed, taken]).generate_state(2)]
    sampling = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=device or "cpu").manual_seed(seeds[1])
    return sampling, noise


def private_round(privacy: ClientPrivacy, model: nn.Module, loader: DataLoader,
                  optimizer: torch.optim.Optimizer, *, epochs: int, seed: int | None, proximal_mu: float = 0.0,
                  device: str | torch.device = "cpu") -> TrainResult | None:
    """One vehicle's DP-SGD round; ``None`` (nothing trained, nothing spent) if the budget forbids it.

    After it returns, ``model`` (the plain, unwrapped module) holds the trained weights with the same
    state-dict keys as without DP.
    """
    ok, _ = privacy.can_train(privacy.round_steps(epochs))
    if not ok:
        return None
    dp_model, dp_optimizer, dp_loader, criterion = privacy.attach(model, optimizer, loader, seed=seed,
                                                                  epochs=epochs, device=device)
    result = train(dp_model, dp_loader, dp_optimizer, epochs=epochs, criterion=criterion,
                   proximal_mu=proximal_mu, device=device, on_empty=privacy.noise_only_step)
    privacy.commit()
    return result


class DPSGDTrainer:
    """DP-SGD around local training: Opacus wraps model, optimizer and loader for each round."""

    def __init__(self, privacy: ClientPrivacy) -> None:
        self.privacy = privacy

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int | None, proximal_mu: float, device: str) -> RoundOutcome:
        result = private_round(self.privacy, model, loader, optimizer, epochs=epochs, seed=seed,
                               proximal_mu=proximal_mu, device=device)
        metrics: dict[str, Any] = {"epsilon": self.privacy.epsilon(), "delta": self.privacy.delta,
                                   "noise_multiplier": self.privacy.noise_multiplier}
        if result is None:  # budget exhausted: say so; the server leaves this vehicle out
            metrics |= {"skipped": True, "reason": "privacy budget exhausted"}
        return RoundOutcome(result, metrics)

    def planned_round(self, epochs: int) -> tuple[float, float, int]:
        """The accountant entry a round of ``epochs`` adds: (noise multiplier, sample rate, steps)."""
        privacy = self.privacy
        return privacy.noise_multiplier, privacy.sample_rate, privacy.round_steps(epochs)

    def state(self) -> bytes | None:
        return self.privacy.to_bytes()


