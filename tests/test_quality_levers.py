"""Federated-vs-centralized comparisons and the levers that give steps back: convergence, fleet time,
``compare=``, cyclic training, FedExP and an equal global batch. Golden numbers by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from fedseg.config import FederationSpec, to_run_config
from fedseg.quality import (
    Converged,
    check_compare,
    check_convergence,
    converged_at,
    fleet_seconds,
    plateaus,
    progress,
)
from fedseg.server.compose import check_composition, compose_server
from fedseg.server.statistics_mean import StatisticsMean
from fedseg.server.strategies import build_strategy
from fedseg.settings import RunSettings, settings_of


def fit_res(arrays: list[np.ndarray], n: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})


def proxy(cid: str) -> MagicMock:
    p = MagicMock()
    p.cid = cid
    return p


def settings(**blocks: Any) -> RunSettings:
    cfg: dict[str, Any] = {"model": {"name": "tiny"}, "federation": {"num_clients": 4, "min_fit_clients": 2}}
    for key, value in blocks.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return settings_of(to_run_config(cfg))


# --- convergence -----------------------------------------------------------------------------------

def test_converged_at_is_the_first_round_whose_window_gained_no_more_than_min_delta() -> None:
    # Rounds 0..6; best so far 0.0, 0.2, 0.3, 0.304, 0.306, 0.306, 0.306. Window 2, delta 0.005:
    # round 3: best 0.304 vs best at round 1, 0.2: gained; round 4: 0.306 vs 0.3 (round 2): 0.006 > 0.005;
    # round 5: 0.306 vs 0.304: 0.002, converged.
    miou = [0.0, 0.2, 0.3, 0.304, 0.306, 0.301, 0.306]

    assert converged_at(miou, window=2, min_delta=0.005) == 5
    assert converged_at(miou, window=2, min_delta=0.001) == 6  # round 5 gained 0.002; round 6 nothing on round 4
    assert converged_at(miou[:5], window=2, min_delta=0.005) is None  # not yet


def test_a_dip_is_not_convergence_until_the_window_passes_without_a_new_best() -> None:
    miou = [0.0, 0.4, 0.1, 0.1, 0.45]

    assert converged_at(miou, window=2, min_delta=0.01) == 3  # rounds 2-3 below 0.4
    assert converged_at(miou, window=3, min_delta=0.01) is None  # round 4 beat 0.4 within the window


def test_check_convergence_raises_only_at_the_converging_round_and_never_without_a_window() -> None:
    rows = [{"round": r, "miou": m} for r, m in enumerate([0.0, 0.3, 0.301, 0.302])]

    check_convergence(rows[:3], window=2, min_delta=0.005)  # round 2: 0.301 vs round 0's 0.0
    check_convergence(rows, window=None, min_delta=0.005)
    with pytest.raises(Converged) as caught:
        check_convergence(rows, window=2, min_delta=0.005)
    assert caught.value.round == 3


def test_a_window_in_steps_holds_runs_whose_rounds_do_different_work_to_the_same_fleet_time() -> None:
    # A federated run of 16 steps a round and a baseline of 32 steps an epoch, the same curve per step.
    miou = [0.0, 0.2, 0.3, 0.304, 0.306, 0.306, 0.306]
    baseline = [0, 32, 64, 96, 128, 160, 192]
    federated = [0, 16, 32, 48, 64, 80, 96]

    # Uniform steps: a window of k rounds' steps is the k-round rule.
    assert converged_at(miou, window=64, min_delta=0.005, steps=baseline) == converged_at(miou, window=2,
                                                                                         min_delta=0.005) == 5
    # 64 steps are 4 of the federated run's rounds: round 6 against round 2's best (0.3), not round 4's.
    assert converged_at(miou, window=64, min_delta=0.005, steps=federated) is None
    assert converged_at(miou, window=64, min_delta=0.01, steps=federated) == 6
    # Uneven rounds: the window reaches back to the last index at least `window` steps before.
    assert converged_at([0.0, 0.3, 0.3, 0.3], window=50, min_delta=0.005, steps=[0, 40, 60, 100]) == 3
    assert converged_at([0.0, 0.3, 0.3, 0.3], window=61, min_delta=0.005, steps=[0, 40, 60, 100]) is None
    with pytest.raises(ValueError, match="3 step counts for 4"):
        converged_at([0.0, 0.3, 0.3, 0.3], window=50, min_delta=0.005, steps=[0, 40, 60])


def test_check_convergence_in_steps_reads_each_rounds_busiest_vehicle_and_refuses_rows_without_steps() -> None:
    rows = [{"round": 0, "miou": 0.0}] + [{"round": r, "miou": m, "steps": {"0": 16, "1": 12}}
                                          for r, m in enumerate([0.3, 0.301, 0.302, 0.302], start=1)]

    check_convergence(rows[:4], window=48, min_delta=0.005, in_steps=True)  # round 3: 48 steps back is round 0
    with pytest.raises(Converged, match=r"round 4: .* last 48 sequential steps") as caught:
        check_convergence(rows, window=48, min_delta=0.005, in_steps=True)
    assert caught.value.round == 4
    with pytest.raises(ValueError, match="early_stop.unit=step"):
        check_convergence([{"round": 0, "miou": 0.0}, {"round": 1, "miou": 0.1}], window=2, min_delta=0.005,
                          in_steps=True)


def test_plateau_drops_the_lr_where_the_rule_first_fires_and_stops_where_it_fires_after_the_drop() -> None:
    # Window 2, delta 0.005: rounds 3-4 gain nothing on round 2 (the drop after round 4); rounds 5-6 then
    # gain 0.02 and 0.01 (no stop: round 6 beats round 4's best); rounds 7-8 gain nothing on round 6.
    miou = [0.0, 0.2, 0.3, 0.301, 0.302, 0.322, 0.332, 0.333, 0.334]
    rows = [{"round": r, "miou": m} for r, m in enumerate(miou)]

    assert plateaus(rows, window=2, min_delta=0.005) == [4]  # without drops: where the run stops
    assert plateaus(rows, window=2, min_delta=0.005, drops=1) == [4, 8]
    assert plateaus(rows[:8], window=2, min_delta=0.005, drops=1) == [4]
    # A window never reaches back across the drop: rounds 5-6 alone after a drop at round 4 could not stop it.
    assert converged_at([0.0, 0.2, 0.3, 0.301, 0.302, 0.302, 0.302], window=2, min_delta=0.005, after=4) == 6
    drops = [check_convergence(rows[:last + 1], window=2, min_delta=0.005, drops=1) for last in range(len(rows) - 1)]
    assert drops == [False] * 4 + [True] + [False] * 3  # the lr drops after round 4 only; no stop before 8
    with pytest.raises(Converged) as caught:
        check_convergence(rows, window=2, min_delta=0.005, drops=1)
    assert caught.value.round == 8
    assert plateaus(rows, window=None, min_delta=0.005, drops=1) == []


# --- fleet time and frames ---------------------------------------------------------------------------

def test_fleet_time_counts_a_round_as_its_slowest_vehicle_and_frames_as_every_vehicles() -> None:
    # Two vehicles of 64 frames, 2 local epochs at batch 8: 16 steps each a round (one stopped early: 12).
    rows = [{"round": 0, "miou": 0.01},
            {"round": 1, "miou": 0.2, "round_s": 9.0, "examples": 128, "train_s": {"a": 2.0, "b": 3.5},
             "steps": {"a": 16, "b": 12}},
            {"round": 2, "miou": 0.3, "round_s": 9.0, "examples": 128, "train_s": {"a": 1.0, "b": 1.5},
             "steps": {"a": 16, "b": 16}}]
    epochs = [{"round": 0, "miou": 0.01}, {"round": 1, "miou": 0.25, "round_s": 4.0, "examples": 128, "steps": 16}]

    fed, central = progress(rows, "federated", local_epochs=2), progress(epochs, "centralized")

    assert fed.seconds == [0.0, 3.5, 5.0] and fed.frames == [0, 256, 512] and fed.miou == [0.01, 0.2, 0.3]
    assert fed.steps == [0, 16, 32]
    assert central.seconds == [0.0, 4.0] and central.frames == [0, 128] and central.steps == [0, 16]
    assert fleet_seconds({"round_s": 2.5}) == 2.5


def finished_run(path: Path, *, seed: int, image_size: list[int], mode: str = "centralized") -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"round": 0, "miou": 0.1}) + "\n")
    (path / "summary.json").write_text(json.dumps({"mode": mode, "config": {
        "seed": seed, "data": {"name": "synthetic", "image_size": image_size}}}))
    return path


def test_compare_names_the_key_that_differs_and_accepts_the_same_data_and_seed(tmp_path: Path) -> None:
    data = {"name": "synthetic", "image_size": [64, 64]}
    same = finished_run(tmp_path / "same", seed=0, image_size=[64, 64])
    other = finished_run(tmp_path / "other", seed=0, image_size=[96, 128])

    assert check_compare(str(same), data=data, seed=0) == same
    assert check_compare(None, data=data, seed=0) is None
    with pytest.raises(ValueError, match=r"compare=.*other: that run's data.image_size=\[96, 128\], this run's "
                                         r"\[64, 64\]"):
        check_compare(str(other), data=data, seed=0)
    with pytest.raises(ValueError, match=r"that run's seed=0, this run's 1"):
        check_compare(str(same), data=data, seed=1)
    with pytest.raises(ValueError, match=r"compare=.*missing: not a finished fedseg-sim or fedseg-train run"):
        check_compare(str(tmp_path / "missing"), data=data, seed=0)


# --- FedExP ------------------------------------------------------------------------------------------

def test_fedexp_extrapolates_by_the_spread_of_the_updates_hand_computed() -> None:
    # Global 0 (2 coordinates), equal frames. Updates (3, 1) and (-1, 1) disagree: spread = 1/2 (10 + 2)
    # = 6, mean (1, 1), ||w - mean||^2 = 2, eta = max(1, 6 / (2 x 2)) = 1.5: the new model is (1.5, 1.5).
    start = ndarrays_to_parameters([np.zeros(2, np.float32), np.zeros(1, np.float32)])
    strategy = StatisticsMean(build_strategy("fedexp", {"epsilon": 0.0}, initial_parameters=start),
                              statistics=[False, True])
    strategy.inner.statistics = [False, True]  # type: ignore[attr-defined]  (compose sets it)
    replies = [(proxy("a"), fit_res([np.array([3.0, 1.0], np.float32), np.array([10.0], np.float32)], 5)),
               (proxy("b"), fit_res([np.array([-1.0, 1.0], np.float32), np.array([20.0], np.float32)], 5))]

    new, _ = strategy.aggregate_fit(1, replies, [])

    weights, stat = parameters_to_ndarrays(new)
    np.testing.assert_allclose(weights, [1.5, 1.5])
    np.testing.assert_allclose(stat, [15.0])  # a statistic: pooled, never stepped or counted in the norms
    assert strategy.inner.server_step == pytest.approx(1.5)  # type: ignore[attr-defined]
    assert weights.dtype == np.float32


def test_fedexp_is_fedavg_when_the_vehicles_agree_and_steps_from_its_last_model() -> None:
    start = ndarrays_to_parameters([np.zeros(2, np.float32)])
    strategy = build_strategy("fedexp", {}, initial_parameters=start)
    assert strategy.initialize_parameters(SimpleClientManager()) is start  # as Flower's loop asks for it
    same = [(proxy(c), fit_res([np.array([1.0, 2.0], np.float32)], 3)) for c in "ab"]

    first, _ = strategy.aggregate_fit(1, same, [])
    moved = [(proxy(c), fit_res([np.array([2.0, 2.0], np.float32)], 3)) for c in "ab"]
    second, _ = strategy.aggregate_fit(2, moved, [])

    np.testing.assert_allclose(parameters_to_ndarrays(first)[0], [1.0, 2.0], rtol=1e-6)  # eta = 1
    np.testing.assert_allclose(parameters_to_ndarrays(second)[0], [2.0, 2.0], rtol=1e-6)


# --- cyclic ------------------------------------------------------------------------------------------

def test_cyclic_trains_one_vehicle_a_round_in_a_fixed_order_and_takes_its_model() -> None:
    manager = SimpleClientManager()
    for cid in ("c", "a", "b"):
        manager.register(proxy(cid))
    strategy = build_strategy("cyclic", {}, min_available_clients=3, on_fit_config_fn=lambda r: {"server_round": r},
                              initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))
    params = ndarrays_to_parameters([np.zeros(1, np.float32)])

    chosen = [strategy.configure_fit(r, params, manager) for r in range(1, 5)]
    new, _ = strategy.aggregate_fit(1, [(proxy("a"), fit_res([np.array([7.0], np.float32)], 10))], [])

    assert [[p.cid for p, _ in one] for one in chosen] == [["a"], ["b"], ["c"], ["a"]]
    assert chosen[1][0][1].config == {"server_round": 2}
    np.testing.assert_allclose(parameters_to_ndarrays(new)[0], [7.0])


def test_cyclic_round_stops_only_when_its_one_vehicle_fails() -> None:
    s = settings(strategy={"name": "cyclic"}, federation={"min_fit_clients": 3})  # local_norm none
    parts = compose_server(s, on_round=lambda row, resume: None,
                           initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))

    assert parts.recorder.min_replies == 1


@pytest.mark.parametrize(("blocks", "message"), [
    ({"strategy": {"name": "cyclic"}, "secagg": {"name": "secaggplus"}},
     r"strategy=cyclic trains one vehicle a round, so the sum SecAgg\+ reveals is that vehicle's update"),
    ({"strategy": {"name": "cyclic"}, "privacy": {"name": "central"}},
     r"privacy=central .* strategy=cyclic trains one vehicle a round"),
    ({"strategy": {"name": "fedexp"}, "secagg": {"name": "secaggplus"}}, r"strategy=fedexp needs each update"),
    ({"strategy": {"name": "cyclic"}, "federation": {"local_norm": "affine"}},
     (r"strategy=cyclic hands one vehicle's model to the next, but federation.local_norm=affine .*valid: "
      r"federation.local_norm=none")),
    ({"strategy": {"name": "fedexp"}, "privacy": {"name": "central"}},
     r"strategy=fedexp scales its server step by the spread"),
])
def test_levers_that_cannot_compose_with_secagg_or_central_dp_are_refused_in_one_line(
        blocks: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        check_composition(settings(**blocks))
    assert "\n" not in str(caught.value)


# --- an equal global batch ---------------------------------------------------------------------------

def test_equal_global_batch_splits_the_batch_over_a_rounds_vehicles() -> None:
    assert FederationSpec(num_clients=4, min_fit_clients=2, batch_size=8, equal_global_batch=True).local_batch_size == 2
    assert FederationSpec(num_clients=4, fraction_fit=0.5, min_fit_clients=1, batch_size=8,
                          equal_global_batch=True).local_batch_size == 4
    assert FederationSpec(num_clients=16, min_fit_clients=2, batch_size=8, equal_global_batch=True).local_batch_size == 1
    assert FederationSpec(num_clients=4, batch_size=8).local_batch_size == 8


# --- in a run: the reporter and fedseg-sim -----------------------------------------------------------

def test_reporter_stops_at_convergence_and_plots_the_compared_run_beside_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_runlog import RecordingTracker

    from fedseg import reporting
    from fedseg.config import DataSpec, EarlyStopSpec, ModelSpec
    from fedseg.data import load_data
    from fedseg.models import build_run_model
    from fedseg.runlog import metrics_row

    fleet = load_data(DataSpec(root=str(tmp_path / "data"), image_size=(32, 32), frames_per_vehicle=2,
                               heldout_frames=2), num_clients=1, seed=0, progress=False)
    other = finished_run(tmp_path / "central", seed=0, image_size=[32, 32])
    drawn: list[Any] = []
    monkeypatch.setattr(reporting, "plot_time_to_accuracy",
                        lambda curves, path, title="": drawn.extend(curves) or path)
    tracker = RecordingTracker()
    reporter = reporting.RunReporter(
        model=build_run_model(ModelSpec(name="tiny"), fleet.label_map.num_classes, seed=0), data=fleet,
        out_dir=tmp_path / "run", tracker=tracker, meta={"mode": "federated", "strategy": "fedavg"},
        total_rounds=9, batch_size=2, example_images=0, early_stop=EarlyStopSpec(window=1, min_delta=0.5),
        compare=other)
    loss, metrics = reporter.evaluate()

    reporter.record(metrics_row(0, loss, metrics))
    with pytest.raises(Converged, match="converged at round 1"):  # round 1 gained nothing over round 0
        reporter.record(metrics_row(1, loss, metrics, examples=4, train_s={"a": 1.0}))
    reporter.finish({})

    assert [c.label for c in drawn] == ["federated (fedavg)", "centralized"]
    assert drawn[0].frames == [0, 4] and drawn[1].miou == [0.1]
    assert tracker.plots == {"time_to_accuracy": tmp_path / "run" / "plots" / "time_to_accuracy.png"}


@pytest.mark.e2e
def test_fedseg_sim_drops_the_lr_at_a_plateau_then_stops_at_convergence_and_says_so(tmp_path: Path) -> None:
    from smoke_runs import rows_of, run_sim

    # min_delta 0.9: no round can gain that much, so the rule fires after every window=1 round: round 1
    # drops the lr (federation.lr_schedule=plateau), round 2 stops the run.
    proc, out = run_sim(tmp_path, "run", "federation.rounds=6", "early_stop.window=1", "early_stop.min_delta=0.9",
                        "federation.lr_schedule=plateau")

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["round"] for r in rows_of(out)] == [0, 1, 2]
    assert [r.get("lr") for r in rows_of(out)] == [None, 0.003, pytest.approx(0.0003)]  # smoke's lr, x lr_final
    assert json.loads((out / "summary.json").read_text())["converged_round"] == 2
    said = (out / "federated.log").read_text()
    assert "lr drops after round 1" in said
    assert "converged at round 2" in said
    assert (out / "plots" / "time_to_accuracy.png").stat().st_size > 0
