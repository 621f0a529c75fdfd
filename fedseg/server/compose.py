"""The server side of a run, composed in one place and one order. The server app, tests and benchmarks
all build it here.

The strategy chain, from the inside out (``repr`` of the composed strategy lists the same layers,
outermost first; ``tests/test_compose.py`` checks this list and docs/ARCHITECTURE.md against it):

1. ``FedAvg``, or the run's other strategy from :data:`~fedseg.server.strategies.STRATEGIES` (FedProx,
   FedAvgM, FedAdam, FedMedian, FedTrimmedAvg, Krum): Flower's aggregation, evaluating server-side;
2. :class:`~fedseg.server.noised_mean.PlainMean` (``privacy=central`` with FedAvgM or FedAdam): the
   strategy only averages here, with FedAvg's arithmetic; its optimizer steps outside the noise (7);
3. :class:`~fedseg.server.statistics_mean.StatisticsMean`: BatchNorm statistics leave each round as
   the statistics of all the vehicles' frames together (the variance that of the mixture); no server
   optimizer steps them, and Flower's in-place mean no longer zeroes integer counters;
4. :class:`~fedseg.server.central_dp.EqualWeights` (``privacy=central``): every vehicle weighs the
   same, and a round missing a sampled vehicle is discarded;
5. ``DifferentialPrivacyClientSideFixedClipping`` (``privacy=central``; ``...AdaptiveClipping`` under
   ``privacy.clipping=adaptive``): Flower's wrapper, noise on the mean of the updates the vehicles
   clipped with ``fixedclipping_mod`` (``adaptiveclipping_mod``);
6. :class:`~fedseg.server.noised_mean.TrainedOnly` (``privacy=central``, ``privacy.trainable`` other
   than ``all``): the wrapper sees and noises only the trained arrays; the frozen ones stay the global's;
7. :class:`~fedseg.server.noised_mean.ServerStep` (``privacy=central`` with FedAvgM or FedAdam): the
   strategy's server optimizer steps on the noised mean;
8. :class:`~fedseg.server.guard.UpdateGuard` (without SecAgg+): drops non-finite, misshapen and
   outsized updates before anything averages them;
9. :class:`~fedseg.server.codecs.DecodingStrategy` (without SecAgg+, ``compression`` other than
   ``none``): each vehicle's encoded update back into weights (under central DP clipped again to the
   clipping norm) before the guard, the DP wrapper and the strategy see it;
10. :class:`~fedseg.server.recorder.RoundRecorder`: the run-output contract (one row per round, with
   what a checkpoint needs to resume); stops the run when fewer than ``min_fit_clients`` vehicles
   answer a round or every update is rejected; outside the decoder, so its ``bytes_up`` are the
   encoded bytes as they travelled;
11. :class:`~fedseg.server.secagg.SecureSumStrategy` (``secagg=secaggplus``): the vehicles' masked
   deltas become weights again before anything inside sees them: it decodes the one unmasked sum
   with the run's codec (SecAgg+ admits only codecs that decode linearly) and adds the global weights;
12. :class:`~fedseg.server.resume.RoundOffset` (``resume=``): Flower counts rounds from 1 again in a
   resumed process; everything inside sees the run's own round numbers.

One :class:`~fedseg.server.notes.RoundNotes` is made first and handed to every part that reports on
a round: the guard and the decoder note rejected updates, the secure sum what it decoded, the SecAgg+
fit round the bytes the protocol carried; the recorder merges the notes into the round's row. One
:class:`~fedseg.server.replies.ReplyRules` (the most examples a reply may weigh:
``federation.max_examples``, else the largest known partition, else equal weights) is handed to the
recorder, which screens every reply before reading it, and to the secure sum, which applies a sum only
if every reply in it passes and the sum lies within the run's :class:`~fedseg.secagg.FixedPoint` range.

The fit config carries the round's client lr (``federation.lr_schedule``) and the round's shared
codec seed (``randk``: the server picks it, so positions never travel). The fit workflow is Flower's
default, or :class:`~fedseg.server.secagg.SecAggPlusFit` under SecAgg+ (masked vectors packed to the
modulus' width on the wire). Why the legacy ``LegacyContext``/``DefaultWorkflow`` path: Flower
1.42's SecAgg+ exists only there.
"""

