"""The server never waits silently: it waits for its vehicles with a limit, before the first round and each later one.

Flower's ``DefaultWorkflow`` waits for ``min_available_clients`` vehicles for up to a day without a
word. Here (a vehicle silent for ``federation.round_timeout`` is dropped from its round by
``server.grids.TimeoutGrid``, and a round too few vehicles answer is stopped by ``RoundRecorder``):

* :func:`wait_for_vehicles`, before the first round: poll the SuperLink for joined vehicles, log
  "N of M vehicles joined" as they come, and after ``deploy.join_timeout`` go on with those that
  joined if they are at least ``min_fit_clients``, else stop with one line (:class:`FleetError`);
* :class:`FleetClientManager`: the same rule before every later round (a vehicle that left is
  waited for up to ``deploy.join_timeout``, then the round goes on without it, or the run stops).

It also samples each round's vehicles with :data:`SAMPLING`, a generator of its own that the run's seed
seeds (``ServerParts.run``) and a checkpoint carries (``fedseg/server/resume.py``), from the vehicles in
id order: Flower's manager samples with Python's shared ``random`` in the order vehicles registered, and
in the simulation process other code draws from that generator too (a run repeated with the same seed
sampled the same vehicles in round 1 and one to three others in each later round).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from flwr.server import Grid
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from fedseg.errors import RunFailed

log = logging.getLogger("fedseg")
SAMPLING = random.Random()  # the vehicles' sampling (see the module docstring)


class FleetError(RunFailed):
    """Too few vehicles to run a round; ``str(e)`` is one line saying what to do."""


def _too_few(have: int, wanted: int, minimum: int, waited: float) -> FleetError:
    return FleetError(f"only {have} of {wanted} vehicles joined within deploy.join_timeout={waited:g} s, "
                      f"fewer than federation.min_fit_clients={minimum}: start more SuperNodes, or lower "
                      "federation.num_clients / federation.min_fit_clients")


def wait_for_vehicles(grid: Grid, *, wanted: int, minimum: int, timeout: float, report_every: float = 10.0,
                      poll: float = 1.0, clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait until ``wanted`` vehicles have joined or ``timeout`` s passed; return how many joined.

    Logs the count whenever it changes and every ``report_every`` s. Raises :class:`FleetError`
    when fewer than ``minimum`` joined in time.
    """
    start = clock()
    reported, last = -1, start - report_every
    while True:
        joined = len(set(grid.get_node_ids()))
        now = clock()
        if joined >= wanted:
            log.info(f"fedseg: {joined} of {wanted} vehicles joined")
            return joined
        if joined != reported or now - last >= report_every:
            log.info(f"fedseg: {joined} of {wanted} vehicles joined; waiting up to "
                     f"{max(0.0, timeout - (now - start)):.0f} s more (deploy.join_timeout)")
            reported, last = joined, now
        if now - start >= timeout:
            break
        sleep(min(poll, timeout - (now - start)))
    if joined < minimum:
        raise _too_few(joined, wanted, minimum, timeout)
    log.warning(f"fedseg: going on with the {joined} of {wanted} vehicles that joined")
    return joined


class FleetClientManager(SimpleClientManager):
    """Flower's client manager, but a round waits ``timeout`` s for missing vehicles, not a day."""

    def __init__(self, *, minimum: int, timeout: float) -> None:
        super().__init__()
        self.minimum, self.timeout = minimum, timeout

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Flower's ``SimpleClientManager.sample``, drawing from :data:`SAMPLING` over the vehicles in id order."""
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = sorted(self.clients, key=int)
        if criterion is not None:
            available = [cid for cid in available if criterion.select(self.clients[cid])]
        if num_clients > len(available):
            log.info(f"fedseg: {len(available)} vehicles available, {num_clients} wanted: no sample this round")
            return []
        return [self.clients[cid] for cid in SAMPLING.sample(available, num_clients)]

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if super().wait_for(num_clients, timeout=int(min(timeout, self.timeout))):
            return True
        have = len(self.clients)
        if have < self.minimum:
            raise _too_few(have, num_clients, self.minimum, self.timeout)
        log.warning(f"fedseg: {have} of {num_clients} vehicles connected; the round goes on with them")
        return False
