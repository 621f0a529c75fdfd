"""Privacy the vehicle enforces: a floor set in its node config, its ledger, and noise the server never sees.

On a deployed vehicle (``fedseg-vehicle`` writes the keys below into ``--node-config``) the run's trainer is
wrapped by :class:`VehicleOwnedTrainer`, which before each round

* refuses a run that would train without per-frame noise on the vehicle (``privacy=none``, or ``central``
  whose noise the server adds) when the floor asks for DP (``require-dp``, or any epsilon or noise bound);
* refuses a noise multiplier below ``min-noise-multiplier``;
* reserves the round in the vehicle's :class:`~fedseg.deploy.ledger.PrivacyLedger`, which refuses a round
  that would pass ``max-epsilon-per-run`` or ``lifetime-epsilon`` (and a (run, round) already trained);

and then trains with ``seed=None``: DP-SGD's Poisson sampling and noise come from the OS's entropy, never
from the seed the run derives from what the server chose. A refusal is one logged line and a reply that
says why with weight 0 (``skipped``), which the server already leaves out (under SecAgg+ too); the run's
settings are never changed behind its back. Simulation (no such node config) trains as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedseg.deploy.ledger import Caps, PrivacyLedger
from fedseg.privacy import LocalTrainer, Mechanism, default_delta
from fedseg.training import RoundOutcome

log = logging.getLogger("fedseg.vehicle")


@dataclass(frozen=True)
class PrivacyFloor:
    """What the vehicle's owner requires of every run (node config keys with dashes)."""

    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    lifetime_epsilon: float | None = None

    @property
    def requires_dp(self) -> bool:
        """Any bound implies DP-SGD: a round without per-frame noise has no finite epsilon."""
        return self.require_dp or any(v is not None for v in (self.min_noise_multiplier, self.max_epsilon_per_run,
                                                               self.lifetime_epsilon))

    @property
    def caps(self) -> Caps:
        return Caps(per_run=self.max_epsilon_per_run, lifetime=self.lifetime_epsilon)

    def refusal(self, mechanism: Mechanism | None, run_privacy: str) -> str | None:
        """Why the run's privacy is below this floor, or ``None`` if it is not."""
        if mechanism is None:
            if self.requires_dp:
                return (f"this vehicle trains only under DP-SGD (node config require-dp or an epsilon/noise bound); "
                        f"the run asks privacy={run_privacy}")
            return None
        if self.min_noise_multiplier is not None and mechanism[0] < self.min_noise_multiplier:
            return (f"the run's noise multiplier {mechanism[0]:.4g} is below this vehicle's min-noise-multiplier "
                    f"{self.min_noise_multiplier:g}")
        return None


class VehicleOwnedTrainer:
    """The run's trainer under the vehicle's own floor and ledger, with noise from the OS's entropy."""

    def __init__(self, inner: LocalTrainer, floor: PrivacyFloor, ledger: PrivacyLedger | None, *, run: int,
                 server_round: int, num_examples: int, run_privacy: str) -> None:
        self.inner, self.floor, self.ledger = inner, floor, ledger
        self.run, self.server_round, self.run_privacy = run, server_round, run_privacy
        self.delta = default_delta(num_examples)  # the vehicle's, whatever privacy.delta the run sets

    def planned_round(self, epochs: int) -> Mechanism | None:
        return self.inner.planned_round(epochs)

    def train_round(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epochs: int, seed: int | None, proximal_mu: float, device: str) -> RoundOutcome:
        mechanism = self.inner.planned_round(epochs)
        refusal = self.floor.refusal(mechanism, self.run_privacy)
        if refusal is None and self.ledger is not None:
            verdict = self.ledger.reserve(self.run, self.server_round, mechanism, delta=self.delta,
                                          caps=self.floor.caps)
            refusal = verdict.refusal
        if refusal is not None:
            log.warning(f"fedseg-vehicle: refused round {self.server_round} of run {self.run}: {refusal}")
            return RoundOutcome(None, {"skipped": True, "reason": f"vehicle refused: {refusal}"})
        # seed=None: DP-SGD draws its sampling and noise from the OS's entropy (fedseg.dpsgd.ClientPrivacy.attach)
        outcome = self.inner.train_round(model, loader, optimizer, epochs=epochs, seed=None,
                                         proximal_mu=proximal_mu, device=device)
        if outcome.result is None and self.ledger is not None:  # the run's own budget stopped it: nothing released
            self.ledger.release(self.run, self.server_round)
        return outcome

    def state(self) -> bytes | None:
        return self.inner.state()
