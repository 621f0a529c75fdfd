"""What SecAgg+ costs per round: wall time and bytes per vehicle, plain vs SecAgg+, at 3, 10 and 30 vehicles.

Both modes run in one process, in one run, through the real apps' pieces: the client mods (delta codec,
Flower's ``secaggplus_mod``), Flower's ``DefaultWorkflow`` with its default fit workflow or fedseg's
``SecAggPlusFit``, and the same strategy. Vehicles are served in-process (``sim.loopback.LoopbackGrid``:
every message copied through protobuf as on the wire; no Ray, whose start-up would swamp the rounds),
one after another. So the round time is the whole fleet's work done serially: ``vehicle s`` is the
time inside the vehicles' ClientApps divided by their number (what one vehicle spends, in parallel
in a real fleet), ``server s`` the rest minus the protobuf copies that stand in for the wire. Bytes
are the payload each vehicle sends/receives per round (array bytes plus the protobuf size of the
other records: ``server.grids.content_bytes``).

Vehicles do not train: each returns the global weights of the fedseg ``tiny`` UNet (its real array
shapes) plus a small seeded update, so the numbers are the price of the protocol alone; training time
is the same with and without SecAgg+ and would only dilute the ratio.

    python scripts/bench/secagg_cost.py                      # tiny UNet, 3/10/30 vehicles, 3 rounds
    python scripts/bench/secagg_cost.py --vehicles 3,10 --rounds 2 --backbone resnet18
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import numpy as np

MODES = ("plain", "secaggplus")


def make_fleet(vehicles: int, weights: list[np.ndarray], secagg: dict[str, Any], rounds: int
               ) -> dict[str, Any]:
    """Server and vehicles of one mode, sharing nothing with the other mode's fleet."""
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters

    from clients.mods import run_mods
    from fedseg.config import to_run_config
    from fedseg.settings import RunSettings
    from server.compose import compose_server
    from sim.loopback import LoopbackGrid

    cfg = {"federation": {"num_clients": vehicles, "min_fit_clients": vehicles, "rounds": rounds},
           "strategy": {"name": "fedavg"}, "privacy": {"name": "none"}, "secagg": secagg}
    settings, run_config = RunSettings.from_config(cfg), to_run_config(cfg)

    class Vehicle(NumPyClient):
        def __init__(self, i: int) -> None:
            self.rng = np.random.default_rng(i)

        def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
            update = [(self.rng.standard_normal(p.shape) * 1e-3).astype(p.dtype) if p.dtype.kind == "f"
                      else p for p in parameters]
            moved = [p + u if p.dtype.kind == "f" else p for p, u in zip(parameters, update, strict=True)]
            return moved, 8, {}

    app = ClientApp(client_fn=lambda c: Vehicle(int(c.node_config["partition-id"])).to_client(),
                    mods=[run_mods])
    contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                 state=RecordDict(), run_config=run_config) for i in range(vehicles)}
    parts = compose_server(settings, on_round=lambda row: None,
                           initial_parameters=ndarrays_to_parameters(weights), partition_sizes=[8] * vehicles)
    return {"grid": LoopbackGrid(app, contexts), "strategy": parts.strategy, "fit": parts.fit_workflow,
            "run_config": run_config}


def measure(vehicles: int, weights: list[np.ndarray], secagg: dict[str, Any], rounds: int
            ) -> dict[str, float]:
    """Median per-round wall, vehicle and server seconds, and bytes per vehicle, over ``rounds`` rounds."""
    from flwr.app import Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from server.grids import MeteredGrid

    fleet = make_fleet(vehicles, weights, secagg, rounds)
    loopback, inner_fit = fleet["grid"], fleet["fit"] or default_fit_workflow
    wall: list[float] = []
    client: list[float] = []
    wire: list[float] = []
    traffic: list[tuple[int, int]] = []

    def timed_fit(grid: Any, context: Any) -> None:
        metered, start = MeteredGrid(grid), time.perf_counter()
        client_before, wire_before = loopback.client_s, loopback.transport_s
        inner_fit(metered, context)
        wall.append(time.perf_counter() - start)
        client.append(loopback.client_s - client_before)
        wire.append(loopback.transport_s - wire_before)
        traffic.append((metered.bytes_up, metered.bytes_down))

    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=fleet["run_config"])
    legacy = LegacyContext(context=server, config=ServerConfig(num_rounds=rounds), strategy=fleet["strategy"])
    DefaultWorkflow(fit_workflow=timed_fit)(loopback, legacy)
    return {"round_s": statistics.median(wall),
            "vehicle_s": statistics.median(client) / vehicles,
            "server_s": statistics.median(w - c - t for w, c, t in zip(wall, client, wire, strict=True)),
            "up_kb": statistics.median(u for u, _ in traffic) / vehicles / 1e3,
            "down_kb": statistics.median(d for _, d in traffic) / vehicles / 1e3}


def tiny_weights(backbone: str) -> list[np.ndarray]:
    """The global arrays of fedseg's UNet with ``backbone`` (13 classes), as the server sends them."""
    from fedseg.models import build_model, get_weights

    return [a.copy() for a in get_weights(build_model(backbone, 13))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", default="3,10,30", help="comma list of fleet sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (median reported)")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--shares", type=int, default=3, help="secagg.num_shares (threshold 2)")
    args = parser.parse_args()
    import flwr.server.workflow  # noqa: F401  (Flower sets up its logger on import: quiet it after)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    weights = tiny_weights(args.backbone)
    floats = sum(a.size for a in weights)
    threshold = args.shares // 2 + 1
    secagg = {"name": "secaggplus", "num_shares": args.shares, "reconstruction_threshold": threshold}
    print(f"UNet-{args.backbone}: {floats} values ({sum(a.nbytes for a in weights) / 1e6:.2f} MB), "
          f"{args.rounds} rounds per cell, median; SecAgg+ shares {args.shares}, threshold {threshold}")
    print(f"{'vehicles':>8s} {'mode':>10s} {'round s':>8s} {'vehicle s':>9s} {'server s':>8s} "
          f"{'up KB/veh':>9s} {'down KB/veh':>11s}")
    for n in [int(v) for v in args.vehicles.split(",")]:
        plain = measure(n, weights, {"name": "none"}, args.rounds)
        secure = measure(n, weights, secagg, args.rounds)
        for mode, res in (("plain", plain), ("secaggplus", secure)):
            print(f"{n:8d} {mode:>10s} {res['round_s']:8.3f} {res['vehicle_s']:9.3f} {res['server_s']:8.3f} "
                  f"{res['up_kb']:9.1f} {res['down_kb']:11.1f}")
        ratio = {k: secure[k] / plain[k] for k in plain}
        print(f"{n:8d} {'ratio':>10s} {ratio['round_s']:7.1f}x {ratio['vehicle_s']:8.1f}x "
              f"{ratio['server_s']:7.1f}x {ratio['up_kb']:8.2f}x {ratio['down_kb']:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
