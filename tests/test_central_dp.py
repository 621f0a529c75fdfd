"""Client-level DP: epsilon recomputed by hand, equal weights, and the settings the accounting does not cover."""

from __future__ import annotations

import math

import numpy as np
import pytest
from toy_fleet import START, Fleet, toy_updates

from fedseg.config import FederationSpec
from fedseg.privacy import CentralDPSpec, default_delta
from fedseg.server.central_dp import central_accounting, central_epsilon
from fedseg.server.compose import check_composition
from fedseg.settings import RunSettings

# dp-accounting's default RDP orders (Flower's RdpAccountant uses them).
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512], float)


def epsilon_by_hand(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Every vehicle sampled (m = n): each round is a Gaussian mechanism on the sum of clipped updates,
    sensitivity 2C under replace-one, noise std sigma*C: RDP(a) = a / (2 (sigma/2)^2) per round; RDP ->
    (eps, delta) by the conversion dp-accounting uses (Canonne, Kamath, Steinke 2020)."""
    z = noise_multiplier / 2
    rdp = rounds * ORDERS / (2 * z * z)
    eps = rdp + np.log((ORDERS - 1) / ORDERS) - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1)
    return float(eps.min())


def test_epsilon_without_subsampling_matches_the_hand_computation() -> None:
    delta = default_delta(4)

    got = central_epsilon(2.0, vehicles=4, sampled=4, rounds=5, delta=delta)

    assert got == pytest.approx(epsilon_by_hand(2.0, 5, delta), rel=1e-9)


def test_subsampling_without_replacement_lowers_epsilon_and_rounds_raise_it() -> None:
    delta = 1e-5
    full = central_epsilon(2.0, vehicles=100, sampled=100, rounds=10, delta=delta)
    sampled = central_epsilon(2.0, vehicles=100, sampled=10, rounds=10, delta=delta)
    longer = central_epsilon(2.0, vehicles=100, sampled=10, rounds=40, delta=delta)

    assert sampled < full and sampled < longer < math.inf
    assert central_epsilon(2.0, vehicles=100, sampled=10, rounds=0, delta=delta) == 0.0


def test_run_reports_the_accountant_epsilon_for_its_own_fleet() -> None:
    fed = FederationSpec(num_clients=8, fraction_fit=0.5, min_fit_clients=2)
    spec = CentralDPSpec(noise_multiplier=1.5)

    eps, delta = central_accounting(spec, fed)(3)

    assert delta == default_delta(8)
    assert eps == central_epsilon(1.5, vehicles=8, sampled=4, rounds=3, delta=delta)


def test_vehicles_are_averaged_with_equal_weights_under_central_dp() -> None:
    # Vehicles train on 1, 2 and 3 frames; with noise 0 the average must be the plain mean of the
    # clipped updates (1+4-2)/3 = 1, not FedAvg's frame-weighted 0.5. Clipping 100: nothing clipped.
    fleet = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, federation={"min_fit_clients": 3},
                  privacy={"name": "central", "noise_multiplier": 0.0, "clipping_norm": 100.0}).run()

    np.testing.assert_allclose(fleet.globals[-1][0], np.full((2, 3), START + 1.0), rtol=1e-6)


def settings(**blocks: object) -> RunSettings:
    return RunSettings.from_config({"federation": {"num_clients": 4, "min_fit_clients": 2}, **blocks})


@pytest.mark.parametrize("cfg, message", [
    ({"strategy": {"name": "fedexp"}}, r"strategy=fedexp scales its server step"),
    ({"strategy": {"name": "fedmedian"}}, r"strategy=fedmedian is not a mean"),
    ({"privacy": {"name": "central", "num_sampled_clients": 2}}, r"num_sampled_clients=2 but Flower samples 4"),
])
def test_settings_the_accounting_does_not_cover_are_refused(cfg: dict, message: str) -> None:
    blocks = {"privacy": {"name": "central"}, **cfg}

    with pytest.raises(ValueError, match=message):
        check_composition(settings(**blocks), [8, 8, 8, 8])


@pytest.mark.parametrize("secagg", [{"name": "none"}, {"name": "secaggplus", "num_shares": 3,
                                                        "reconstruction_threshold": 2}])
def test_a_run_reports_after_each_round_the_epsilon_computed_by_hand(secagg: dict) -> None:
    # Prepare: 3 vehicles, all sampled every round (min_fit_clients 3), noise multiplier 2.0. Under
    # SecAgg+ the noise is added once, to the mean of the masked sum, so the accounting is the same.
    privacy = {"name": "central", "noise_multiplier": 2.0, "clipping_norm": 1.0}

    # Execute
    fleet = Fleet(toy_updates(), [1, 2, 3], secagg, privacy=privacy, rounds=2,
                  federation={"min_fit_clients": 3}).run()

    # Assert: what the run recorded for rounds 1 and 2 is the hand computation for that many rounds
    delta, rows = default_delta(3), [row for row in fleet.rows if row["round"] > 0]
    assert [row["round"] for row in rows] == [1, 2] and [row["delta"] for row in rows] == [delta, delta]
    assert [row["epsilon"] for row in rows] == pytest.approx(
        [epsilon_by_hand(2.0, 1, delta), epsilon_by_hand(2.0, 2, delta)], rel=1e-9)