from __future__ import annotations

import logging
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
from fedseg.secagg import FixedPoint, SecAggSpec, auto_quantization_range, resolve_max_weight, validate_secagg
from fedseg.server.central_dp import (
    central_accounting,
    sampled_vehicles,
    update_noise_multiplier,
    wrap_central_dp,
)
from fedseg.server.codecs import DecodingStrategy
from fedseg.server.fleet import SAMPLING
from fedseg.server.grids import PackingGrid, PollingGrid, TimeoutGrid
from fedseg.server.guard import UpdateGuard
from fedseg.server.noised_mean import PlainMean, ServerStep, TrainedOnly
from fedseg.server.notes import RoundNotes
from fedseg.server.pool import VehicleGrid
from fedseg.server.recorder import OnRound, RoundRecorder, mean_train_loss
from fedseg.server.replies import ReplyRules, example_cap
from fedseg.server.resume import RoundOffset
from fedseg.server.secagg import SecAggPlusFit, SecureSumStrategy
from fedseg.server.statistics_mean import StatisticsMean
from fedseg.server.strategies import STRATEGIES, FedExP, build_strategy, strategy_entry
from fedseg.settings import RunSettings
from fedseg.training import scheduled_lr

log = logging.getLogger("fedseg")
EvaluateFn = Callable[[int, list, dict], tuple[float, dict] | None]


@dataclass
class ServerParts:
    """The composed server: the outermost strategy, the recorder inside it, and the fit workflow."""

    strategy: Strategy
    recorder: RoundRecorder
    fit_workflow: SecAggPlusFit | None
    base: Strategy  # Flower's own strategy at the bottom of the chain (its state is what resumes)
    round_timeout: float | None = None

    def run(self, grid: Grid, context: Context, rounds: int, *, client_manager: ClientManager | None = None,
            pooled_fleet: int | None = None, seed: int | None = None) -> None:
        """Run ``rounds`` rounds on ``grid`` (Flower's legacy workflow: where SecAgg+ lives); a round
        waits at most ``round_timeout`` seconds for its vehicles; ``client_manager`` (e.g. the fleet's,
        ``fedseg/server/fleet.py``) decides how long to wait for them to be available and samples them.
        ``pooled_fleet``: that many vehicles ride ``grid``'s simulation nodes (``fedseg/server/pool.py``).
        ``seed`` (a run from its start; a resumed run restores the state instead) seeds the fleet manager's
        sampling (:data:`~fedseg.server.fleet.SAMPLING`): the same seed samples the same vehicles of a
        pooled fleet (ids ``0..n-1``) in every run."""
        if seed is not None:
            SAMPLING.seed(seed)
        legacy = LegacyContext(context=context, strategy=self.strategy, client_manager=client_manager,
                               config=ServerConfig(num_rounds=rounds, round_timeout=self.round_timeout))
        nodes: Grid = PollingGrid(PackingGrid(grid))
        if pooled_fleet is not None:  # below the meter: it counts by vehicle, as it counts by node otherwise
            nodes = VehicleGrid(nodes, pooled_fleet)
        grid = TimeoutGrid(nodes, self.round_timeout)  # metered as sent: arrays, not packs
        DefaultWorkflow(fit_workflow=self.fit_workflow)(grid, legacy)


