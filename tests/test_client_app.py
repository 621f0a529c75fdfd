"""The vehicle's ClientApp: DP-SGD composes around local training, its accountant survives, its budget holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Context, RecordDict

from fedseg.clients.client_app import STATE_KEY, VEHICLE_MODS, VehicleClient
from fedseg.config import to_run_config
from fedseg.dpsgd import epsilon_of
from fedseg.privacy import NoPrivacy
from fedseg.settings import RunSettings, settings_of


def settings(tmp_path: Path, **privacy: Any) -> RunSettings:
    cfg = {
        "data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                 "heldout_frames": 2},
        "model": {"name": "tiny"},
        "federation": {"num_clients": 2, "min_fit_clients": 2, "rounds": 3, "batch_size": 2},
        "privacy": {"name": "dpsgd", "noise_multiplier": 1.0, **privacy},
        "output_dir": str(tmp_path / "run"),
    }
    return settings_of(to_run_config(cfg))


def vehicle(s: RunSettings, state: RecordDict, *, output_dir: Path | None = None) -> VehicleClient:
    if output_dir is not None:  # a restarted process whose disk copy is gone: only context.state is left
        s = dataclasses.replace(s, output_dir=str(output_dir))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=state, run_config={})
    return VehicleClient(s, 0, context)


def global_weights(client: VehicleClient) -> list[np.ndarray]:
    from fedseg.models import build_run_model, get_weights

    return get_weights(build_run_model(client.settings.model, client.num_classes, seed=0, dp=True))


def test_accountant_is_restored_from_context_state_after_a_restart(tmp_path: Path) -> None:
    # Prepare: round 1 on one vehicle object, which saves its accountant into context.state.
    s, state = settings(tmp_path), RecordDict()
    first = vehicle(s, state)
    weights = global_weights(first)
    _, _, metrics_1 = first.fit(weights, {"server_round": 1, "local_epochs": 1})

    # Execute: a new vehicle object (new process) with no disk copy trains round 2.
    second = vehicle(s, state, output_dir=tmp_path / "elsewhere")
    _, n, metrics_2 = second.fit(weights, {"server_round": 2, "local_epochs": 1})

    # Assert: epsilon accumulates over both rounds: two rounds of 2 steps at q=1/2, sigma=1.
    assert STATE_KEY in state and n == 4
    two_rounds = epsilon_of([(1.0, 0.5, 2), (1.0, 0.5, 2)], metrics_2["delta"])
    assert metrics_1["epsilon"] == pytest.approx(epsilon_of([(1.0, 0.5, 2)], metrics_1["delta"]))
    assert metrics_2["epsilon"] == pytest.approx(two_rounds) and metrics_2["epsilon"] > metrics_1["epsilon"]


def test_vehicle_whose_budget_is_spent_skips_and_returns_the_global_weights(tmp_path: Path) -> None:
    # Prepare: a budget below what one round costs (sigma=1, q=1/2, 2 steps: epsilon > 1).
    s = settings(tmp_path, max_epsilon=0.5)
    client = vehicle(s, RecordDict())
    weights = global_weights(client)

    # Execute
    returned, n, metrics = client.fit(weights, {"server_round": 1, "local_epochs": 1})

    # Assert: nothing trained, nothing spent, weight 0, and the reason is reported.
    assert n == 0 and metrics["skipped"] is True and metrics["reason"] == "privacy budget exhausted"
    assert metrics["epsilon"] == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(returned, weights, strict=True))


def test_plain_vehicle_keeps_no_privacy_state(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    plain = dataclasses.replace(cfg, privacy=NoPrivacy())
    state = RecordDict()
    client = vehicle(plain, state)
    from fedseg.models import build_run_model, get_weights

    weights = get_weights(build_run_model(plain.model, client.num_classes, seed=0))
    returned, n, metrics = client.fit(weights, {"server_round": 1, "local_epochs": 1})

    assert n == 4 and "epsilon" not in metrics and STATE_KEY not in state
    assert any(not np.array_equal(a, b) for a, b in zip(returned, weights, strict=True))


def test_architecture_names_the_vehicle_mods_in_the_order_flower_chains_them() -> None:
    # The chain docs/ARCHITECTURE.md shows is the list the ClientApp hands Flower, outermost first.
    chain = " -> ".join(mod.__name__ for mod in VEHICLE_MODS) + " -> client"
    architecture = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    assert f"`{chain}`" in architecture
