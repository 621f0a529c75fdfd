"""A fleet larger than its simulation nodes (fedseg/vehicle_pool.py): which node carries which vehicle, the
vehicle's state on disk, who may be told which vehicle to be, and the same results as one node per vehicle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.compat.common import recorddict_compat as compat
from smoke_runs import rows_of, run_sim
from toy_fleet import EXAMPLES, Fleet, toy_updates

from fedseg.clients.pool import pooled_vehicle, requested_vehicle
from fedseg.config import FederationSpec
from fedseg.deploy.vehicle import NodeSpec
from fedseg.packing import unpack_content
from fedseg.vehicle_pool import VEHICLE_KEY, VEHICLE_RECORD, NodeAssignment, PoolTooSmall, VehicleStore

SECAGG = {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2}


def test_a_rounds_vehicles_get_distinct_nodes_in_sorted_order() -> None:
    assignment = NodeAssignment()
    assert [assignment.node_for(v, "1", [30, 10, 20]) for v in (7, 99, 3)] == [10, 20, 30]
    assert assignment.node_for(99, "1") == 20  # the same vehicle again (a later SecAgg+ stage): its node
    with pytest.raises(PoolTooSmall, match="federation.sim_nodes"):
        assignment.node_for(5, "1")
    assert assignment.node_for(5, "2", [10, 20, 30]) == 10  # a new round starts over
    assert assignment.vehicle_of(20, "1") == 99 and assignment.vehicle_of(10, "2") == 5  # late replies of round 1
    assignment.node_for(1, "3", [10, 20, 30])
    assert assignment.vehicle_of(20, "1") is None and assignment.vehicle_of(10, "2") == 5  # two rounds kept


def test_a_new_round_needs_the_pool() -> None:
    with pytest.raises(ValueError, match="node ids"):
        NodeAssignment().node_for(0, "1")


def test_the_store_keeps_a_vehicles_records_and_nothing_for_one_that_never_trained(tmp_path: Path) -> None:
    store = VehicleStore(tmp_path / "vehicles")
    assert list(store.load(3).keys()) == []
    records = RecordDict({"local_norm": ArrayRecord([np.arange(4, dtype=np.float32)]),
                          "note": ConfigRecord({"steps": 12})})
    store.save(3, records)
    loaded = store.load(3)
    np.testing.assert_array_equal(loaded.array_records["local_norm"].to_numpy_ndarrays()[0], np.arange(4))
    assert loaded.config_records["note"]["steps"] == 12
    assert sorted(p.name for p in (tmp_path / "vehicles").iterdir()) == ["vehicle_3.pb"]  # no temporary left


@pytest.mark.parametrize(("fleet", "expected"), [
    ({"num_clients": 100_000, "fraction_fit": 1e-4, "min_fit_clients": 10}, 10),  # 10 a round
    ({"num_clients": 40, "fraction_fit": 0.05, "min_fit_clients": 4}, 4),  # int(2) < min_fit 4
    ({"num_clients": 4, "fraction_fit": 1.0, "min_fit_clients": 2}, None),  # all train: one node each
    ({"num_clients": 4, "fraction_fit": 1.0, "min_fit_clients": 2, "sim_nodes": 4}, 4),  # asked for: pooled
])
def test_the_pool_is_a_rounds_sample_unless_every_vehicle_trains(fleet: dict, expected: int | None) -> None:
    assert FederationSpec(**fleet).pool_size() == expected


@pytest.mark.parametrize("nodes", [3, 41])
def test_a_pool_that_cannot_carry_a_round_or_exceeds_the_fleet_is_refused(nodes: int) -> None:
    with pytest.raises(ValueError, match=rf"federation.sim_nodes={nodes}: .* valid: 4\.\.40"):
        FederationSpec(num_clients=40, fraction_fit=0.1, min_fit_clients=2, sim_nodes=nodes).pool_size()


def _message(content: RecordDict) -> Message:
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id="m", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=60.0, message_type="train"))


def _naming(vehicle: object) -> Message:
    return _message(RecordDict({VEHICLE_RECORD: ConfigRecord({VEHICLE_KEY: vehicle})}))


POOLED = FederationSpec(num_clients=40, fraction_fit=0.1, min_fit_clients=2, sim_nodes=4)


def test_a_pooled_simulation_node_becomes_the_named_vehicle() -> None:
    node = NodeSpec(partition_id=2, num_partitions=4)
    assert requested_vehicle(_naming(17), node, POOLED) == 17
    assert requested_vehicle(_message(RecordDict()), node, POOLED) is None


@pytest.mark.parametrize(("node", "fed"), [
    (NodeSpec(partition_id=2, num_partitions=40, ledger="/v/ledger.json"), POOLED),  # fedseg-vehicle
    (NodeSpec(data_root="/data/me"), POOLED),  # an edge box with its own frames
    (NodeSpec(partition_id=2, num_partitions=40), POOLED),  # a deployed share: num-partitions is the fleet
    (NodeSpec(partition_id=2, num_partitions=4), FederationSpec(num_clients=4)),  # a run that pools nothing
])
def test_any_other_vehicle_refuses_to_be_told_which_vehicle_it_is(node: NodeSpec, fed: FederationSpec) -> None:
    with pytest.raises(ValueError, match="vehicle-id=17.*refused"):
        requested_vehicle(_naming(17), node, fed)


@pytest.mark.parametrize("vehicle", [40, -1, "3", True])
def test_a_vehicle_outside_the_fleet_is_refused(vehicle: object) -> None:
    with pytest.raises(ValueError, match=r"valid 0\.\.39"):
        requested_vehicle(_naming(vehicle), NodeSpec(partition_id=0, num_partitions=4), POOLED)


def test_the_node_holds_a_vehicles_state_only_while_it_is_that_vehicle(tmp_path: Path) -> None:
    run_config = {"output_dir": str(tmp_path), "federation.num_clients": 40, "federation.fraction_fit": 0.1,
                  "federation.min_fit_clients": 2, "federation.sim_nodes": 4}
    context = Context(run_id=1, node_id=9, node_config={"partition-id": 1, "num-partitions": 4},
                      state=RecordDict({"local_norm": ArrayRecord([np.zeros(2)])}), run_config=run_config)
    seen: list[tuple[dict, list[str]]] = []

    def train(msg: Message, ctxt: Context) -> Message:  # the vehicle keeps a counter of its rounds
        seen.append((dict(ctxt.node_config), list(ctxt.state.keys())))
        rounds = int(ctxt.state.config_records["mine"]["rounds"]) if "mine" in ctxt.state else 0
        ctxt.state["mine"] = ConfigRecord({"rounds": rounds + 1})
        ctxt.state["privacy"] = ConfigRecord({"accountant": b"{}"})  # has its own file: not copied
        return _message(RecordDict())

    mod = pooled_vehicle(kept_elsewhere={"privacy"})
    for vehicle in (17, 3, 17):
        mod(_naming(vehicle), context, train)
    assert seen == [({"partition-id": 17, "num-partitions": 40}, []), ({"partition-id": 3, "num-partitions": 40}, []),
                    ({"partition-id": 17, "num-partitions": 40}, ["mine"])]
    assert list(context.state.keys()) == [] and context.node_config == {"partition-id": 1, "num-partitions": 4}
    assert VehicleStore(tmp_path / "vehicles").load(17).config_records["mine"]["rounds"] == 2
    assert "privacy" not in VehicleStore(tmp_path / "vehicles").load(17)


TOPK = {"name": "topk", "fraction": 0.5, "dense_below": 1, "values": "float32"}  # error feedback: a residual


@pytest.mark.parametrize(("secagg", "codec"), [({"name": "none"}, None), (SECAGG, None), ({"name": "none"}, TOPK)],
                         ids=["plain", "secaggplus", "topk-residual"])
def test_a_pooled_fleet_on_as_many_nodes_as_vehicles_aggregates_the_same(secagg: dict, codec: dict | None,
                                                                         tmp_path: Path) -> None:
    own = Fleet(toy_updates(), list(EXAMPLES), secagg, rounds=2, output_dir=str(tmp_path / "own"),
                compression=codec).run()
    pooled = Fleet(toy_updates(), list(EXAMPLES), secagg, rounds=2, output_dir=str(tmp_path / "pooled"),
                   compression=codec, pool=len(EXAMPLES)).run()
    for a, b in zip(own.globals[-1], pooled.globals[-1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["clients"] for r in pooled.rows[1:]] == [3, 3]
    if codec is not None:  # each vehicle's residual in its own file, as with a node of its own
        assert sorted(p.name for p in (tmp_path / "pooled" / "compression").iterdir()) == \
            [f"vehicle_{i}.npz" for i in range(3)]


def test_a_fleet_larger_than_its_nodes_trains_the_vehicles_it_samples_on_distinct_nodes(tmp_path: Path) -> None:
    fleet = Fleet(toy_updates((1.0, 2.0, 3.0, 4.0, 5.0, 6.0)), [1] * 6, {"name": "none"}, rounds=4,
                  output_dir=str(tmp_path), pool=3, federation={"fraction_fit": 0.5, "min_fit_clients": 3}).run()
    assert [r["clients"] for r in fleet.rows[1:]] == [3, 3, 3, 3]
    replies = [(m.metadata.group_id, m.metadata.src_node_id,
                compat.recorddict_to_fitres(unpack_content(m.content), keep_input=True).metrics["partition_id"])
               for m in fleet.grid.received]
    for server_round in "1234":
        this = [(node, vehicle) for group, node, vehicle in replies if group == server_round]
        assert sorted(node for node, _ in this) == [100, 101, 102] and len({v for _, v in this}) == 3
    assert len({vehicle for _, _, vehicle in replies}) > 3  # all four rounds the same three: p = 20^-3
    # Each round the global moved by the plain mean of its three vehicles' updates (equal weights).
    for (group, moved) in zip("1234", np.diff([g[0][0, 0] for g in fleet.globals]), strict=True):
        assert moved == pytest.approx(np.mean([v + 1.0 for g, _, v in replies if g == group]))


def test_the_same_seed_samples_the_same_vehicles_of_a_pooled_fleet(tmp_path: Path) -> None:
    def sampled(seed: int, name: str) -> list[list[int]]:
        fleet = Fleet(toy_updates((1.0, 2.0, 3.0, 4.0, 5.0, 6.0)), [1] * 6, {"name": "none"}, rounds=4,
                      output_dir=str(tmp_path / name), pool=3,
                      federation={"fraction_fit": 0.5, "min_fit_clients": 3}).run(seed=seed)
        replies = [(m.metadata.group_id,
                    compat.recorddict_to_fitres(unpack_content(m.content), keep_input=True).metrics["partition_id"])
                   for m in fleet.grid.received]
        return [sorted(vehicle for group, vehicle in replies if group == r) for r in "1234"]

    first = sampled(7, "a")
    assert [len(v) for v in first] == [3, 3, 3, 3]
    assert sampled(7, "b") == first
    assert sampled(8, "c") != first  # 20 samples a round: four rounds alike by chance is p = 20^-4


@pytest.mark.e2e
def test_a_fleet_larger_than_its_nodes_runs_in_the_simulation_and_vehicles_keep_their_accountants(
        tmp_path: Path) -> None:
    # 8 vehicles, 4 a round on 4 nodes, 3 rounds: 12 places for 8 vehicles, so some train twice.
    proc, out = run_sim(tmp_path, "pooled", "privacy=dpsgd", "federation.num_clients=8", "federation.fraction_fit=0.5",
                        "federation.min_fit_clients=4", "federation.rounds=3")
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "4 simulation nodes carry them" in proc.stdout + proc.stderr
    rows = rows_of(out)[1:]
    trained = [set(row["train_s"]) for row in rows]
    assert [len(t) for t in trained] == [4, 4, 4]
    assert len(set().union(*trained)) > 4  # more vehicles than nodes (all rounds the same four: p = 70^-2)
    again = [(v, a, b) for a in range(3) for b in range(a + 1, 3) for v in trained[a] & trained[b]]
    assert again  # pigeonhole: 12 places, 8 vehicles
    for vehicle, first, later in again:  # its accountant went on from its last round, not from zero
        assert rows[later]["client_epsilon"][vehicle] > rows[first]["client_epsilon"][vehicle] > 0
    assert len(list((out / "privacy").glob("vehicle_*.json"))) == len(set().union(*trained))


@pytest.mark.e2e
def test_a_pooled_run_on_as_many_nodes_as_vehicles_has_the_metrics_of_one_node_per_vehicle(tmp_path: Path) -> None:
    # FedBN-style statistics kept per vehicle: in the node's context.state, or in the pooled store on disk.
    own, own_out = run_sim(tmp_path, "own", "federation.local_norm=stats")
    pooled, pooled_out = run_sim(tmp_path, "pooled", "federation.local_norm=stats", "federation.sim_nodes=3")
    assert own.returncode == 0 and pooled.returncode == 0, pooled.stderr[-2000:] + own.stderr[-2000:]
    keys = ("round", "loss", "miou", "train_loss", "clients")
    assert [{k: r.get(k) for k in keys} for r in rows_of(pooled_out)] == \
        [{k: r.get(k) for k in keys} for r in rows_of(own_out)]
    assert sorted(p.name for p in (pooled_out / "vehicles").iterdir()) == [f"vehicle_{i}.pb" for i in range(3)]


def test_a_deployed_server_refuses_to_pool_and_a_simulation_without_the_setting_does_not_pool() -> None:
    from fedseg.server.server_app import simulation_pool

    with pytest.raises(ValueError, match="federation.sim_nodes=4 pools .* drop the override"):
        simulation_pool(POOLED, deployed=True)
    assert simulation_pool(POOLED, deployed=False) == 4
    # Only fedseg-sim writes the pool into the run config: without it, one node per vehicle.
    assert simulation_pool(FederationSpec(num_clients=40, fraction_fit=0.1, min_fit_clients=2), deployed=False) is None