def check_composition(settings: RunSettings, partition_sizes: Sequence[int] | None = None) -> None:
    """Every check of how the features combine that can fail before training (a one-line ValueError)."""
    fed = settings.federation
    if fed.min_fit_clients > fed.num_clients:
        raise ValueError(f"federation.min_fit_clients={fed.min_fit_clients} exceeds "
                         f"federation.num_clients={fed.num_clients}: no round could start")
    if partition_sizes:
        settings.privacy.check_fleet(partition_sizes, batch_size=fed.local_batch_size, rounds=fed.rounds,
                                     local_epochs=fed.local_epochs)
    entry, name = strategy_entry(settings.strategy.name), settings.strategy.name
    sums = [key for key, e in STRATEGIES.items() if not e.secagg_refusal]
    if entry.vehicles_per_round == 1 and fed.local_norm != "none":  # cyclic passes one vehicle's model on
        raise ValueError(f"strategy={name} hands one vehicle's model to the next, but federation.local_norm="
                         f"{fed.local_norm} keeps each vehicle's BatchNorm: the global model would carry the last "
                         "vehicle's alone (the server evaluates with it); valid: federation.local_norm=none")
    if isinstance(settings.privacy, CentralDPSpec):
        if not (entry.noise_on_mean or entry.server_optimizer):
            means = [key for key, e in STRATEGIES.items() if e.noise_on_mean or e.server_optimizer]
            raise ValueError(f"privacy=central calibrates its noise to a mean of clipped updates, but "
                             f"strategy={name} {entry.why_not_mean}; valid: {means}")
        update_noise_multiplier(settings.privacy, sampled_vehicles(settings.privacy, fed))
        _check_adaptive(settings)
    if not isinstance(settings.secagg, SecAggSpec):
        return
    if entry.secagg_refusal:
        raise ValueError(f"secagg=secaggplus reveals only the weighted sum of the vehicles' updates, but "
                         f"strategy={name} {entry.secagg_refusal}; valid: {sums}")
    codec = settings.compression
    if not codec.secagg_compatible:
        valid = [name for name, spec in CODECS.items() if spec().secagg_compatible]
        raise ValueError(f"secagg=secaggplus cannot take compression={codec.name}: {codec.secagg_refusal}; "
                         f"valid with SecAgg+: {valid}")
    validate_secagg(settings.secagg, sampled=fed.vehicles_per_round, partition_sizes=partition_sizes)


def compose_server(settings: RunSettings, *, on_round: OnRound,
                   evaluate_fn: EvaluateFn | None = None, initial_parameters: Parameters | None = None,
                   partition_sizes: Sequence[int] | None = None, start_round: int = 0,
                   statistics: Sequence[bool | str] | None = None, trained: Sequence[bool] | None = None,
                   lr_dropped: Callable[[], int] | None = None) -> ServerParts:
    """The strategy chain of the module docstring and the matching fit workflow; ``on_round(row, resume)``
    gets each round's row and what its checkpoint needs to continue the run.

    ``start_round`` > 0 continues a run after that round (``fedseg/server/resume.py``): Flower's rounds are
    shifted so everything inside sees the run's own numbers. ``statistics`` tags the arrays that
    are BatchNorm statistics (``fedseg.training.statistics_mask``), pooled each round; ``trained`` the
    arrays ``privacy.trainable`` trains (``fedseg.models.trained_mask``), needed under central DP when
    that is not ``all``. ``lr_dropped`` says how many times ``federation.lr_schedule=plateau`` has dropped
    the lr before the round being configured (the reporter's :meth:`~fedseg.reporting.RunReporter.lr_dropped`).
    """
    check_composition(settings, partition_sizes)
    fed = settings.federation
    codec = settings.compression
    notes = RoundNotes()  # what the wrappers learn about a round, for its row

    def fit_config(server_round: int) -> dict[str, Any]:
        lr = scheduled_lr(fed.lr, fed.lr_schedule, round_=server_round, rounds=fed.rounds, final=fed.lr_final,
                          dropped=lr_dropped() if lr_dropped else 0)
        notes.annotate(server_round, {"lr": lr})  # the row says what the vehicles trained the round with
        config: dict[str, Any] = {"server_round": server_round, "local_epochs": fed.local_epochs, "lr": lr}
        if codec.needs_seed:  # the server picks the round's positions; every vehicle reads them here
            config[SEED_KEY] = round_seed(settings.seed, server_round)
        return config

    base = build_strategy(
        settings.strategy.name, settings.strategy.options,
        fraction_fit=fed.fraction_fit, min_fit_clients=fed.min_fit_clients,
        min_available_clients=fed.num_clients,
        fraction_evaluate=0.0, min_evaluate_clients=0,  # evaluation is server-side, on the held-out set
        evaluate_fn=evaluate_fn, on_fit_config_fn=fit_config, initial_parameters=initial_parameters,
        fit_metrics_aggregation_fn=mean_train_loss)
    if isinstance(base, FedExP):  # its step's norms are over trained weights, not BatchNorm statistics
        base.statistics = list(statistics or [])
    central = settings.privacy if isinstance(settings.privacy, CentralDPSpec) else None
    steps_after_noise = central is not None and strategy_entry(settings.strategy.name).server_optimizer
    part = _trained_part(central, trained)
    if part is not None and statistics is not None:  # the layers inside TrainedOnly see the trained arrays
        statistics = [tag for tag, keep in zip(statistics, part, strict=True) if keep]
    strategy: Strategy = StatisticsMean(PlainMean(base) if steps_after_noise else base, statistics)
    if central is not None:
        strategy = wrap_central_dp(strategy, central, fed)
        if part is not None:
            strategy = TrainedOnly(strategy, part)
        if steps_after_noise:
            strategy = ServerStep(strategy, base)
    secagg = settings.secagg if isinstance(settings.secagg, SecAggSpec) else None
    fixed_point = _fixed_point(secagg, settings, partition_sizes) if secagg is not None else None
    replies = ReplyRules(example_cap(fed.max_examples, partition_sizes,
                                     fixed_point.max_weight if fixed_point else None))
    if replies.max_examples is None:
        log.warning("fedseg: federation.max_examples is not set and the server does not know the vehicles' "
                    "partition sizes: every vehicle weighs the same; set it to weight vehicles by frames")
    if secagg is None:  # under SecAgg+ single updates are masked: the vehicles check their own range
        strategy = UpdateGuard(strategy, notes, max_norm_ratio=fed.max_norm_ratio)
        if codec.sends_update:
            strategy = DecodingStrategy(strategy, notes, codec, run_seed=settings.seed,
                                        clipping_norm=central.clipping_norm if central else None)
    alone = strategy_entry(settings.strategy.name).vehicles_per_round  # cyclic: one vehicle a round
    recorder = RoundRecorder(strategy, notes, on_round=on_round, min_replies=min(fed.min_fit_clients, alone or
                                                                                   fed.min_fit_clients),
                             central_dp=central_accounting(central, fed) if central else None, replies=replies)
    outer: Strategy = recorder
    fit = None
    if secagg is not None and fixed_point is not None:
        outer = SecureSumStrategy(recorder, notes, all_or_nothing=central is not None, codec=codec,
                                  run_seed=settings.seed, replies=replies, fixed_point=fixed_point)
        fit = SecAggPlusFit(secagg, notes, max_weight=fixed_point.max_weight,
                            quantization_range=fixed_point.quantization_range, round_offset=start_round)
    if start_round:
        outer = RoundOffset(outer, start_round)
    return ServerParts(outer, recorder, fit, base, fed.round_timeout)


