"""Resuming a run after its last completed round: what a checkpoint must hold, and Flower's round count.

Each round's checkpoint (``checkpoints/global.pt``, written by the reporter) carries, besides the
global weights and the round, :func:`resume_state`, which the round recorder hands the reporter with
the round's row: the server strategy's own state (FedAdam/FedYogi/FedAdagrad moments and weights),
the RNG states that decide which vehicles are sampled, adaptive clipping's norm (central DP) and the
vehicles' reported privacy spend; the reporter adds the tracker's run id. The vehicles' accountants
live on their side (``<run dir>/privacy/`` or the edge box's disk, and ``context.state``), so epsilon after a
resume is never lower than before the kill.

Flower's workflow counts rounds from 1 again in a resumed process; :class:`RoundOffset`, the
outermost strategy, shifts them so every strategy, row and checkpoint inside sees the run's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.common import Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.strategy import FedAvgM, FedOpt, Strategy

from fedseg.checkpoints import read_checkpoint
from fedseg.server.central_dp import AdaptiveClipping
from fedseg.server.fleet import SAMPLING
from fedseg.server.wrapper import StrategyWrapper


class RoundOffset(StrategyWrapper):
    """Flower's round ``r`` is the run's round ``r + offset``; its initial evaluation is skipped (that
    round was recorded before the interruption)."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def settings(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return self.inner.configure_fit(server_round + self.offset, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.inner.aggregate_fit(server_round + self.offset, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list:
        return self.inner.configure_evaluate(server_round + self.offset, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round + self.offset, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:
            return None
        return self.inner.evaluate(server_round + self.offset, parameters)


class VehicleSpend(Protocol):
    """The vehicles' reported privacy spend (the round recorder keeps it), latest per vehicle."""

    client_epsilon: dict[str, float]
    client_delta: dict[str, float]


def _tensors(arrays: list[np.ndarray] | None) -> list[torch.Tensor] | None:
    return None if arrays is None else [torch.from_numpy(np.array(a)) for a in arrays]


def _arrays(tensors: list[torch.Tensor] | None) -> list[np.ndarray] | None:
    return None if tensors is None else [t.numpy() for t in tensors]


def resume_state(base: Strategy, spend: VehicleSpend, clipping: AdaptiveClipping | None = None) -> dict[str, Any]:
    """What continuing needs besides the weights and the tracker's run id (tensors and plain data only:
    loads weights-only). ``clipping``: central DP's adaptive clipping, whose norm the next round sends."""
    state: dict[str, Any] = {
        "python_rng": SAMPLING.getstate(),  # the fleet manager's sampling of vehicles (fedseg/server/fleet.py)
        "torch_rng": torch.get_rng_state(),
        "client_epsilon": dict(spend.client_epsilon),
        "client_delta": dict(spend.client_delta),
    }
    if clipping is not None:
        state["clipping_norm"] = float(clipping.clipping_norm)
    if isinstance(base, FedOpt):  # server optimizer: weights it steps from and its moments
        state["strategy"] = {"current_weights": _tensors(base.current_weights), "m_t": _tensors(base.m_t),
                             "v_t": _tensors(base.v_t)}
    if isinstance(base, FedAvgM) and base.server_opt:  # server momentum: weights it steps from, velocity
        weights = parameters_to_ndarrays(base.initial_parameters) if base.initial_parameters else None
        state["strategy"] = {"weights": _tensors(weights), "momentum": _tensors(base.momentum_vector)}
    return state


def restore(state: dict[str, Any], base: Strategy, spend: VehicleSpend,
            clipping: AdaptiveClipping | None = None) -> None:
    """Put :func:`resume_state` back into a freshly composed server."""
    SAMPLING.setstate(_as_rng_state(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    spend.client_epsilon.update(state.get("client_epsilon") or {})
    spend.client_delta.update(state.get("client_delta") or {})
    if clipping is not None and state.get("clipping_norm") is not None:  # else the initial norm (older checkpoint)
        clipping.clipping_norm = float(state["clipping_norm"])
    saved = state.get("strategy")
    if isinstance(base, FedOpt) and saved:
        base.current_weights = _arrays(saved["current_weights"]) or base.current_weights
        base.m_t, base.v_t = _arrays(saved["m_t"]), _arrays(saved["v_t"])
    if isinstance(base, FedAvgM) and saved and "momentum" in saved:
        weights = _arrays(saved["weights"])
        base.initial_parameters = ndarrays_to_parameters(weights) if weights else base.initial_parameters
        base.momentum_vector = _arrays(saved["momentum"])


def _as_rng_state(saved: Any) -> tuple:
    """``Random.setstate`` wants the exact nesting ``getstate`` gave (a checkpoint may hold lists)."""
    version, internal, gauss = saved
    return int(version), tuple(int(x) for x in internal), gauss


class ResumePoint:
    """The last completed round of a run directory: its weights and :func:`resume_state`."""

    def __init__(self, run_dir: Path) -> None:
        content = read_checkpoint(run_dir / "checkpoints" / "global.pt")
        self.round: int = int(content["round"])
        self.state: dict[str, Any] = dict(content.get("resume") or {})
        self.weights = [t.numpy() for t in content["model_state"].values()]

    def __repr__(self) -> str:
        return f"ResumePoint(round={self.round})"
