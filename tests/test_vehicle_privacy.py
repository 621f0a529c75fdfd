"""Privacy the vehicle enforces (fedseg.deploy.floor, fedseg.deploy.ledger): its lifetime ledger, its floor,
and DP-SGD noise the server never sees on a deployed vehicle while simulation stays seeded.

In-process: a VehicleClient built with a deployment node config (``ledger=...``) is what Flower's
Deployment Engine runs in each ``flwr-clientapp``; the real processes are in tests/test_deploy.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict
from test_client_app import settings
from torch.utils.data import DataLoader, TensorDataset

from fedseg._dp_compat import make_dp_compatible
from fedseg.checkpoints import read_checkpoint
from fedseg.clients.client_app import VehicleClient
from fedseg.deploy.ledger import Caps, PrivacyLedger, default_ledger_path, ledger_epsilon
from fedseg.deploy.vehicle import NodeSpec
from fedseg.dpsgd import ClientPrivacy, epsilon_of
from fedseg.models import build_model, build_run_model, get_weights
from fedseg.privacy import DPSpec, NoPrivacy
from fedseg.settings import RunSettings

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
DELTA = 1e-5
ROUND = (1.0, 0.5, 2)  # sigma 1, q 1/2, 2 steps: one round of the 4-frame vehicle below


# ---------------------------------------------------------------- the ledger

def test_ledger_composes_every_round_of_every_run_in_one_opacus_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")

    for run, server_round in [(11, 1), (11, 2), (12, 1)]:
        verdict = ledger.reserve(run, server_round, ROUND, delta=DELTA, caps=Caps())
        assert verdict.refusal is None

    # Three rounds of the same mechanism are 6 steps of it (RDP adds up per order); run 12 alone is one round.
    assert ledger.lifetime_epsilon() == pytest.approx(epsilon_of([(1.0, 0.5, 6)], DELTA))
    assert verdict.run_epsilon == pytest.approx(epsilon_of([ROUND], DELTA))
    assert ledger_epsilon([ROUND, (2.0, 0.25, 3)], DELTA) == pytest.approx(epsilon_of([ROUND, (2.0, 0.25, 3)], DELTA))
    assert ledger_epsilon([ROUND, None], DELTA) == float("inf")  # a round without noise: unbounded


def test_a_round_already_in_the_ledger_is_refused_and_counted_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.reserve(7, 1, ROUND, delta=DELTA, caps=Caps())

    again = ledger.reserve(7, 1, ROUND, delta=DELTA, caps=Caps())

    assert again.refusal == "round 1 of run 7 is in the ledger already (trained once)"
    assert len(ledger.records()) == 1
    assert ledger.lifetime_epsilon() == pytest.approx(epsilon_of([ROUND], DELTA))


def test_the_ledger_refuses_a_round_past_its_caps_and_records_nothing(tmp_path: Path) -> None:
    one, two = epsilon_of([ROUND], DELTA), epsilon_of([(1.0, 0.5, 4)], DELTA)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.reserve(1, 1, ROUND, delta=DELTA, caps=Caps())

    lifetime = ledger.reserve(2, 1, ROUND, delta=DELTA, caps=Caps(lifetime=(one + two) / 2))
    per_run = ledger.reserve(1, 2, ROUND, delta=DELTA, caps=Caps(per_run=(one + two) / 2))
    other_run = ledger.reserve(3, 1, ROUND, delta=DELTA, caps=Caps(per_run=(one + two) / 2))  # its own run: 1 round
    unbounded = ledger.reserve(4, 1, None, delta=DELTA, caps=Caps(lifetime=1e9))

    assert lifetime.refusal is not None and lifetime.refusal.startswith(f"the lifetime epsilon would reach {two:.4g}")
    assert per_run.refusal is not None and "max-epsilon-per-run" in per_run.refusal
    assert other_run.refusal is None
    assert unbounded.refusal is not None and "would reach inf" in unbounded.refusal
    assert [(r["run"], r["round"]) for r in ledger.records()] == [("1", 1), ("3", 1)]


def test_ledger_writes_are_atomic_and_an_unreadable_ledger_never_reads_as_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    ledger.reserve(1, 1, ROUND, delta=DELTA, caps=Caps())
    before = path.read_bytes()

    def power_cut(*_: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        ledger.reserve(1, 2, ROUND, delta=DELTA, caps=Caps())
    monkeypatch.undo()

    assert path.read_bytes() == before  # the old ledger whole, no half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]  # no temp file left
    path.write_text("{ half")
    with pytest.raises(ValueError, match=r"ledger.json: not a fedseg privacy ledger .*restore it from a backup"):
        ledger.reserve(1, 2, ROUND, delta=DELTA, caps=Caps(lifetime=100.0))


def _reserve_many(path: str, run: int) -> None:
    ledger = PrivacyLedger(path)
    for server_round in range(25):
        ledger.reserve(run, server_round, None, delta=DELTA, caps=Caps())


def test_two_runs_writing_at_once_lose_no_round(tmp_path: Path) -> None:
    # Two processes (two runs on one vehicle) read, check and write the same ledger 25 times each.
    path = str(tmp_path / "ledger.json")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_reserve_many, args=(path, run)) for run in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    assert [w.exitcode for w in workers] == [0, 0]
    assert len(PrivacyLedger(path).records()) == 50


def test_the_default_ledger_lives_in_the_vehicles_state_folder_not_a_run_folder() -> None:
    assert default_ledger_path("car", {"STATE_DIRECTORY": "/var/lib/fedseg"}) == Path("/var/lib/fedseg/ledger-car.json")
    assert default_ledger_path("car", {"XDG_STATE_HOME": "/s"}) == Path("/s/fedseg/ledger-car.json")
    assert default_ledger_path("car", {}) == Path.home() / ".local/state/fedseg/ledger-car.json"


# ---------------------------------------------------------------- the floor, through the vehicle's ClientApp


def _fit(settings: RunSettings, node: dict[str, Any], *, run: int = 1, server_round: int = 1
         ) -> tuple[list[np.ndarray], list[np.ndarray], int, dict[str, Any]]:
    """One fit of vehicle 0 as a fresh ClientApp process would run it; (sent, returned, n, metrics)."""
    context = Context(run_id=run, node_id=7, node_config={"partition-id": 0, **node}, state=RecordDict(),
                      run_config={})
    client = VehicleClient(settings, 0, context)
    weights = get_weights(build_run_model(settings.model, client.num_classes, seed=0,
                                          dp=settings.privacy.dp_model))
    returned, n, metrics = client.fit(weights, {"server_round": server_round, "local_epochs": 1})
    return weights, returned, n, metrics


def test_a_vehicle_requiring_dp_refuses_a_run_without_it_in_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = tmp_path / "state" / "ledger.json"
    plain = dataclasses.replace(settings(tmp_path), privacy=NoPrivacy())

    with caplog.at_level(logging.WARNING, logger="fedseg.vehicle"):
        sent, returned, n, metrics = _fit(plain, {"ledger": str(ledger), "require-dp": True}, run=5)

    assert n == 0 and metrics["skipped"] is True
    assert metrics["reason"].startswith("vehicle refused: this vehicle trains only under DP-SGD")
    assert "privacy=none" in metrics["reason"]
    assert all(np.array_equal(a, b) for a, b in zip(returned, sent, strict=True))  # nothing trained
    assert [r.getMessage() for r in caplog.records] == [
        f"fedseg-vehicle: refused round 1 of run 5: {metrics['reason'].removeprefix('vehicle refused: ')}"]
    assert not ledger.exists()  # nothing spent, nothing recorded


def test_a_noise_below_the_vehicles_minimum_is_refused(tmp_path: Path) -> None:
    node = {"ledger": str(tmp_path / "ledger.json"), "min-noise-multiplier": 2}

    _, _, n, metrics = _fit(settings(tmp_path, noise_multiplier=1.0), node)

    assert n == 0 and "noise multiplier 1 is below this vehicle's min-noise-multiplier 2" in metrics["reason"]


def test_a_nearly_spent_vehicle_refuses_whatever_the_run_asks(tmp_path: Path) -> None:
    # Prepare: the ledger holds one round from an earlier run; the cap is below what a second one brings.
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).reserve(99, 1, ROUND, delta=DELTA, caps=Caps())
    cap = (epsilon_of([ROUND], DELTA) + epsilon_of([(1.0, 0.5, 4)], DELTA)) / 2
    node = {"ledger": str(path), "lifetime-epsilon": cap}

    # Execute: a new run that raises its own budget, then one that turns DP off.
    _, _, n_dp, generous = _fit(settings(tmp_path, max_epsilon=1000.0), node, run=100)
    plain = dataclasses.replace(settings(tmp_path), privacy=NoPrivacy())
    _, _, n_plain, off = _fit(plain, node, run=101)

    # Assert: both refused, the ledger still holds the one old round.
    assert n_dp == 0 and "the lifetime epsilon would reach" in generous["reason"]
    assert n_plain == 0 and "privacy=none" in off["reason"]
    assert [r["run"] for r in PrivacyLedger(path).records()] == ["99"]


def test_a_deployed_vehicle_records_each_round_and_releases_one_it_did_not_train(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"

    _, _, n, _ = _fit(settings(tmp_path), {"ledger": str(path)}, run=3, server_round=1)
    # The run's own budget (smaller than one round) stops the next round before it trains.
    _, _, n_skipped, skipped = _fit(settings(tmp_path, max_epsilon=0.5), {"ledger": str(path)}, run=4)

    assert n == 4 and n_skipped == 0 and skipped["reason"] == "privacy budget exhausted"
    records = PrivacyLedger(path).records()
    assert records == [{"run": "3", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}]


def test_node_config_floor_values_are_checked_in_one_line() -> None:
    spec = NodeSpec.from_node_config({"require-dp": True, "lifetime-epsilon": 8, "ledger": "/l.json"})
    assert spec.privacy_floor().lifetime_epsilon == 8.0 and spec.owns_privacy
    assert not NodeSpec.from_node_config({"partition-id": 0, "num-partitions": 2}).owns_privacy  # simulation
    with pytest.raises(ValueError, match=r"^node config require-dp='yes': expected true or false$"):
        NodeSpec.from_node_config({"require-dp": "yes"})
    with pytest.raises(ValueError, match=r"^node config lifetime-epsilon=0: expected a number > 0$"):
        NodeSpec.from_node_config({"lifetime-epsilon": 0})


# ---------------------------------------------------------------- noise the server cannot regenerate

def test_deployed_noise_differs_between_runs_with_the_same_seed_and_simulation_repeats(tmp_path: Path) -> None:
    run = settings(tmp_path, trainable="all")

    # Same settings seed, same round, same vehicle: two runs each, simulation and deployment.
    sim = [_fit(dataclasses.replace(run, output_dir=str(tmp_path / f"sim{i}")), {})[1] for i in range(2)]
    deployed = [_fit(dataclasses.replace(run, output_dir=str(tmp_path / f"dep{i}")),
                     {"ledger": str(tmp_path / f"ledger{i}.json")}, run=i)[1] for i in range(2)]

    assert all(np.array_equal(a, b) for a, b in zip(*sim, strict=True))
    differ = [not np.array_equal(a, b) for a, b in zip(*deployed, strict=True) if a.dtype.kind == "f"]
    assert differ.count(True) == len(differ)  # every trained array: fresh noise and sampling


def test_os_entropy_noise_keeps_its_scale() -> None:
    # sigma 1, C 1, batch 2: each coordinate of the update gets N(0, (1 * 1 / 2)^2), also as Opacus'
    # floating-point-safe sum of four draws.
    def step() -> torch.Tensor:
        torch.manual_seed(0)
        model = make_dp_compatible(build_model("tiny", 3))
        privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=2, batch_size=2,
                                planned_steps=1)
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 3, (2, 32, 32), generator=gen))
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped, optimizer, _, criterion = privacy.attach(model, sgd, DataLoader(data, batch_size=2), seed=None)
        assert getattr(optimizer, "secure_mode", None) is True
        optimizer.zero_grad()
        criterion(wrapped(data.tensors[0]), data.tensors[1]).backward()
        optimizer.step()
        return torch.cat([p.grad.flatten() for p in wrapped.parameters() if p.grad is not None])

    a, b = step(), step()

    assert not torch.allclose(a, b)
    assert a.std().item() == pytest.approx(0.5, rel=0.05)


def test_the_ledger_file_is_plain_json_a_person_can_read(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).reserve(1, 1, ROUND, delta=DELTA, caps=Caps())

    data = json.loads(path.read_text())

    assert data == {"version": 1, "accountant": "rdp", "delta": DELTA,
                    "rounds": [{"run": "1", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}]}


# ---------------------------------------------------------------- real processes: SuperLink, 2 SuperNodes, flwr run

ONE_ROUND = ("experiment=smoke federation.num_clients=2 federation.min_fit_clients=2 federation.rounds=1 "
             "deploy.join_timeout=120")


@pytest.fixture(scope="module")
def privacy_fleet(tmp_path_factory: pytest.TempPathFactory):
    """Vehicle 0 nearly spent (its ledger holds an earlier round, its lifetime cap a little above that);
    vehicle 1 with no floor and the default ledger (in the fleet's XDG_STATE_HOME)."""
    from deploy_fleet import LocalFleet

    root = tmp_path_factory.mktemp("privacy_fleet")
    spent = PrivacyLedger(root / "ledgers" / "vehicle_0.json")
    spent.reserve(1, 1, ROUND, delta=DELTA, caps=Caps())
    fleet = LocalFleet(root, env_extra={"FEDSEG_DATA_CACHE": str(root / "cache"), "WANDB_MODE": "offline"})
    try:
        (root / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=root / "server")
        fleet.start_vehicle("vehicle_0", "--partition-id", "0", "--num-partitions", "2", "--ledger",
                            str(spent.path), "--lifetime-epsilon", str(epsilon_of([ROUND], DELTA) + 0.5))
        fleet.start_vehicle("vehicle_1", "--partition-id", "1", "--num-partitions", "2")
        yield fleet
    finally:
        fleet.stop()


def _finished(fleet: Any, overrides: str) -> tuple[Path, list[dict[str, Any]]]:
    result = fleet.run(overrides, timeout=420)
    assert result.status == "finished:completed", result.output[-3000:]
    out = fleet.root / "server" / "outputs" / "deploy" / str(result.run_id)
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.deploy
def test_a_second_deployed_run_with_the_same_seed_gets_different_dp_noise(privacy_fleet: Any) -> None:
    overrides = ONE_ROUND + " privacy=dpsgd seed=7"

    runs = [_finished(privacy_fleet, overrides) for _ in range(2)]

    (out_a, rows_a), (out_b, rows_b) = runs
    # Same start (the server's seed), then vehicle 1's update with fresh noise and sampling in each run.
    assert rows_a[0]["loss"] == rows_b[0]["loss"]
    assert rows_a[1]["clients"] == rows_b[1]["clients"] == 1
    a, b = (read_checkpoint(out / "checkpoints" / "global.pt")["model_state"] for out in (out_a, out_b))
    trained = [k for k, v in a.items() if "decoder" in k and v.is_floating_point()]  # privacy.trainable=decoder
    assert trained and all(not torch.equal(a[k], b[k]) for k in trained)
    # Vehicle 1's own ledger (the default one, outside both run folders) holds one round of each run.
    ledger = PrivacyLedger(privacy_fleet.root / "state" / "fedseg" / "ledger-partition-1.json")
    assert len({r["run"] for r in ledger.records()}) == 2 and {r["round"] for r in ledger.records()} == {1}


@pytest.mark.deploy
def test_a_nearly_spent_vehicle_refuses_a_run_that_turns_dp_off_or_raises_its_budget(privacy_fleet: Any) -> None:
    before = privacy_fleet.log("vehicle_0").count("fedseg-vehicle: refused round 1 of run")

    _, generous = _finished(privacy_fleet, ONE_ROUND + " privacy=dpsgd privacy.max_epsilon=1000")
    _, plain = _finished(privacy_fleet, ONE_ROUND + " privacy=none")

    log = privacy_fleet.log("vehicle_0")
    assert log.count("fedseg-vehicle: refused round 1 of run") == before + 2
    assert "the lifetime epsilon would reach" in log and "the run asks privacy=none" in log
    assert generous[1]["clients"] == plain[1]["clients"] == 1  # vehicle 1 trained; vehicle 0 left out
    assert len(generous[1]["skipped"]) == len(plain[1]["skipped"]) == 1
    assert [r["run"] for r in PrivacyLedger(privacy_fleet.root / "ledgers" / "vehicle_0.json").records()] == ["1"]
