"""A round's training on its critical path and the share beyond it (hand-computed); a vehicle reports its `train_s`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.common import Context, RecordDict

from fedseg.measurement import critical_path_s, overhead_share


@pytest.mark.parametrize(("train_s", "slots", "expected"), [
    ([10.0, 10.0, 10.0, 10.0], 2, 20.0),  # two waves of two
    ([30.0, 5.0, 5.0], 2, 30.0),  # the longest vehicle bounds the round
    ([4.0, 6.0], 1, 10.0),  # one slot: in turn
    ([4.0, 6.0], 4, 6.0),  # more slots than vehicles: all at once
    ([], 2, 0.0),
])
def test_critical_path_is_the_longest_vehicle_or_the_work_spread_over_the_slots(
        train_s: list[float], slots: int, expected: float) -> None:
    assert critical_path_s(train_s, slots) == pytest.approx(expected)


def test_overhead_share_is_what_the_round_spends_beyond_training() -> None:
    assert overhead_share(21.0, [10.0, 10.0, 10.0, 10.0], 2) == pytest.approx(1 / 21)
    assert overhead_share(19.0, [10.0, 10.0, 10.0, 10.0], 2) == 0.0  # never negative
    assert overhead_share(0.0, [1.0], 1) == 0.0


def test_a_vehicle_reports_its_training_seconds(tmp_path: Path) -> None:
    # Prepare: the tiny model on one vehicle of two, without privacy.
    from fedseg.clients.client_app import VehicleClient
    from fedseg.config import to_run_config
    from fedseg.models import build_run_model, get_weights
    from fedseg.settings import settings_of

    cfg = {"data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                    "heldout_frames": 2}, "model": {"name": "tiny"},
           "federation": {"num_clients": 2, "min_fit_clients": 2, "rounds": 1, "batch_size": 2},
           "output_dir": str(tmp_path / "run")}
    settings = settings_of(to_run_config(cfg))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    client = VehicleClient(settings, 0, context)
    start = get_weights(build_run_model(settings.model, client.num_classes, seed=0))
    # Execute
    started = time.perf_counter()
    _, _, metrics = client.fit(start, {"server_round": 1, "local_epochs": 1})
    fit_s = time.perf_counter() - started
    # Assert: the training seconds are part of the fit, reported as a float the server can record.
    assert isinstance(metrics["train_s"], float) and 0 < metrics["train_s"] <= fit_s
