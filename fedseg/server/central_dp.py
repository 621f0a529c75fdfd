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
* the noise lands on a mean of clipped updates: strategies that pick or trim updates (robust
  aggregators) are refused (``StrategyEntry.noise_on_mean``); a server optimizer (FedAvgM, FedAdam)
  steps after the noise, on the noised mean (``fedseg/server/noised_mean.py``).

Accounting: Flower samples exactly ``m`` of the ``n`` vehicles without replacement each round, so the
neighbouring relation is "replace one vehicle" (n is public) and sampling is without replacement:
Flower 1.42's own ``RdpAccountant`` (Google's dp-accounting underneath) for that model. Replacing one
vehicle moves the sum of clipped updates by up to 2C while the noise std on the sum is
``noise_multiplier * C``, so the accountant is given the effective multiplier ``noise_multiplier / 2``.

Adaptive clipping (``privacy.clipping=adaptive``, Andrew et al. 2021, Flower's
``DifferentialPrivacyClientSideAdaptiveClipping``): each vehicle also reports whether its update was
within the round's norm, and the server noises that count with std ``clipped_count_stddev`` (sigma_b)
to move the norm towards ``target_clipped_quantile``. Flower then adds the update noise with the
larger multiplier ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (:func:`update_noise_multiplier`), so that
the update and the count together are one Gaussian mechanism with multiplier ``z = noise_multiplier``
(Andrew et al., Thm 1, for add/remove one; replacing one vehicle doubles both sensitivities, 2C and 1,
so ``z / 2`` again). The accountant is therefore the same call with the configured ``noise_multiplier``.
Flower 1.42's vehicles report whether their update *was clipped*, and its norm update
``C *= exp(-clip_norm_lr (clipped fraction - target))`` then shrinks C when too many are clipped
(Andrew et al. count the updates within C); :class:`AdaptiveClipping` hands Flower's update the
within-norm bits and ``1 - target_clipped_quantile``, which is Andrew et al.'s rule for the target
clipped fraction. Which bit is counted changes neither sensitivity nor the accounting. Flower 1.42 also
moves the norm before it adds the noise; :class:`AdaptiveClipping` noises at the round's norm, which the
accounting assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.common import FitRes, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_adaptive_noise_params
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


class AdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive-clipping wrapper with its norm moving the right way (module docstring):
    too many updates clipped raises the norm, too few lowers it, towards ``target_clipped_quantile``.

    The noise is calibrated to the norm the vehicles clipped to this round. Flower 1.42 moves the norm
    first and noises the mean at the *next* round's norm, so a round whose norm falls is under-noised by
    up to ``exp(-clip_norm_lr)`` against what the accountant assumes; Andrew et al. (Algorithm 1) noise
    at the round's norm, then move it. ``round_clipping_norm`` is the norm of the last aggregated round
    (``metrics.jsonl``'s ``clipping_norm``)."""

    def __init__(self, inner: Strategy, *, target_clipped_quantile: float, **flower: Any) -> None:
        super().__init__(inner, target_clipped_quantile=1 - target_clipped_quantile, **flower)
        self.round_clipping_norm: float | None = None
        self._next_norm: float | None = None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._next_norm = None
        clipped_to = self.clipping_norm  # what configure_fit sent this round's vehicles
        aggregated = super().aggregate_fit(server_round, results, failures)  # noise at clipped_to
        self.round_clipping_norm = clipped_to
        if self._next_norm is not None:  # Flower moved it (a round with failures does not)
            self.clipping_norm = self._next_norm
        return aggregated

    def _update_clip_norm(self, results: list[tuple[ClientProxy, FitRes]]) -> None:
        within = [(proxy, FitRes(res.status, res.parameters, res.num_examples,
                                 {**res.metrics, KEY_NORM_BIT: not res.metrics[KEY_NORM_BIT]}))
                  if KEY_NORM_BIT in res.metrics else (proxy, res) for proxy, res in results]
        clipped_to = self.clipping_norm
        super()._update_clip_norm(within)  # Flower names a vehicle that sent no bit
        # Held back until the noise is on (aggregate_fit): Flower noises right after this call.
        self._next_norm, self.clipping_norm = self.clipping_norm, clipped_to


def sampled_vehicles(spec: CentralDPSpec, fed: FederationSpec) -> int:
    """Vehicles in each round's average; ``num_sampled_clients`` may only restate what Flower samples."""
    sampled = fed.vehicles_per_round
    if spec.num_sampled_clients is not None and spec.num_sampled_clients != sampled:
        raise ValueError(f"privacy.num_sampled_clients={spec.num_sampled_clients} but Flower samples {sampled} "
                         "vehicles per round (federation.num_clients x fraction_fit, at least min_fit_clients): "
                         "the noise would be calibrated to the wrong count; set it to null")
    return sampled


def wrap_central_dp(strategy: Strategy, spec: CentralDPSpec, fed: FederationSpec) -> Strategy:
    """Flower's client-side fixed- or adaptive-clipping DP wrapper around equal-weight averaging."""
    sampled = sampled_vehicles(spec, fed)
    if spec.clipping == "adaptive":
        return AdaptiveClipping(
            EqualWeights(strategy, sampled), noise_multiplier=spec.noise_multiplier, num_sampled_clients=sampled,
            initial_clipping_norm=spec.clipping_norm, target_clipped_quantile=spec.target_clipped_quantile,
            clip_norm_lr=spec.clip_norm_lr, clipped_count_stddev=spec.clipped_count_stddev)
    return DifferentialPrivacyClientSideFixedClipping(
        EqualWeights(strategy, sampled), noise_multiplier=spec.noise_multiplier,
        clipping_norm=spec.clipping_norm, num_sampled_clients=sampled)


def update_noise_multiplier(spec: CentralDPSpec, sampled: int) -> float:
    """The multiplier of the noise on the update: ``noise_multiplier`` under fixed clipping; under adaptive
    clipping Flower's ``z_update`` (module docstring). One line naming the keys where Flower refuses."""
    if spec.clipping != "adaptive":
        return spec.noise_multiplier
    try:
        return compute_adaptive_noise_params(spec.noise_multiplier, sampled, spec.clipped_count_stddev)[1]
    except ValueError:
        stddev = spec.clipped_count_stddev if spec.clipped_count_stddev is not None else sampled / 20
        raise ValueError(f"privacy.clipping=adaptive: privacy.noise_multiplier={spec.noise_multiplier:g} needs "
                         f"privacy.clipped_count_stddev above {spec.noise_multiplier / 2:g} (got {stddev:g}; "
                         f"null: {sampled} vehicles / 20): raise it or sample more vehicles") from None


def calibrate_noise_multiplier(target_epsilon: float, *, vehicles: int, sampled: int, rounds: int,
                               delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose :func:`central_epsilon` is at most ``target_epsilon``."""
    low, high = 0.0, 1.0
    while central_epsilon(high, vehicles=vehicles, sampled=sampled, rounds=rounds, delta=delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon:g} is out of reach for {rounds} rounds of {sampled} of "
                             f"{vehicles} vehicles")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if central_epsilon(mid, vehicles=vehicles, sampled=sampled, rounds=rounds, delta=delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


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
