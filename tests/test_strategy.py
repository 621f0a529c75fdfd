"""Server strategies: Flower's aggregation golden numbers and the round recorder's bookkeeping."""

from __future__ import annotations

from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvgM

from fedseg.server.arrays import parameters_bytes, parameters_view
from fedseg.server.notes import RoundNotes
from fedseg.server.recorder import RoundRecorder
from fedseg.server.replies import ReplyRules
from fedseg.server.statistics_mean import StatisticsMean
from fedseg.server.strategies import build_strategy


def fit_res(arrays: list[np.ndarray], n: int, **metrics: float) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, dict(metrics))


def proxy(cid: str) -> MagicMock:
    p = MagicMock()
    p.cid = cid
    return p


def test_fedavg_weights_updates_by_examples_hand_computed() -> None:
    # Prepare: vehicle A (1 frame) sends 1s, vehicle B (2 frames) sends 4s.
    rows: list[dict] = []
    strategy = RoundRecorder(build_strategy("fedavg", {}), RoundNotes(), on_round=lambda row, resume: rows.append(row),
                             replies=ReplyRules(max_examples=2))
    a, b = [np.full((2, 2), 1.0, np.float32)], [np.full((2, 2), 4.0, np.float32)]
    results = [(proxy("a"), fit_res(a, 1, loss=0.9)), (proxy("b"), fit_res(b, 2, loss=0.6))]

    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])

    # Assert: (1*1 + 4*2) / 3 = 3.0 everywhere; loss (0.9*1 + 0.6*2) / 3 = 0.7
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], np.full((2, 2), 3.0))
    assert strategy._pending["train_loss"] == pytest.approx(0.7)
    assert strategy._pending["bytes_up"] == 2 * parameters_bytes(ndarrays_to_parameters(a))
    assert strategy._pending["clients"] == 2


def test_fedavg_result_does_not_depend_on_the_order_replies_arrive_in() -> None:
    # Prepare: three equal-weight vehicles whose float32 sum depends on the order of its terms
    # ((1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1 in float32), in every order they could arrive.
    values = {0: 1e8, 1: 1.0, 2: -1e8}
    replies = {i: (proxy(f"node{i}"), fit_res([np.full(2, v, np.float32)], 1, partition_id=i))
               for i, v in values.items()}
    orders = [(0, 1, 2), (0, 2, 1), (2, 1, 0), (1, 0, 2)]

    # Execute
    outcomes = []
    for order in orders:
        strategy = RoundRecorder(build_strategy("fedavg", {}), RoundNotes(), on_round=lambda row, resume: None)
        params, _ = strategy.aggregate_fit(1, [replies[i] for i in order], [])
        outcomes.append(parameters_to_ndarrays(params)[0].tobytes())

    # Assert: bit-identical whatever the arrival order
    assert len(set(outcomes)) == 1


def test_skipped_vehicle_is_left_out_of_the_average_and_counted() -> None:
    strategy = RoundRecorder(build_strategy("fedavg", {}), RoundNotes(), on_round=lambda row, resume: None)
    results = [
        (proxy("a"), fit_res([np.full(3, 2.0, np.float32)], 5, loss=1.0, partition_id=0)),
        (proxy("b"), fit_res([np.full(3, 99.0, np.float32)], 5, skipped=True, partition_id=1, epsilon=3.0)),
    ]

    params, _ = strategy.aggregate_fit(1, results, [])

    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], np.full(3, 2.0))
    assert strategy._pending["skipped"] == ["b"] and strategy._pending["clients"] == 1
    assert strategy.client_epsilon == {"1": 3.0}  # kept by partition: what a resumed run finds again


def test_a_vehicle_claiming_anothers_partition_cannot_lower_its_epsilon() -> None:
    strategy = RoundRecorder(build_strategy("fedavg", {}), RoundNotes(), on_round=lambda row, resume: None)
    honest = (proxy("a"), fit_res([np.full(3, 1.0, np.float32)], 5, partition_id=0, epsilon=4.0))
    liar = (proxy("b"), fit_res([np.full(3, 1.0, np.float32)], 5, partition_id=0, epsilon=0.5))

    strategy.aggregate_fit(1, [honest, liar], [])

    assert strategy.client_epsilon == {"0": 4.0}


