"""The server side of a run, composed in one place and one order. The server app, tests and benchmarks
all build it here.

From the inside out:

1. Flower's strategy from the registry (FedAvg, FedProx, FedAvgM, FedAdam, FedMedian,
   FedTrimmedAvg, Krum), evaluating server-side, inside :class:`~server.strategy.StatisticsMean`
   (BatchNorm statistics leave each round as the statistics of all the vehicles' frames together,
   the variance that of the mixture; no server optimizer steps them, and Flower's in-place mean no
   longer zeroes integer counters);
2. ``privacy=central``: Flower's ``DifferentialPrivacyClientSideFixedClipping`` around it (noise on
   the aggregate of updates the vehicles clipped with ``fixedclipping_mod``);
3. without SecAgg+: :class:`~server.guard.UpdateGuard`, which drops non-finite, misshapen and
   outsized updates before anything averages them;
4. without SecAgg+, ``compression`` other than ``none``: :class:`~server.codecs.DecodingStrategy`,
   which turns each vehicle's encoded update into weights (under central DP clipped again to the
   clipping norm) before the guard, the DP wrapper and the strategy see it;
5. :class:`~server.strategy.RoundRecorder`: the run-output contract (one row per round); it stops
   the run when fewer than ``min_fit_clients`` vehicles answer a round; outside the decoder, so its
   ``bytes_up`` are the encoded bytes as they travelled;
6. ``secagg=secaggplus``: :class:`~server.secagg.SecureSumStrategy`, outermost (but for the round
   offset of a resumed run, ``fedseg/server/resume.py``), because the vehicles' masked deltas must become
   weights again before anything inside sees them: it decodes the one unmasked sum with the run's
   codec (SecAgg+ admits only codecs that decode linearly) and annotates the recorder's rows with
   what the protocol really carried.

The fit config carries the round's client lr (``federation.lr_schedule``) and the round's shared codec seed (``randk``: the server picks it, so positions
never travel). The fit workflow is Flower's default, or :class:`~server.secagg.SecAggPlusFit` under
SecAgg+ (masked vectors packed to the modulus' width on the wire). Why the legacy
``LegacyContext``/``DefaultWorkflow`` path: Flower 1.42's SecAgg+ exists only there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.common import Context, Parameters
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow

from fedseg.compression import CODECS, SEED_KEY, round_seed
from fedseg.privacy import CentralDPSpec
from fedseg.secagg import SecAggSpec, auto_quantization_range, resolve_max_weight, validate_secagg
from fedseg.server.central_dp import central_accounting, sampled_vehicles, wrap_central_dp
from fedseg.server.codecs import DecodingStrategy
from fedseg.server.grids import TimeoutGrid
from fedseg.server.guard import UpdateGuard
from fedseg.server.resume import RoundOffset
from fedseg.server.secagg import SecAggPlusFit, SecureSumStrategy
from fedseg.server.strategy import (
    STRATEGIES,
    RoundRecorder,
    StatisticsMean,
    build_strategy,
    mean_train_loss,
    strategy_entry,
)
from fedseg.settings import RunSettings
from fedseg.training import scheduled_lr

EvaluateFn = Callable[[int, list, dict], tuple[float, dict] | None]


@dataclass
class ServerParts:
    """The composed server: the outermost strategy, the recorder inside it, and the fit workflow."""

    strategy: Strategy
    recorder: RoundRecorder
    fit_workflow: SecAggPlusFit | None
    base: Strategy  # Flower's own strategy at the bottom of the chain (its state is what resumes)
    round_timeout: float | None = None

    def run(self, grid: Grid, context: Context, rounds: int, *,
            client_manager: ClientManager | None = None) -> None:
        """Run ``rounds`` rounds on ``grid`` (Flower's legacy workflow: where SecAgg+ lives); a round
        waits at most ``round_timeout`` seconds for its vehicles; ``client_manager`` (e.g. the fleet's,
        ``fedseg/server/fleet.py``) decides how long to wait for them to be available."""
        legacy = LegacyContext(context=context, strategy=self.strategy, client_manager=client_manager,
                               config=ServerConfig(num_rounds=rounds, round_timeout=self.round_timeout))
        DefaultWorkflow(fit_workflow=self.fit_workflow)(TimeoutGrid(grid, self.round_timeout), legacy)


def check_composition(settings: RunSettings, partition_sizes: Sequence[int] | None = None) -> None:
    """Every check of how the features combine that can fail before training (a one-line ValueError)."""
    fed = settings.federation
    if fed.min_fit_clients > fed.num_clients:
        raise ValueError(f"federation.min_fit_clients={fed.min_fit_clients} exceeds "
                         f"federation.num_clients={fed.num_clients}: no round could start")
    if partition_sizes:
        settings.privacy.check_fleet(partition_sizes, batch_size=fed.batch_size, rounds=fed.rounds,
                                     local_epochs=fed.local_epochs)
    entry, name = strategy_entry(settings.strategy.name), settings.strategy.name
    sums = [key for key, e in STRATEGIES.items() if e.weighted_sum]
    if isinstance(settings.privacy, CentralDPSpec):
        if not entry.noise_on_mean:
            means = [key for key, e in STRATEGIES.items() if e.noise_on_mean]
            raise ValueError(f"privacy=central calibrates its noise to a mean of clipped updates, but "
                             f"strategy={name} {entry.why_not_mean}; valid: {means}")
        sampled_vehicles(settings.privacy, fed)
    if not isinstance(settings.secagg, SecAggSpec):
        return
    if not entry.weighted_sum:
        raise ValueError(f"secagg=secaggplus reveals only the weighted sum of the vehicles' updates, but "
                         f"strategy={name} needs each update; valid: {sums}")
    codec = settings.compression
    if not codec.secagg_compatible:
        valid = [name for name, spec in CODECS.items() if spec().secagg_compatible]
        raise ValueError(f"secagg=secaggplus cannot take compression={codec.name}: {codec.secagg_refusal}; "
                         f"valid with SecAgg+: {valid}")
    validate_secagg(settings.secagg, sampled=fed.vehicles_per_round, partition_sizes=partition_sizes)


def compose_server(settings: RunSettings, *, on_round: Callable[[dict[str, Any]], None],
                   evaluate_fn: EvaluateFn | None = None, initial_parameters: Parameters | None = None,
                   partition_sizes: Sequence[int] | None = None, start_round: int = 0,
                   statistics: Sequence[bool | str] | None = None) -> ServerParts:
    """Strategy -> central DP -> guard -> codec decoder -> recorder -> secure-sum decoding, and the
    matching fit workflow.

    ``start_round`` > 0 continues a run after that round (``fedseg/server/resume.py``): Flower's rounds are
    shifted so everything inside sees the run's own numbers. ``statistics`` tags the arrays that
    are BatchNorm statistics (``fedseg.training.statistics_mask``), pooled each round.
    """
    check_composition(settings, partition_sizes)
    fed = settings.federation
    codec = settings.compression
    recorder_ref: list[RoundRecorder] = []  # the guard and the decoder report to the recorder around them
    rejected: dict[int, list[dict[str, Any]]] = {}

    def on_reject(server_round: int, fields: dict[str, Any]) -> None:  # both report: keep both lists
        merged = rejected.setdefault(server_round, [])
        merged += fields["rejected"]
        recorder_ref[0].annotate(server_round, {**fields, "rejected": list(merged)})

    def fit_config(server_round: int) -> dict[str, Any]:
        config: dict[str, Any] = {"server_round": server_round, "local_epochs": fed.local_epochs,
                                  "lr": scheduled_lr(fed.lr, fed.lr_schedule, round_=server_round,
                                                     rounds=fed.rounds, final=fed.lr_final)}
        if codec.needs_seed:  # the server picks the round's positions; every vehicle reads them here
            config[SEED_KEY] = round_seed(settings.seed, server_round)
        return config

    strategy = base = build_strategy(
        settings.strategy.name, settings.strategy.options,
        fraction_fit=fed.fraction_fit, min_fit_clients=fed.min_fit_clients,
        min_available_clients=fed.num_clients,
        fraction_evaluate=0.0, min_evaluate_clients=0,  # evaluation is server-side, on the held-out set
        evaluate_fn=evaluate_fn, on_fit_config_fn=fit_config, initial_parameters=initial_parameters,
        fit_metrics_aggregation_fn=mean_train_loss)
    strategy = StatisticsMean(base, statistics)
    central = settings.privacy if isinstance(settings.privacy, CentralDPSpec) else None
    if central is not None:
        strategy = wrap_central_dp(strategy, central, fed)
    secagg = settings.secagg if isinstance(settings.secagg, SecAggSpec) else None
    if secagg is None:  # under SecAgg+ single updates are masked: the vehicles check their own range
        strategy = UpdateGuard(strategy, max_norm_ratio=fed.max_norm_ratio, on_reject=on_reject)
        if codec.sends_update:
            strategy = DecodingStrategy(strategy, codec, run_seed=settings.seed, on_reject=on_reject,
                                        clipping_norm=central.clipping_norm if central else None)
    recorder = RoundRecorder(strategy, on_round=on_round, min_replies=fed.min_fit_clients,
                             central_dp=central_accounting(central, fed) if central else None)
    recorder_ref.append(recorder)
    outer: Strategy = recorder
    fit = None
    if secagg is not None:
        outer = SecureSumStrategy(recorder, recorder, all_or_nothing=central is not None, codec=codec,
                                  run_seed=settings.seed)
        fit = _secagg_fit(secagg, settings, partition_sizes, start_round)
    if start_round:
        outer = RoundOffset(outer, start_round)
    return ServerParts(outer, recorder, fit, base, fed.round_timeout)


def _secagg_fit(spec: SecAggSpec, settings: RunSettings, partition_sizes: Sequence[int] | None,
                round_offset: int) -> SecAggPlusFit:
    sampled = settings.federation.vehicles_per_round
    max_weight = resolve_max_weight(spec, partition_sizes)
    grid_levels = spec.quantization_range or auto_quantization_range(sampled, spec.modulus_range)
    return SecAggPlusFit(spec, max_weight=max_weight, quantization_range=grid_levels, round_offset=round_offset)
