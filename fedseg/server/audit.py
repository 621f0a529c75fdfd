"""``privacy.audit=true``: the run's privacy audit, beside its accountant (methods in :mod:`fedseg.audit`).

Canaries never enter the model a user takes away: each audit is a **separate audit run** with the
run's mechanism, started by the server after the last round; the run's model, checkpoints and rows
are the same with and without the audit (same seed, same metrics).

* ``privacy=central`` (a vehicle): :func:`audit_central`, Andrew et al.'s canary vehicles. A fleet
  of ``num_clients`` vehicles, ``m`` sampled a round without replacement for ``rounds`` rounds, as in
  the run; the first ``canaries`` of them are canary vehicles whose update is a fixed random unit
  direction times the round's clipping norm, the others send no change. Every canary passes through
  Flower's own client-side clipping (what ``fixedclipping_mod`` or ``adaptiveclipping_mod`` calls, with
  the clipped bit adaptive clipping counts) and the run's own DP wrapper
  (:func:`~fedseg.server.central_dp.wrap_central_dp`: equal weights, the mean, Flower's noise of std
  ``noise_multiplier * C / m``) around FedAvg, on arrays of the shapes the run noises. Silent other vehicles are the worst case for the fleet: nothing else hides a canary, so
  the estimate is as high as this mechanism allows.
* ``privacy=dpsgd`` (a frame): :func:`fedseg.audit.audit_dpsgd` on a copy of the run's initial model
  and the server's held-out frames, standing in for one vehicle's (the canaries measure the mechanism:
  clipping, Opacus' noise at that vehicle's noise multiplier, sample rate and steps).
* ``privacy=none``: the per-frame audit without noise (clipping kept, so canaries have a scale): what
  the audit finds where nothing protects a frame, i.e. how much power it has.

``privacy_audit.json`` in the run directory holds the result; ``audit_epsilon`` goes into the summary.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.supercore.differential_privacy import (
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)
from torch import nn
from torch.utils.data import Dataset

from fedseg.audit import AuditResult, audit_dpsgd, canary_direction, cosine_audit
from fedseg.checkpoints import load_initial_weights
from fedseg.config import FederationSpec
from fedseg.data import FleetData
from fedseg.models import build_run_model, set_trainable
from fedseg.privacy import CentralDPSpec, DPSpec, PrivacySpec
from fedseg.runlog import atomic_write_text
from fedseg.server.central_dp import central_accounting, sampled_vehicles, wrap_central_dp
from fedseg.server.recorder import RoundRecorder
from fedseg.settings import RunSettings

log = logging.getLogger("fedseg")
AUDIT_FILE = "privacy_audit.json"
CANARY_VEHICLES = 1000  # at most; and at most half the fleet (Andrew et al. use about a thousand)
NULL_DIRECTIONS = 2000  # fresh random directions: the cosines' null distribution
GRADIENT_CANARIES = 1000  # Steinke et al.'s per-frame canaries


def audit_central(spec: CentralDPSpec, fed: FederationSpec, shapes: Sequence[tuple[int, ...]], *, rounds: int,
                  canaries: int = CANARY_VEHICLES, nulls: int = NULL_DIRECTIONS, seed: int = 0) -> AuditResult:
    """Andrew et al.'s canary vehicles through the run's clipping and DP wrapper (module docstring)."""
    vehicles, sampled = fed.num_clients, sampled_vehicles(spec, fed)
    canaries = min(canaries, vehicles // 2)
    if canaries < 2:
        raise ValueError(f"privacy.audit needs a fleet of at least 4 vehicles for canary vehicles, got {vehicles}")
    sizes = [int(np.prod(s)) for s in shapes]
    dim = sum(sizes)
    strategy = wrap_central_dp(FedAvg(fraction_evaluate=0.0, min_evaluate_clients=0,
                                      fit_metrics_aggregation_fn=lambda _: {}), spec, fed)  # no metrics to merge
    rng = np.random.default_rng([seed, 2])
    global_ = [np.zeros(s, dtype=np.float32) for s in shapes]
    saved = np.random.get_state()  # Flower's noise draws from numpy's global generator: seed it, then restore
    np.random.seed(int(np.random.SeedSequence([seed, 3]).generate_state(1)[0]))
    try:
        for round_ in range(1, rounds + 1):
            clip = float(cast(Any, strategy).clipping_norm)  # adaptive clipping moves it each round
            replies = [_reply(global_, vehicle, canaries, clip, seed, sizes, adaptive=spec.clipping == "adaptive")
                       for vehicle in rng.choice(vehicles, size=sampled, replace=False)]
            aggregated, _ = strategy.aggregate_fit(round_, replies, [])
            if aggregated is None:
                raise RuntimeError(f"audit round {round_}: Flower's DP wrapper returned no model")
            global_ = parameters_to_ndarrays(aggregated)
    finally:
        np.random.set_state(saved)
    moved = torch.from_numpy(np.concatenate([a.reshape(-1) for a in global_]).astype(np.float32))
    unit = moved / moved.norm()
    cosines = [float(unit @ canary_direction(seed, i, dim)) for i in range(canaries + nulls)]
    accountant, delta = central_accounting(spec, fed)(rounds)  # the run's own accountant
    estimate = cosine_audit(cosines[:canaries], cosines[canaries:], delta=delta)
    return AuditResult(
        method="one-shot canary vehicles (Andrew et al. 2024): final model delta", canaries=canaries, delta=delta,
        accountant_epsilon=None if np.isinf(accountant) else accountant, audit_epsilon=estimate.pop("epsilon"),
        details=estimate | {"null_directions": nulls, "vehicles": vehicles, "sampled": sampled, "rounds": rounds,
                            "noise_multiplier": spec.noise_multiplier, "clipping_norm": spec.clipping_norm,
                            "dimensions": dim})


def _reply(global_: list[np.ndarray], vehicle: int, canaries: int, clip: float, seed: int,
           sizes: Sequence[int], *, adaptive: bool) -> tuple[ClientProxy, FitRes]:
    """One sampled vehicle's reply: a canary's direction times the round's clipping norm, clipped by Flower's
    function of ``fixedclipping_mod`` (``adaptiveclipping_mod``, with its clipped bit), else no change
    (Flower's clipping divides by the update's norm: a zero update, within any norm, skips it)."""
    weights = [a.copy() for a in global_]
    metrics: dict[str, Scalar] = {KEY_NORM_BIT: False} if adaptive else {}
    if vehicle < canaries:
        update = (canary_direction(seed, vehicle, sum(sizes)) * clip).numpy()
        parts = np.split(update, np.cumsum(sizes)[:-1])
        weights = [w + p.reshape(w.shape) for w, p in zip(weights, parts, strict=True)]
        if adaptive:
            metrics[KEY_NORM_BIT] = compute_adaptive_clip_model_update(weights, global_, clip)
        else:
            compute_clip_model_update(weights, global_, clip)  # in place
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 1, metrics)
    return cast(ClientProxy, None), res  # no proxy: nothing in the DP chain reads it


def audit_run(privacy: PrivacySpec, fed: FederationSpec, model: nn.Module, frames: Dataset, *,
              seed: int) -> AuditResult:
    """The audit ``privacy`` calls for (module docstring); ``model`` is the run's initial model, not changed."""
    if isinstance(privacy, CentralDPSpec):  # the arrays the server noises: what the vehicles train
        part = privacy.trainable
        if part == "all":
            shapes = [tuple(t.shape) for t in model.state_dict().values() if t.is_floating_point()]
        else:
            trained = copy.deepcopy(model)
            set_trainable(trained, part)
            shapes = [tuple(p.shape) for p in trained.parameters() if p.requires_grad]
        return audit_central(privacy, fed, shapes, rounds=fed.rounds, seed=seed)
    spec = privacy if isinstance(privacy, DPSpec) else DPSpec(noise_multiplier=0.0, target_epsilon=None,
                                                               trainable="all")
    batch = min(spec.logical_batch(fed.local_batch_size), len(frames))  # type: ignore[arg-type]
    spec = dataclasses.replace(spec, expected_batch_size=None)
    return audit_dpsgd(model, frames, spec, batch_size=batch, epochs=fed.rounds * fed.local_epochs, lr=fed.lr,
                       canaries=GRADIENT_CANARIES, seed=seed)


