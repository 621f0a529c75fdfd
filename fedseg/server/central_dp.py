"""Client-level (vehicle-level) DP, ``privacy=central``: Flower's wrapper, equal weights, and an accountant
whose assumptions are the run's.

What runs: each sampled vehicle clips its update to ``clipping_norm`` C (Flower's ``fixedclipping_mod``),
the server averages the ``m`` updates and Flower's ``DifferentialPrivacyClientSideFixedClipping`` adds
Gaussian noise of std ``noise_multiplier * C / m`` to the average. What that guarantee needs, and where
it is enforced:

* equal weights: FedAvg weights vehicles by frames, so one vehicle could move the average by more than
  C / m; :class:`EqualWeights` gives every vehicle the same weight before averaging;
* exactly ``m`` updates in the average (fewer would be under-noised): :class:`EqualWeights` discards a
  round with any missing vehicle, and ``num_sampled_clients`` must be what Flower samples;
* the noise lands on a mean of clipped updates: strategies that transform the mean (FedAdam's server
  optimizer, robust aggregators) are refused (``StrategyEntry.noise_on_mean``).

Accounting: Flower samples exactly ``m`` of the ``n`` vehicles without replacement each round, so the
neighbouring relation is "replace one vehicle" (n is public) and sampling is without replacement:
Flower 1.42's own ``RdpAccountant`` (Google's dp-accounting underneath) for that model. Replacing one
vehicle moves the sum of clipped updates by up to 2C while the noise std on the sum is
``noise_multiplier * C``, so the accountant is given the effective multiplier ``noise_multiplier / 2``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.common import FitRes, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedseg.config import FederationSpec
from fedseg.privacy import CentralDPSpec, default_delta
from fedseg.server.wrapper import StrategyWrapper

log = logging.getLogger("fedseg")


class EqualWeights(StrategyWrapper):
    """Every vehicle weighs the same in the average, and a round without all ``sampled`` vehicles is
    discarded (the global model is kept): the conditions central DP's noise is calibrated to."""

    def __init__(self, inner: Strategy, sampled: int) -> None:
        super().__init__(inner)
        self.sampled = sampled

    def settings(self) -> dict[str, Any]:
        return {"sampled": self.sampled}

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) != self.sampled:
            log.warning(f"round {server_round}: privacy=central needs all {self.sampled} sampled vehicles' "
                        f"updates, got {len(results)}: the round is discarded, the global model kept")
            return None, {}
        equal = [(p, FitRes(r.status, r.parameters, 1, r.metrics)) for p, r in results]
        return self.inner.aggregate_fit(server_round, equal, failures)


def sampled_vehicles(spec: CentralDPSpec, fed: FederationSpec) -> int:
    """Vehicles in each round's average; ``num_sampled_clients`` may only restate what Flower samples."""
    sampled = fed.vehicles_per_round
    if spec.num_sampled_clients is not None and spec.num_sampled_clients != sampled:
        raise ValueError(f"privacy.num_sampled_clients={spec.num_sampled_clients} but Flower samples {sampled} "
                         "vehicles per round (federation.num_clients x fraction_fit, at least min_fit_clients): "
                         "the noise would be calibrated to the wrong count; set it to null")
    return sampled


def wrap_central_dp(strategy: Strategy, spec: CentralDPSpec, fed: FederationSpec) -> Strategy:
    """Flower's client-side fixed-clipping DP wrapper around equal-weight averaging."""
    sampled = sampled_vehicles(spec, fed)
    return DifferentialPrivacyClientSideFixedClipping(
        EqualWeights(strategy, sampled), noise_multiplier=spec.noise_multiplier,
        clipping_norm=spec.clipping_norm, num_sampled_clients=sampled)


def central_accounting(spec: CentralDPSpec, fed: FederationSpec) -> Callable[[int], tuple[float, float]]:
    """Round -> (vehicle-level epsilon, delta) after that many rounds (see the module docstring)."""
    delta = default_delta(fed.num_clients)
    sampled = sampled_vehicles(spec, fed)

    def epsilon(rounds: int) -> tuple[float, float]:
        return central_epsilon(spec.noise_multiplier, vehicles=fed.num_clients, sampled=sampled,
                               rounds=rounds, delta=delta), delta

    return epsilon


def central_epsilon(noise_multiplier: float, *, vehicles: int, sampled: int, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` rounds of ``sampled``-of-``vehicles`` sampling without replacement."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=vehicles, neighboring_relation=NeighboringRelation.REPLACE_ONE,
        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier / 2, sample_size=sampled,
                                            population_size=vehicles), count=rounds)
    return float(accountant.get_epsilon(delta))
