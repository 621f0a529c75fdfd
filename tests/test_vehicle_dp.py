"""Vehicle-level DP at fleet scale: a trained part (the rest exactly the public weights, never noised),
adaptive clipping with its count noise in the accountant, and a server optimizer on the noised mean.
Golden numbers by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from test_central_dp import ORDERS
from toy_fleet import START, Fleet, toy_updates

from fedseg.config import FederationSpec, ModelSpec
from fedseg.models import build_run_model, trained_mask, trained_names
from fedseg.privacy import CentralDPSpec, default_delta
from fedseg.server.central_dp import (
    AdaptiveClipping,
    calibrate_noise_multiplier,
    central_accounting,
    central_epsilon,
    update_noise_multiplier,
    wrap_central_dp,
)
from fedseg.server.compose import check_composition, compose_server
from fedseg.server.noised_mean import ServerStep
from fedseg.server.wrapper import inner_of
from fedseg.settings import RunSettings


def layer(strategy: Strategy, kind: type) -> Any:
    """The layer of type ``kind`` in a composed chain."""
    current: Strategy | None = strategy
    while current is not None and not isinstance(current, kind):
        current = inner_of(current)
    assert current is not None, f"no {kind.__name__} in {strategy!r}"
    return current


# --- privacy.trainable: what a vehicle trains, and what the server noises


def test_each_trainable_part_marks_its_parameters_and_never_a_buffer() -> None:
    model = build_run_model(ModelSpec(name="tiny"), 3, seed=0, dp=True)
    names = {name for name, _ in model.named_parameters()}

    head, norm = trained_names(model, "head"), trained_names(model, "norm")

    assert head == {"segmentation_head.0.weight", "segmentation_head.0.bias"}
    assert head < norm < names and trained_names(model, "all") == names
    assert all(name.rsplit(".", 1)[-1] in ("weight", "bias") for name in norm)
    assert trained_names(model, "decoder") == {name for name in names if not name.startswith("encoder.")}
    mask = trained_mask(model, "head")
    assert sum(mask) == 2 and len(mask) == len(model.state_dict())
    with pytest.raises(ValueError, match=r"privacy.trainable='bias'; valid: \['all', 'decoder', 'norm', 'head'\]"):
        trained_names(model, "bias")


def test_a_vehicle_under_central_dp_changes_only_its_trainable_part(tmp_path: Path) -> None:
    from flwr.common import Context, RecordDict

    from fedseg.clients.client_app import VehicleClient
    from fedseg.config import to_run_config
    from fedseg.models import get_weights
    from fedseg.settings import settings_of

    cfg = {"data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                    "heldout_frames": 2},
           "model": {"name": "tiny"}, "federation": {"num_clients": 2, "min_fit_clients": 2, "batch_size": 2},
           "privacy": {"name": "central", "trainable": "head"}, "output_dir": str(tmp_path / "run")}
    s = settings_of(to_run_config(cfg))
    client = VehicleClient(s, 0, Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                                         state=RecordDict(), run_config={}))
    model = build_run_model(s.model, client.num_classes, seed=0, dp=True)
    weights = get_weights(model)

    returned, _, _ = client.fit(weights, {"server_round": 1, "local_epochs": 1})

    changed = [not np.array_equal(a, b) for a, b in zip(returned, weights, strict=True)]
    assert changed == trained_mask(model, "head")  # the head moved; every other array bit for bit as sent


@pytest.mark.parametrize("trainable, frozen_noised", [("head", False), ("all", True)])
def test_frozen_arrays_leave_the_round_exactly_as_the_global_and_unnoised(trainable: str,
                                                                          frozen_noised: bool) -> None:
    # Prepare: array 0 is trained, array 1 frozen (the vehicles leave it as received, except vehicle 2,
    # which tries to move it). Noise std 1.0 * 1.0 / 3 on what the DP wrapper is handed.
    updates = [[u[0], np.zeros(4, np.float32)] for u in toy_updates()]
    tamper = {2: lambda p: [p[0] - 0.1, p[1] + 50.0]}
    privacy = {"name": "central", "noise_multiplier": 1.0, "clipping_norm": 1.0, "trainable": trainable}

    # Execute
    fleet = Fleet(updates, [1, 2, 3], {"name": "none"}, privacy=privacy, federation={"min_fit_clients": 3},
                  send=tamper, trained=[True, False]).run()

    # Assert: under trainable=head the frozen array is the global's bit for bit; Flower's wrapper noises
    # every array it is given, so under all it is noised like the trained one.
    trained, frozen = fleet.globals[-1]
    assert not np.allclose(trained, START, atol=0.05)
    assert np.array_equal(frozen, np.full(4, START, np.float32)) is not frozen_noised


def test_under_secagg_the_frozen_arrays_also_leave_the_round_as_the_global() -> None:
    # Prepare: SecAgg+ masks every array (zero updates in the frozen one); the noise goes on the trained one.
    updates = [[u[0], np.zeros(4, np.float32)] for u in toy_updates()]
    privacy = {"name": "central", "noise_multiplier": 1.0, "clipping_norm": 1.0, "trainable": "head"}
    secagg = {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2}

    # Execute
    fleet = Fleet(updates, [1, 2, 3], secagg, privacy=privacy, federation={"min_fit_clients": 3},
                  trained=[True, False]).run()

    # Assert
    trained, frozen = fleet.globals[-1]
    assert np.array_equal(frozen, np.full(4, START, np.float32)) and not np.allclose(trained, START, atol=0.05)


# --- adaptive clipping: its count noise in the accountant


def epsilon_adaptive_by_hand(z_update: float, count_stddev: float, rounds: int, delta: float) -> float:
    """Every vehicle sampled; one round releases the noised sum of clipped updates (std z_update * C,
    replace-one sensitivity 2C) and the noised count of clipped updates (std sigma_b, sensitivity 1):
    one Gaussian mechanism on both, RDP(a) = a/2 * ((2 / z_update)^2 + (1 / sigma_b)^2) per round;
    RDP -> (eps, delta) as dp-accounting converts (test_central_dp.epsilon_by_hand)."""
    rdp = rounds * ORDERS / 2 * ((2 / z_update) ** 2 + (1 / count_stddev) ** 2)
    eps = rdp + np.log((ORDERS - 1) / ORDERS) - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1)
    return float(eps.min())


def test_adaptive_clipping_noise_and_epsilon_match_the_hand_computation() -> None:
    # Prepare: z = 1.0, count noise sigma_b = 1.0, 4 vehicles all sampled, 3 rounds.
    spec = CentralDPSpec(noise_multiplier=1.0, clipping="adaptive", clipped_count_stddev=1.0)
    fed = FederationSpec(num_clients=4, fraction_fit=1.0, min_fit_clients=4)
    z_update = (1.0 ** -2 - (2 * 1.0) ** -2) ** -0.5  # = 2 / sqrt(3): Andrew et al. 2021, Thm 1

    # Execute
    wrapper = wrap_central_dp(Mock(spec=Strategy), spec, fed)
    eps, delta = central_accounting(spec, fed)(3)

    # Assert: Flower adds the update noise at z_update; the run's epsilon is the existing accountant's at
    # z = 1.0, which is the two-part mechanism computed by hand.
    assert z_update == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert isinstance(wrapper, AdaptiveClipping)
    assert wrapper.noise_multiplier == pytest.approx(z_update, rel=1e-12) == update_noise_multiplier(spec, 4)
    assert wrapper.clipped_count_stddev == 1.0
    assert delta == default_delta(4)
    assert eps == central_epsilon(1.0, vehicles=4, sampled=4, rounds=3, delta=delta)
    assert eps == pytest.approx(epsilon_adaptive_by_hand(z_update, 1.0, 3, delta), rel=1e-9)


def test_adaptive_clipping_raises_the_norm_when_too_many_updates_are_clipped() -> None:
    # Prepare: the 3 toy updates have norms sqrt(7) * (1, 4, 2), all above the initial norm 1.0; no noise
    # (count noise 0), target clipped fraction 0.5, clip_norm_lr 0.2.
    privacy = {"name": "central", "clipping": "adaptive", "noise_multiplier": 0.0, "clipping_norm": 1.0,
               "target_clipped_quantile": 0.5, "clip_norm_lr": 0.2}

    # Execute
    fleet = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, privacy=privacy,
                  federation={"min_fit_clients": 3}).run()

    # Assert: round 1 averaged the updates clipped to 1.0 (signs +, +, -), and the norm rose by
    # exp(0.2 * (1 - 0.5)) (Flower 1.42's own update would have lowered it by the same factor).
    unit = 1 / math.sqrt(7)
    np.testing.assert_allclose(fleet.globals[-1][0], START + unit / 3, rtol=1e-6)
    np.testing.assert_allclose(fleet.globals[-1][1], START - unit / 6, rtol=1e-6)
    assert layer(fleet.parts.strategy, AdaptiveClipping).clipping_norm == pytest.approx(math.exp(0.1))


def test_adaptive_clipping_noises_each_round_at_the_norm_its_vehicles_clipped_to() -> None:
    # Prepare: 4 vehicles change one of 20,000 coordinates by 0.001 (Flower's adaptive clipping divides by
    # the update's norm: an update of exactly zero fails), so the others move by the noise alone, of std
    # z_update * C / 4 with C the norm the vehicles were sent. None is clipped against a target clipped
    # fraction of 0.5 at clip_norm_lr 1.0, so the norm falls by about exp(-0.5) each round; the count noise
    # sigma_b = 2.0 gives z_update = (1 - 1/16)^(-1/2).
    privacy = {"name": "central", "clipping": "adaptive", "noise_multiplier": 1.0, "clipping_norm": 1.0,
               "target_clipped_quantile": 0.5, "clip_norm_lr": 1.0, "clipped_count_stddev": 2.0}
    tiny = [[np.eye(1, 20_000, dtype=np.float32)[0] * 1e-3] for _ in range(4)]
    np.random.seed(0)  # Flower's noise and count noise draw from numpy's global generator

    # Execute
    fleet = Fleet(tiny, [1, 1, 1, 1], {"name": "none"}, privacy=privacy, rounds=2,
                  federation={"min_fit_clients": 4}).run()

    # Assert: each round's noise is at the norm that round's rows report, the one its vehicles clipped to
    # (Flower 1.42 alone noises at the next round's norm, lower here: under-noised).
    norms = [row["clipping_norm"] for row in fleet.rows[1:]]
    z_update = (1.0 - 1 / 16) ** -0.5
    assert norms[0] == 1.0 and norms[1] < 0.8  # the norm moved between the two rounds
    for round_, norm in enumerate(norms, start=1):
        noise = fleet.globals[round_][0][1:] - fleet.globals[round_ - 1][0][1:]
        assert float(noise.std()) == pytest.approx(z_update * norm / 4, rel=0.03)


def test_a_resumed_run_continues_from_the_adaptive_norm_it_reached() -> None:
    # Prepare: as above (norms rise by exp(0.1) a round, no noise); the uninterrupted 3 rounds, and the
    # first round alone with what its checkpoint would hold.
    privacy = {"name": "central", "clipping": "adaptive", "noise_multiplier": 0.0, "clipping_norm": 1.0,
               "target_clipped_quantile": 0.5, "clip_norm_lr": 0.2}
    full = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, privacy=privacy, rounds=3,
                 federation={"min_fit_clients": 3}).run()
    first = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, privacy=privacy, rounds=1,
                  federation={"min_fit_clients": 3}).run()

    # Execute
    resumed = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, privacy=privacy, rounds=3,
                    federation={"min_fit_clients": 3}).run(start_round=1, initial=first.globals[-1],
                                                           state=first.resume)

    # Assert: rounds 2 and 3 clip to the norms of the uninterrupted run, not the initial 1.0 again.
    assert [r["clipping_norm"] for r in full.rows[1:]] == pytest.approx([1.0, math.exp(0.1), math.exp(0.2)])
    assert [r["clipping_norm"] for r in resumed.rows] == pytest.approx([math.exp(0.1), math.exp(0.2)])
    np.testing.assert_allclose(resumed.globals[-1][0], full.globals[-1][0], rtol=1e-6)


# --- a server optimizer on the noised mean


def fit_res(arrays: list[np.ndarray]) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})


def test_server_momentum_steps_on_the_noised_mean_computed_by_hand() -> None:
    # Prepare: 2 vehicles, both sampled, noise std 1.0 * 1.0 / 2 from numpy's seeded generator (Flower's);
    # FedAvgM with server lr 0.5 and momentum 0.9, composed as a run composes it.
    settings = RunSettings.from_config({
        "federation": {"num_clients": 2, "min_fit_clients": 2}, "privacy": {"name": "central", "noise_multiplier": 1.0},
        "strategy": {"name": "fedavgm", "server_learning_rate": 0.5, "server_momentum": 0.9}})
    w0 = np.zeros(4, np.float32)
    parts = compose_server(settings, on_round=lambda row, resume: None,
                           initial_parameters=ndarrays_to_parameters([w0]), partition_sizes=[8, 8])
    step = layer(parts.strategy, ServerStep)
    proxies = [Mock(spec=ClientProxy), Mock(spec=ClientProxy)]
    deltas = [np.array([0.2, 0.0, -0.4, 0.0], np.float32), np.array([0.0, 0.6, 0.0, 0.2], np.float32)]

    # Execute: two rounds
    globals_ = [w0]
    for server_round, seed in ((1, 5), (2, 6)):
        np.random.seed(seed)
        results = [(p, fit_res([globals_[-1] + d])) for p, d in zip(proxies, deltas, strict=True)]
        stepped, _ = step.aggregate_fit(server_round, results, [])
        globals_.append(parameters_to_ndarrays(stepped)[0])

    # Assert: v1 = w0 - noised1, w1 = w0 - 0.5 v1; v2 = 0.9 v1 + (w1 - noised2), w2 = w1 - 0.5 v2.
    noise = [np.random.RandomState(seed).normal(0, 0.5, 4).astype(np.float32) for seed in (5, 6)]
    w, velocity = w0, np.zeros(4, np.float32)
    for i in range(2):
        noised = w + (deltas[0] + deltas[1]) / 2 + noise[i]
        velocity = 0.9 * velocity + (w - noised) if i else w - noised
        w = w - 0.5 * velocity
        np.testing.assert_allclose(globals_[i + 1], w, rtol=1e-5, atol=1e-6)
    assert globals_[2].dtype == np.float32


def test_fedadam_under_central_dp_steps_from_the_mean_of_clipped_updates() -> None:
    # Prepare: no noise, clipping far above the updates: the noised mean is the plain mean, START + 1 in
    # array 0 and START - 0.5 in array 1 (equal weights). Adam's first step moves each coordinate by
    # eta_norm * sign(delta), eta_norm = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2) (Flower counts round + 1).
    privacy = {"name": "central", "noise_multiplier": 0.0, "clipping_norm": 100.0}

    # Execute
    fleet = Fleet(toy_updates(), [1, 2, 3], {"name": "none"}, strategy="fedadam", privacy=privacy,
                  federation={"min_fit_clients": 3}).run()

    # Assert
    eta_norm = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    np.testing.assert_allclose(fleet.globals[-1][0], START + eta_norm, rtol=1e-6)
    np.testing.assert_allclose(fleet.globals[-1][1], START - eta_norm, rtol=1e-6)
    assert fleet.globals[-1][0].dtype == np.float32


# --- what the composition admits, and the calibration the benchmark uses


def settings(**blocks: object) -> RunSettings:
    return RunSettings.from_config({"federation": {"num_clients": 4, "min_fit_clients": 2}, **blocks})


@pytest.mark.parametrize("cfg, message", [
    ({"privacy": {"name": "central", "clipping": "adaptive", "noise_multiplier": 3.0, "clipped_count_stddev": 1.0}},
     r"privacy.noise_multiplier=3 needs privacy.clipped_count_stddev above 1.5 \(got 1;"),
    ({"privacy": {"name": "central", "clipping": "adaptive", "noise_multiplier": 0.1},
      "secagg": {"name": "secaggplus"}}, r"clipped bit in clear.*valid with SecAgg\+: privacy.clipping=fixed"),
    ({"privacy": {"name": "central", "clipping": "adaptive", "noise_multiplier": 0.1},
      "compression": {"name": "topk"}}, r"cannot take compression=topk.*valid: compression=none"),
])
def test_adaptive_clipping_refuses_what_it_cannot_account_for(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_composition(settings(**cfg), [8, 8, 8, 8])


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_central_dp_admits_a_server_optimizer(strategy: str) -> None:
    check_composition(settings(privacy={"name": "central"}, strategy={"name": strategy}), [8, 8, 8, 8])


def test_layers_inside_the_trained_part_see_its_statistics_tags_only() -> None:
    from fedseg.server.statistics_mean import StatisticsMean

    parts = compose_server(settings(privacy={"name": "central", "trainable": "head"}), on_round=lambda r, s: None,
                           statistics=["", "running_mean", ""], trained=[True, False, True])

    assert layer(parts.strategy, StatisticsMean).statistics == ["", ""]


def test_a_trained_part_needs_the_model_mask() -> None:
    with pytest.raises(ValueError, match=r"privacy.trainable=head: the server needs the model's trained arrays"):
        compose_server(settings(privacy={"name": "central", "trainable": "head"}), on_round=lambda r, s: None)


def test_calibrated_noise_is_the_smallest_within_the_target_epsilon() -> None:
    delta = default_delta(2000)

    z = calibrate_noise_multiplier(8.0, vehicles=2000, sampled=200, rounds=20, delta=delta)

    assert central_epsilon(z, vehicles=2000, sampled=200, rounds=20, delta=delta) <= 8.0
    assert central_epsilon(z * 0.99, vehicles=2000, sampled=200, rounds=20, delta=delta) > 8.0