def _trained_part(central: CentralDPSpec | None, trained: Sequence[bool] | None) -> Sequence[bool] | None:
    """The arrays central DP noises when ``privacy.trainable`` is a part; None: every array."""
    if central is None or central.trainable == "all":
        return None
    if trained is None:
        raise ValueError(f"privacy.trainable={central.trainable}: the server needs the model's trained "
                         "arrays (compose_server(trained=fedseg.models.trained_mask(...)))")
    return trained


def _check_adaptive(settings: RunSettings) -> None:
    """Adaptive clipping's norm changes every round and each vehicle reports its clipped bit in clear."""
    if not isinstance(settings.privacy, CentralDPSpec) or settings.privacy.clipping != "adaptive":
        return
    secure = isinstance(settings.secagg, SecAggSpec)
    if secure:
        raise ValueError("privacy.clipping=adaptive sends each vehicle's clipped bit in clear, which "
                         "secagg=secaggplus would not hide; valid with SecAgg+: privacy.clipping=fixed")
    if settings.compression.sends_update:
        raise ValueError(f"privacy.clipping=adaptive cannot take compression={settings.compression.name}: the "
                         "server re-clips decoded updates to a fixed norm; valid: compression=none")


def _fixed_point(spec: SecAggSpec, settings: RunSettings, partition_sizes: Sequence[int] | None) -> FixedPoint:
    """The run's SecAgg+ fixed point: what the vehicles quantize with and the server checks the sum by."""
    sampled = settings.federation.vehicles_per_round
    grid_levels = spec.quantization_range or auto_quantization_range(sampled, spec.modulus_range)
    return FixedPoint(clipping_range=float(spec.clipping_range), quantization_range=grid_levels,
                      max_weight=resolve_max_weight(spec, partition_sizes))