def audit_after_run(settings: RunSettings, data: FleetData, out_dir: Path, *,
                    run_epsilon: float | None) -> dict[str, Any]:
    """The run's audit on a fresh copy of its initial model (``model.init``, else the seeded random one)
    and the server's held-out frames; writes ``privacy_audit.json``, returns what goes into the summary."""
    # Per-frame audits need the GroupNorm UNet; a BatchNorm run (privacy=none) starts that one at random,
    # since its model.init does not fit it (the audit measures the mechanism, not the start)
    dp = settings.group_norm or not isinstance(settings.privacy, CentralDPSpec)
    model = build_run_model(settings.model, data.label_map.num_classes, seed=settings.seed, dp=dp)
    if dp == settings.group_norm:
        load_initial_weights(model, settings.model)
    try:
        result = audit_run(settings.privacy, settings.federation, model, data.heldout, seed=settings.seed)
    except (ValueError, RuntimeError) as err:  # the run's model stands; the summary says why no audit
        log.error(f"fedseg: privacy audit failed: {err}")
        return {"audit_epsilon": None, "audit_error": str(err)}
    return {"audit_epsilon": write_audit(out_dir, result, run_epsilon=run_epsilon)["audit_epsilon"]}


def run_epsilon(recorder: RoundRecorder, rounds: int) -> float | None:
    """The run's own accountant epsilon: vehicle-level after ``rounds``, else the most any vehicle spent."""
    if recorder.central_dp is not None:
        return recorder.central_dp(rounds)[0]
    return max(recorder.client_epsilon.values(), default=None)


def write_audit(out_dir: Path, result: AuditResult, *, run_epsilon: float | None) -> dict[str, Any]:
    """``privacy_audit.json`` (with the run's own accountant epsilon, if any) and its record."""
    finite = run_epsilon is not None and math.isfinite(run_epsilon)  # no noise: unbounded, written as null
    record = result.as_json() | {"run_accountant_epsilon": run_epsilon if finite else None,
                                 "separate_audit_run": True}  # canaries never touch the run's model
    atomic_write_text(out_dir / AUDIT_FILE, json.dumps(record, indent=2))
    log.info(f"fedseg: privacy audit: epsilon {record['audit_epsilon']} (accountant "
             f"{record['accountant_epsilon']}) -> {out_dir / AUDIT_FILE}")
    return record

