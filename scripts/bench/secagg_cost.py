"""What SecAgg+ costs per round: wall time and bytes per vehicle, plain vs SecAgg+, at 3, 10 and 30 vehicles.

Three modes per fleet size, in one run: ``plain`` (float32 weights, no codec), ``secaggplus`` (Flower's
SecAgg+ on the full update; masked vectors travel packed to the modulus' 32 bits) and
``secaggplus+CODEC`` (SecAgg+ on a SecAgg+-compatible codec's output, ``--compression``, default
``randk``: fewer values masked). ``--json`` prints, as the last line, every mode's numbers and
``ratio`` (SecAgg+ with the codec over plain; ``ratio_full``: SecAgg+ on the full update over plain).

Both modes run in one process, in one run, through the real apps' pieces: the client mods (delta codec,
Flower's ``secaggplus_mod``), Flower's ``DefaultWorkflow`` with its default fit workflow or fedseg's
``SecAggPlusFit``, and the same strategy. Vehicles are served in-process (``fedseg.sim.loopback.LoopbackGrid``:
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
    python scripts/bench/secagg_cost.py --vehicles 10 --rounds 2 --backbone resnet34 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from typing import Any

import numpy as np


def make_fleet(vehicles: int, weights: list[np.ndarray], secagg: dict[str, Any], rounds: int,
               compression: dict[str, Any]) -> dict[str, Any]:
    """Server and vehicles of one mode, sharing nothing with the other mode's fleet."""
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import ndarrays_to_parameters

    from fedseg.clients.client_app import VEHICLE_MODS
    from fedseg.config import to_run_config
    from fedseg.server.compose import compose_server
    from fedseg.settings import RunSettings
    from fedseg.sim.loopback import LoopbackGrid

    cfg = {"federation": {"num_clients": vehicles, "min_fit_clients": vehicles, "rounds": rounds},
           "strategy": {"name": "fedavg"}, "privacy": {"name": "none"}, "secagg": secagg,
           "compression": compression, "output_dir": tempfile.mkdtemp(prefix="secagg_cost_")}
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
                    mods=VEHICLE_MODS)
    contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                 state=RecordDict(), run_config=run_config) for i in range(vehicles)}
    parts = compose_server(settings, on_round=lambda row, resume: None,
                           initial_parameters=ndarrays_to_parameters(weights), partition_sizes=[8] * vehicles)
    return {"grid": LoopbackGrid(app, contexts), "strategy": parts.strategy, "fit": parts.fit_workflow,
            "run_config": run_config}


def measure(vehicles: int, weights: list[np.ndarray], secagg: dict[str, Any], rounds: int,
            compression: dict[str, Any] | None = None) -> dict[str, float]:
    """Median per-round wall, vehicle and server seconds, and bytes per vehicle, over ``rounds`` rounds."""
    from flwr.app import Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from fedseg.server.grids import MeteredGrid

    fleet = make_fleet(vehicles, weights, secagg, rounds, compression or {"name": "none"})
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
    parser.add_argument("--compression", default="randk", help="SecAgg+-compatible codec of the third mode "
                        "(none: leave that mode out)")
    parser.add_argument("--fraction", type=float, default=0.1, help="the codec's fraction (randk)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON on the last line")
    args = parser.parse_args()
    import flwr.server.workflow  # noqa: F401  (Flower sets up its logger on import: quiet it after)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    weights = tiny_weights(args.backbone)
    floats = sum(a.size for a in weights)
    threshold = args.shares // 2 + 1
    secagg = {"name": "secaggplus", "num_shares": args.shares, "reconstruction_threshold": threshold}
    codec = {"name": args.compression, **({"fraction": args.fraction} if args.compression != "none" else {})}
    print(f"UNet-{args.backbone}: {floats} values ({sum(a.nbytes for a in weights) / 1e6:.2f} MB), "
          f"{args.rounds} rounds per cell, median; SecAgg+ shares {args.shares}, threshold {threshold}")
    print(f"{'vehicles':>8s} {'mode':>18s} {'round s':>8s} {'vehicle s':>9s} {'server s':>8s} "
          f"{'up KB/veh':>9s} {'down KB/veh':>11s}")
    report: dict[str, Any] = {"backbone": args.backbone, "values": int(floats), "rounds": args.rounds,
                              "compression": codec, "fleets": {}}
    for n in [int(v) for v in args.vehicles.split(",")]:
        modes = {"plain": measure(n, weights, {"name": "none"}, args.rounds),
                 "secaggplus": measure(n, weights, secagg, args.rounds)}
        if args.compression != "none":
            modes[f"secaggplus+{args.compression}"] = measure(n, weights, secagg, args.rounds, codec)
        for mode, res in modes.items():
            print(f"{n:8d} {mode:>18s} {res['round_s']:8.3f} {res['vehicle_s']:9.3f} {res['server_s']:8.3f} "
                  f"{res['up_kb']:9.1f} {res['down_kb']:11.1f}")
        ratios = {mode: {k.removesuffix("_kb"): res[k] / modes["plain"][k] for k in res}
                  for mode, res in modes.items() if mode != "plain"}
        for mode, ratio in ratios.items():
            print(f"{n:8d} {'x plain: ' + mode[10:] if mode != 'secaggplus' else 'x plain':>18s} "
                  f"{ratio['round_s']:7.2f}x {ratio['vehicle_s']:8.2f}x {ratio['server_s']:7.2f}x "
                  f"{ratio['up']:8.3f}x {ratio['down']:10.3f}x", flush=True)
        report["fleets"][n] = {"modes": modes, "ratios": ratios}
    if args.json:  # the largest fleet's ratios: SecAgg+ with the codec (or on the full update) over plain
        largest = report["fleets"][max(report["fleets"])]["ratios"]
        report["ratio_full"] = largest["secaggplus"]
        report["ratio"] = largest.get(f"secaggplus+{args.compression}", largest["secaggplus"])
        print(json.dumps(report))


if __name__ == "__main__":
    main()