def test_evaluate_emits_a_contract_row() -> None:
    rows: list[dict] = []
    inner = build_strategy("fedavg", {}, evaluate_fn=lambda r, a, c: (0.5, {"miou": 0.25, "iou/road": 0.5,
                                                                           "iou/sky": float("nan")}))
    strategy = RoundRecorder(inner, RoundNotes(), on_round=lambda row, resume: rows.append(row))

    strategy.evaluate(0, ndarrays_to_parameters([np.zeros(1, np.float32)]))

    assert rows[0]["round"] == 0 and rows[0]["loss"] == 0.5 and rows[0]["miou"] == 0.25
    assert rows[0]["per_class_iou"] == {"road": 0.5, "sky": None}
    assert rows[0]["epsilon"] is None and rows[0]["bytes_up"] == 0


def test_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'median'.*fedadam.*fedavg.*fedprox"):
        build_strategy("median", {})


def test_fedavgm_steps_with_server_momentum_as_flower_defines_it() -> None:
    # Prepare: global 0; momentum 0.5, server lr 1. Round 1 vehicles send 1 and 3 (mean 2), round 2
    # they send 3 and 5 (mean 4) from the new global.
    start = ndarrays_to_parameters([np.zeros(2, np.float32)])
    strategy = StatisticsMean(build_strategy("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.5},
                                             initial_parameters=start))
    one = [(proxy("a"), fit_res([np.full(2, 1.0, np.float32)], 1)), (proxy("b"), fit_res([np.full(2, 3.0, np.float32)], 1))]
    two = [(proxy("a"), fit_res([np.full(2, 3.0, np.float32)], 1)), (proxy("b"), fit_res([np.full(2, 5.0, np.float32)], 1))]

    # Execute
    first, _ = strategy.aggregate_fit(1, one, [])
    second, _ = strategy.aggregate_fit(2, two, [])

    # Assert: round 1 velocity = 0 - 2 = -2 -> 0 + 2 = 2 (FedAvg's mean); round 2 velocity
    # 0.5 x -2 + (2 - 4) = -3 -> 2 + 3 = 5, where FedAvg would give 4.
    np.testing.assert_allclose(parameters_to_ndarrays(first)[0], [2.0, 2.0])
    np.testing.assert_allclose(parameters_to_ndarrays(second)[0], [5.0, 5.0])


def test_server_momentum_leaves_batchnorm_statistics_to_the_plain_mean() -> None:
    # Prepare: array 0 a weight, array 1 a running variance (flagged), array 2 an integer counter.
    start = ndarrays_to_parameters([np.zeros(1, np.float32), np.zeros(1, np.float32), np.array(0)])
    strategy = StatisticsMean(build_strategy("fedavgm", {"server_momentum": 0.9}, initial_parameters=start),
                              statistics=[False, True, True])

    def send(value: float, count: int, n: int) -> FitRes:
        return fit_res([np.full(1, value, np.float32), np.full(1, value, np.float32), np.array(count)], n)

    for server_round, base in ((1, 1.0), (2, 3.0)):
        results = [(proxy("a"), send(base, 10 * server_round, 1)), (proxy("b"), send(base + 2, 20 * server_round, 3))]
        params, _ = strategy.aggregate_fit(server_round, results, [])

    # Assert: round 2's frame-weighted mean is (3 x 1 + 5 x 3) / 4 = 4.5: the statistic is exactly that,
    # the weight moved further (velocity); the counter is (20 + 40 x 3) / 4 = 35.
    weight, variance, counter = parameters_to_ndarrays(params)
    assert variance[0] == pytest.approx(4.5) and weight[0] > 4.5 + 1.0
    assert counter == 35 and counter.dtype == np.int64


