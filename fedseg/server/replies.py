"""What a vehicle says about its reply, checked before the server believes it.

A reply carries, besides the update, values the vehicle chose: its example count (FedAvg's weight),
its metrics, and a ``partition_id``. None of them may steer or stop the fleet:

* identity: a vehicle is named by the node id Flower's legacy workflow matched its reply to
  (``proxy.cid``: the message's ``src_node_id``, which the SuperLink accepts only as the node the
  instruction went to, a node that proved its registered key under ``--enable-supernode-auth``);
  ``partition_id`` is only a label beside it, so claiming another's cannot get the other blamed;
* metrics and count: type- and range-checked (:func:`fedseg.robust.reply_problem`); a bad one is a
  rejected reply, noted in the round's row like the update guard's rejections;
* weight: a count above ``max_examples`` is clipped to it (noted in the row): no vehicle weighs more
  than the largest the run allows. Clipped rather than rejected, so a cap set too low shows in the
  rows instead of stopping a fleet of honest vehicles; the update is still screened by the guard.
  Without a cap every vehicle that trained weighs the same. Under SecAgg+ the weight travels masked,
  so a claim above the cap cannot be clipped: :class:`~fedseg.server.secagg.SecureSumStrategy`
  rejects the round's sum instead (:meth:`ReplyRules.secure_problems`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy

from fedseg.robust import reply_problem

log = logging.getLogger("fedseg")
Reply = tuple[ClientProxy, FitRes]


def vehicle_of(proxy: ClientProxy) -> str:
    """A vehicle's name in logs and rows: its Flower node id (see the module docstring)."""
    return str(proxy.cid)


def partition_label(res: FitRes) -> int | None:
    """The ``partition_id`` a vehicle reported, if it is one (a label: the vehicle chose it)."""
    value = res.metrics.get("partition_id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def privacy_key(proxy: ClientProxy, res: FitRes) -> str:
    """Where a vehicle's privacy spend is kept (``client_epsilon``): its partition label, which a
    resumed simulation keeps (node ids are new in every process) and users read; else its node id."""
    partition = partition_label(res)
    return str(partition) if partition is not None else vehicle_of(proxy)


def described(proxy: ClientProxy, res: FitRes) -> str:
    """``node N (partition P)`` for a log line."""
    partition = partition_label(res)
    return f"node {vehicle_of(proxy)}" + (f" (partition {partition})" if partition is not None else "")


def rejection(proxy: ClientProxy, res: FitRes, reason: str) -> dict[str, Any]:
    """A row's ``rejected`` entry: the node, its partition label, why."""
    return {"vehicle": vehicle_of(proxy), "partition": partition_label(res), "reason": reason}


def example_cap(max_examples: int | None, partition_sizes: Sequence[int] | None,
                max_weight: float | None = None) -> int | None:
    """The most examples one reply may weigh: ``federation.max_examples``, else the largest partition
    the server knows, else SecAgg+'s ``max_weight``; under SecAgg+ never above ``max_weight`` (a heavier
    weight overflows the fixed point). None: no bound known, every vehicle weighs the same."""
    cap = max_examples or (max(partition_sizes) if partition_sizes else None)
    if max_weight is not None:
        cap = min(cap, int(max_weight)) if cap is not None else int(max_weight)
    return cap


@dataclass
class Screened:
    """One round's replies after :meth:`ReplyRules.screen`."""

    kept: list[Reply] = field(default_factory=list)  # counts clipped (or equalized)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ReplyRules:
    """What the run believes of a reply: ``max_examples`` (None: equal weights)."""

    max_examples: int | None = None

    def screen(self, server_round: int, results: Sequence[Reply]) -> Screened:
        """Rejects malformed replies and clips each count to the cap (or sets it to 1 without one)."""
        out = Screened()
        for proxy, res in results:
            problem = reply_problem(res.num_examples, res.metrics)
            if problem is not None:
                log.warning(f"round {server_round}: rejected {described(proxy, res)}'s reply: {problem}")
                out.rejected.append(rejection(proxy, res, problem))
                continue
            n = res.num_examples
            if res.metrics.get("skipped") is True or n == 0:
                weight = n
            elif self.max_examples is None:
                weight = 1
            else:
                weight = min(n, self.max_examples)
                if weight < n:
                    log.warning(f"round {server_round}: {described(proxy, res)} claims {n} examples; "
                                f"it weighs {weight} (federation.max_examples)")
                    out.clipped.append({"vehicle": vehicle_of(proxy), "partition": partition_label(res),
                                        "claimed": n, "weight": weight})
            out.kept.append((proxy, res if weight == n else FitRes(res.status, res.parameters, weight,
                                                                    res.metrics)))
        return out

    def secure_problems(self, results: Sequence[Reply]) -> list[dict[str, Any]]:
        """Under SecAgg+: the replies the sum cannot be trusted with (malformed, or a count above the cap,
        which the masked weight cannot be clipped to)."""
        rejected = []
        for proxy, res in results:
            problem = reply_problem(res.num_examples, res.metrics)
            if problem is None and self.max_examples is not None and res.num_examples > self.max_examples:
                problem = (f"claims {res.num_examples} examples, above the {self.max_examples} a vehicle may "
                           "weigh (federation.max_examples, secagg.max_weight)")
            if problem is not None:
                rejected.append(rejection(proxy, res, problem))
        return rejected
