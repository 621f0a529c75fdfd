"""A toy fleet driven end to end in-process (LoopbackGrid) through the real client mods and the real
server composition (``fedseg.server.compose``): vehicle i adds ``updates[i]`` to the global arrays.

Shared by the SecAgg+ tests and the fault and hostile-update tests; golden numbers by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.common import ndarrays_to_parameters

from fedseg.clients.client_app import VEHICLE_MODS
from fedseg.config import to_run_config
from fedseg.server.compose import compose_server
from fedseg.server.fleet import FleetClientManager
from fedseg.server.resume import restore
from fedseg.settings import RunSettings
from fedseg.sim.loopback import LoopbackGrid

# Vehicle i adds UPDATES[i] to every global element and trains on EXAMPLES[i] frames.
UPDATES, EXAMPLES = (1.0, 4.0, -2.0), (1, 2, 3)
START = 10.0  # every global element before round 1 (not 0: a codec that forgot the global must fail)


class Fleet:
    """A run of ``rounds`` rounds over toy vehicles; keeps the global arrays after every round."""

    def __init__(self, updates: list[list[np.ndarray]], examples: list[int], secagg: dict[str, Any], *,
                 strategy: str = "fedavg", privacy: dict[str, Any] | None = None, rounds: int = 1,
                 crash: tuple[int, ...] = (), skip: tuple[int, ...] = (), fail_always: tuple[int, ...] = (),
                 send: dict[int, Callable[[list[np.ndarray]], list[np.ndarray]]] | None = None,
                 federation: dict[str, Any] | None = None, compression: dict[str, Any] | None = None,
                 output_dir: str | None = None, claims: dict[int, dict[str, Any]] | None = None,
                 pool: int | None = None, trained: list[bool] | None = None) -> None:
        """``pool``: the vehicles ride that many simulation nodes (``fedseg/vehicle_pool.py``); ``trained``:
        the arrays ``privacy.trainable`` trains (``fedseg.models.trained_mask``)."""
        n, crashed = len(updates), set[int]()
        options = {"fedprox": {"proximal_mu": 0.01}}.get(strategy, {})
        # min_fit_clients n - 1: a round survives one vehicle lost (all n are still sampled: n x 1.0).
        cfg: dict[str, Any] = {
            "federation": {"num_clients": n, "min_fit_clients": n - 1, "rounds": rounds, **(federation or {})},
            "strategy": {"name": strategy, **options}, "secagg": secagg, "privacy": privacy or {"name": "none"},
            "compression": compression or {"name": "none"}}
        if output_dir is not None:  # where vehicles keep state on disk (a codec's error-feedback residual)
            cfg["output_dir"] = output_dir
        if pool is not None:
            cfg["federation"]["sim_nodes"] = pool
        self.settings, run_config = RunSettings.from_config(cfg), to_run_config(cfg)

        class Toy(NumPyClient):
            def __init__(self, i: int) -> None:
                self.i = i

            def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
                weights, n, metrics = self.honest_fit(parameters)
                claim = (claims or {}).get(self.i, {})  # what this vehicle says instead (count, metrics)
                return weights, claim.get("examples", n), {**metrics, **claim.get("metrics", {})}

            def honest_fit(self, parameters: list) -> tuple[list, int, dict]:
                if self.i in fail_always or (self.i in crash and self.i not in crashed):  # crash: first fit only
                    crashed.add(self.i)
                    raise RuntimeError(f"vehicle {self.i} lost its camera")
                if send and self.i in send:  # whatever this vehicle chooses to send instead
                    return send[self.i](parameters), examples[self.i], {"loss": 0.0, "partition_id": self.i}
                if self.i in skip:  # as fedseg/clients/client_app.py when a vehicle's privacy budget is spent
                    return parameters, 0, {"skipped": True, "partition_id": self.i}
                return ([p + u for p, u in zip(parameters, updates[self.i], strict=True)], examples[self.i],
                        {"loss": float(self.i), "partition_id": self.i})

        app = ClientApp(client_fn=lambda c: Toy(int(c.node_config["partition-id"])).to_client(),
                        mods=VEHICLE_MODS)
        pooled = {} if pool is None else {"num-partitions": pool}
        contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, **pooled},
                                     state=RecordDict(), run_config=run_config) for i in range(pool or n)}
        self.grid = LoopbackGrid(app, contexts)
        self.updates, self.examples, self.rounds, self.n, self.pool = updates, examples, rounds, n, pool
        self.trained = trained
        self.globals: list[list[np.ndarray]] = []  # round 0 (initial), 1, 2, ...
        self.rows: list[dict[str, Any]] = []
        self.resume: dict[str, Any] = {}  # what the last round's checkpoint would hold to continue

    def record(self, row: dict[str, Any], resume: dict[str, Any]) -> None:
        """The round recorder's output, as the reporter gets it."""
        self.rows.append(row)
        self.resume = resume

    def run(self, *, start_round: int = 0, initial: list[np.ndarray] | None = None,
            state: dict[str, Any] | None = None, seed: int | None = None) -> Fleet:
        """Run the rounds; ``start_round``/``initial``/``state`` continue a run after that round; ``seed``
        seeds the vehicles' sampling as the server app does for a run from its start."""
        def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
            self.globals.append([a.copy() for a in arrays])
            return 0.0, {}

        start = initial if initial is not None else [np.full_like(u, START) for u in self.updates[0]]
        self.parts = compose_server(self.settings, on_round=self.record, evaluate_fn=evaluate_fn,
                                    initial_parameters=ndarrays_to_parameters(start),
                                    partition_sizes=list(self.examples), start_round=start_round,
                                    trained=self.trained)
        if state is not None:
            restore(state, self.parts.base, self.parts.recorder, self.parts.recorder.adaptive_clipping())
        server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.parts.run(self.grid, server, self.rounds - start_round, pooled_fleet=self.n if self.pool else None,
                       seed=seed, client_manager=FleetClientManager(minimum=1, timeout=30))
        return self


def toy_updates(values: tuple[float, ...] = UPDATES) -> list[list[np.ndarray]]:
    """Vehicle i's update: ``values[i]`` everywhere in a 2x3 array, and ``-values[i] / 2`` in a 4-vector."""
    return [[np.full((2, 3), v, np.float32), np.full(4, -v / 2, np.float32)] for v in values]
