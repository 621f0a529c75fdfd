"""The vehicle's half of a pooled fleet (:mod:`fedseg.vehicle_pool`): a simulation node becomes, for one
message, the vehicle the message names.

The mod :func:`pooled_vehicle` makes (``pooled_vehicle_mod``, in ``VEHICLE_MODS`` right after the run config
is expanded) reads the vehicle's number from the message, and for everything inside it the node config is
that vehicle's
(``partition-id``: its frames, seeds, privacy and residual files) and ``context.state`` holds that
vehicle's records, loaded from its file in the run's ``vehicles/`` folder and written back when the
message is answered; between messages the node keeps none of them. Records that already have a file of
their own per vehicle (the DP-SGD accountant, the codec residual: ``kept_elsewhere``) are not copied;
their owners read those files when ``context.state`` lacks them. SecAgg+'s per-round protocol state
stays with the node (a round gives each node one vehicle); its node id becomes the vehicle's, the id
the server's SecAgg+ workflow knows it by.

Only a simulation node of a pooled run may be told which vehicle to be: a message naming a vehicle is
refused by any other (a deployed vehicle, its own ledger or data, or a run config that pools nothing),
so a server cannot make a real vehicle load another's state.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import cast

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from fedseg.config import FederationSpec
from fedseg.deploy.vehicle import NodeSpec
from fedseg.settings import settings_of
from fedseg.vehicle_pool import VEHICLE_KEY, VEHICLE_RECORD, VehicleStore

NODE_RECORDS = frozenset({RECORD_KEY_STATE})  # the node's own: SecAgg+'s protocol state of this round


def requested_vehicle(msg: Message, node: NodeSpec, fed: FederationSpec) -> int | None:
    """The vehicle ``msg`` names, if it names one; a ``ValueError`` unless this node is one of a pooled
    run's simulation nodes and the number is one of the fleet's."""
    if not msg.has_content() or VEHICLE_RECORD not in msg.content.config_records:
        return None
    value = msg.content.config_records[VEHICLE_RECORD].get(VEHICLE_KEY)
    pooled = fed.sim_nodes is not None and node.num_partitions == fed.sim_nodes
    if node.owns_privacy or not pooled:
        raise ValueError(f"message names {VEHICLE_KEY}={value!r}, but this vehicle is not a simulation node of a "
                         "pooled fleet (federation.sim_nodes): refused; a vehicle trains only itself")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < fed.num_clients:
        raise ValueError(f"message names {VEHICLE_KEY}={value!r}: valid 0..{fed.num_clients - 1}")
    return value


def pooled_vehicle(kept_elsewhere: Collection[str]) -> Mod:
    """The mod of the module docstring; ``kept_elsewhere``: ``context.state`` records with their own files."""

    def pooled_vehicle_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        settings = settings_of(ctxt.run_config)
        fed = settings.federation
        vehicle = requested_vehicle(msg, NodeSpec.from_node_config(ctxt.node_config), fed)
        if vehicle is None:
            return call_next(msg, ctxt)
        del msg.content[VEHICLE_RECORD]
        store = VehicleStore(Path(settings.output_dir) / "vehicles")
        node_config = ctxt.node_config
        loaded = store.load(vehicle)
        _clear(ctxt.state)  # a record another vehicle left would be taken for this one's
        for name, record in loaded.items():
            ctxt.state[name] = record
        ctxt.node_config = {"partition-id": vehicle, "num-partitions": fed.num_clients}
        try:
            reply = call_next(msg, ctxt)
            _name_protocol_node(ctxt.state, vehicle)
            kept = {name: record for name, record in ctxt.state.items()
                    if name not in NODE_RECORDS and name not in kept_elsewhere}
            if set(kept) != set(loaded) or any(record is not loaded[n] for n, record in kept.items()):
                store.save(vehicle, RecordDict(kept))
        finally:
            ctxt.node_config = node_config
            _clear(ctxt.state)
        return reply

    return pooled_vehicle_mod


def _clear(state: RecordDict) -> None:
    """Drop every record but the node's own from ``state``."""
    for name in [n for n in state if n not in NODE_RECORDS]:
        del state[name]


def _name_protocol_node(state: RecordDict, vehicle: int) -> None:
    """SecAgg+ knows this node by its message's destination (a simulation node's id); the server's
    workflow knows it as ``vehicle``: the id in its protocol state becomes the vehicle's, before the
    next stage compares it with the server's key lists (Flower's ``SecAggPlusState.nid``)."""
    if RECORD_KEY_STATE in state.config_records:
        protocol = state.config_records[RECORD_KEY_STATE]
        if cast(int, protocol.get("nid", vehicle)) != vehicle:
            protocol["nid"] = vehicle