def test_flower_inplace_fedavg_zeroes_integer_counters_and_the_wrapper_restores_their_mean() -> None:
    results = [(proxy("a"), fit_res([np.array(10), np.ones(1, np.float32)], 1)),
               (proxy("b"), fit_res([np.array(30), np.ones(1, np.float32)], 3))]

    plain, _ = build_strategy("fedavg", {}).aggregate_fit(1, results, [])
    fixed, _ = StatisticsMean(build_strategy("fedavg", {})).aggregate_fit(1, results, [])

    assert parameters_to_ndarrays(plain)[0] == 0  # Flower casts each weight (0.25, 0.75) to int: 0
    assert parameters_to_ndarrays(fixed)[0] == 25  # (10 x 1 + 30 x 3) / 4


def test_fedavgm_in_place_matches_flowers_fedavgm_over_rounds() -> None:
    # Prepare: the same random rounds through Flower's FedAvgM and the registry's in-place one.
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    options = {"server_learning_rate": 1.5, "server_momentum": 0.7}
    ours = build_strategy("fedavgm", options, initial_parameters=ndarrays_to_parameters(start))
    flowers = FedAvgM(initial_parameters=ndarrays_to_parameters(start), **options)

    for server_round in (1, 2, 3):
        sent = [[rng.normal(size=a.shape).astype(np.float32) for a in start] for _ in range(3)]
        results = [(proxy(str(i)), fit_res(arrays, i + 1)) for i, arrays in enumerate(sent)]
        again = [(proxy(str(i)), fit_res(arrays, i + 1)) for i, arrays in enumerate(sent)]
        mine, _ = ours.aggregate_fit(server_round, results, [])
        theirs, _ = flowers.aggregate_fit(server_round, again, [])

        # Assert: every round's model is Flower's, to float32 rounding.
        for a, b in zip(parameters_to_ndarrays(mine), parameters_to_ndarrays(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fedadam_global_model_keeps_float32_so_the_next_round_is_not_rejected() -> None:
    # Prepare: the composed server (strategy -> statistics -> guard -> recorder) for FedAdam, whose
    # bias correction is a float64 scalar, and two vehicles sending float32 updates each round.
    from flwr.server.client_manager import SimpleClientManager

    from fedseg.config import to_run_config
    from fedseg.server.compose import compose_server
    from fedseg.settings import settings_of

    rows: list[dict] = []
    settings = settings_of(to_run_config({"strategy": {"name": "fedadam"}, "federation": {
        "num_clients": 2, "min_fit_clients": 2, "rounds": 2}}))
    start = [np.zeros((2, 3), np.float32), np.ones(3, np.float32)]
    parts = compose_server(settings, on_round=lambda row, resume: rows.append(row),
                           initial_parameters=ndarrays_to_parameters(start),
                           evaluate_fn=lambda r, arrays, config: (0.0, {}))
    manager = SimpleClientManager()
    for cid in ("a", "b"):
        manager.register(proxy(cid))
    params, rejected = ndarrays_to_parameters(start), []

    # Execute: two rounds, each vehicle moving every weight by +0.1 / -0.05 from what it was sent and
    # replying in float32, as a torch model does
    for server_round in (1, 2):
        sent = parts.strategy.configure_fit(server_round, params, manager)
        replies = [(client, fit_res([(a + step).astype(np.float32) for a in parameters_to_ndarrays(ins.parameters)], 1,
                                    partition_id=i))
                   for i, ((client, ins), step) in enumerate(zip(sent, (0.1, -0.05), strict=True))]
        params, _ = parts.strategy.aggregate_fit(server_round, replies, [])
        rejected += parts.recorder.notes.rejected(server_round)

    # Assert: no update was rejected, and the global model that goes out is still float32 and moved
    assert rejected == []
    assert [a.dtype for a in parameters_to_ndarrays(params)] == [np.float32, np.float32]
    assert not np.allclose(parameters_to_ndarrays(params)[0], start[0])


def test_parameters_view_reads_what_flower_decodes_without_copying() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              np.array(7, np.int64), np.zeros((0, 4), np.float32)]
    params = ndarrays_to_parameters(arrays)

    views = parameters_view(params)

    for view, decoded in zip(views, parameters_to_ndarrays(params), strict=True):
        assert view.dtype == decoded.dtype and view.shape == decoded.shape
        np.testing.assert_array_equal(view, decoded)
    assert not views[0].flags.writeable  # a view over the message's bytes, not a copy
