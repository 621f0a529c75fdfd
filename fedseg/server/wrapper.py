"""The base of every fedseg strategy wrapper, and how a wrapper chain names itself.

Each feature of the server wraps the strategy inside it (``fedseg/server/compose.py`` fixes the order).
``repr`` of the outermost strategy lists every layer, outermost first, with what configures it: the
chain docs/ARCHITECTURE.md describes is checked against it (``tests/test_compose.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy


def inner_of(strategy: Strategy) -> Strategy | None:
    """The strategy ``strategy`` wraps (fedseg's wrappers and Flower's DP ones), None at the bottom."""
    inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return inner if isinstance(inner, Strategy) else None


def layers(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy`` and every strategy inside it, outermost first."""
    inner: Strategy | None = strategy
    while inner is not None:
        yield inner
        inner = inner_of(inner)


def layer_repr(strategy: Strategy) -> str:
    """``repr`` of a chain from ``strategy`` inward. Flower's own strategies are named by their class
    (its reprs say ``FedAvgM`` for a subclass, and its DP wrapper's hides what it wraps)."""
    if isinstance(strategy, StrategyWrapper):
        return repr(strategy)
    inner = inner_of(strategy)
    name = type(strategy).__name__
    if inner is None:
        return f"{name}()"
    fields = [f"{key}={getattr(strategy, key)}" for key in ("noise_multiplier", "clipping_norm", "num_sampled_clients")
              if hasattr(strategy, key)]
    return f"{name}({', '.join([*fields, layer_repr(inner)])})"


class StrategyWrapper(Strategy):
    """A strategy that delegates every call to ``inner``; wrappers override only what they change, and
    name what configures them in :meth:`settings` (shown by ``repr``)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def settings(self) -> dict[str, Any]:
        """What configures this layer, for ``repr``."""
        return {}

    def __repr__(self) -> str:
        fields = [f"{key}={value!r}" for key, value in self.settings().items()]
        return f"{type(self).__name__}({', '.join([*fields, layer_repr(self.inner)])})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)
