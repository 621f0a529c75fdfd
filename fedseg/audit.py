"""Privacy audits: what a trained model gives away about its canaries, beside the accountant's epsilon.

An accountant's epsilon is a proof about the mechanism as written; an audit measures the mechanism as
it ran (clipping, noise, sampling), so a bug that leaks more than the proof allows shows. One method
per privacy unit:

* **a frame** (``privacy=dpsgd``): the one-run audit of Steinke, Nasr and Jagielski ("Privacy Auditing
  with One (1) Training Run", NeurIPS 2023), white-box. ``m`` gradient canaries, each a fixed random
  direction ``u`` of norm ``max_grad_norm`` C, each in the run with probability 1/2 (decided once,
  before training). An included canary is one more "frame": Poisson-sampled into each step at the
  frames' sample rate q, its gradient ``-C u`` added to the step's sum of clipped gradients before
  Opacus adds the noise (:class:`GradientCanaries`). Score: ``<theta_final - theta_init, u>``. The
  auditor guesses "in" for the k highest scores and "out" for the k lowest; :func:`one_run_p_value`
  is their bound on the chance of v or more right among r guesses if the run is (epsilon, delta)-DP,
  and :func:`one_run_epsilon` the largest epsilon it rejects at the stated confidence: a **lower
  bound** (with that confidence the run is not (eps', delta)-DP for any eps' below it). k is tried on
  a fixed grid with a Bonferroni correction, so taking the best k keeps the confidence.
* **a vehicle** (``privacy=central``): canary vehicles in the manner of Andrew, Kairouz, Oh, Oprea,
  McMahan and Suriyakumar ("One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024):
  a few vehicles whose update is a fixed random unit direction scaled to the clipping norm; the cosine
  of each with the final model delta (final minus initial global model) against cosines of fresh
  random directions (the null). Both fitted as Gaussians; :func:`gaussian_epsilon` is the epsilon at
  delta of the Gaussian mechanism that tells the two apart: an **estimate**, not a bound
  (``fedseg/server/audit.py`` runs the canary vehicles through Flower's DP wrapper).

The audit never writes the run's accountant: that epsilon is Opacus' or Flower's own.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from scipy import optimize, special, stats
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedseg.models import set_trainable
from fedseg.training import steps_per_epoch, train

CONFIDENCE = 0.95  # of the one-run lower bound
# Guesses per side (k "in", k "out") as fractions of the canaries: Steinke et al. report the best k; a
# fixed grid with a Bonferroni correction (each k tested at (1 - confidence) / len(grid)) keeps that honest.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
CACHED_CANARY_FLOATS = 50_000_000  # 200 MB: canary directions held in memory up to this size


@dataclass(frozen=True)
class AuditResult:
    """One audit: its method, canaries, confidence, the accountant's epsilon and the audit's."""

    method: str
    canaries: int
    delta: float
    accountant_epsilon: float | None  # None: no accountant (no noise: unbounded)
    audit_epsilon: float
    confidence: float | None = None  # None: an estimate (Andrew et al.), not a bound
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``privacy_audit.json`` record (infinite epsilon written as None)."""
        record = dataclasses.asdict(self)
        for key in ("accountant_epsilon", "audit_epsilon"):
            value = record[key]
            record[key] = None if value is None or math.isinf(value) else round(float(value), 4)
        return record


# --- Steinke, Nasr and Jagielski: the one-run lower bound ------------------------------------------

def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Chance of ``correct`` or more right among ``guesses`` if the run is (epsilon, delta)-DP.

    Steinke et al.'s bound for (epsilon, delta)-DP, as their paper's reference code computes it:
    ``P[Binomial(r, q) >= v] + 2 m delta alpha`` with ``q = e^eps / (1 + e^eps)`` (eps-DP randomized
    response's accuracy) and ``alpha`` the largest ``P[v > Binomial(r, q) >= v - i] / i`` over ``i = 1..v``.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    alpha = float(np.max((stats.binom.sf(correct - i - 1, guesses, q) - beta) / i))
    return min(beta + alpha * delta * 2 * canaries, 1.0)


def one_run_epsilon(canaries: int, guesses: int, correct: int, *, delta: float,
                    confidence: float = CONFIDENCE) -> float:
    """Lower bound on epsilon: the largest epsilon :func:`one_run_p_value` rejects at ``confidence``; 0: none."""
    significance = 1.0 - confidence

    def rejected(epsilon: float) -> float:  # > 0 while (epsilon, delta)-DP is rejected
        return significance - one_run_p_value(canaries, guesses, correct, epsilon, delta)

    if rejected(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high) > 0:  # the p-value tends to 1 as epsilon grows: this ends
        low, high = high, 2 * high
    return float(optimize.brentq(rejected, low, high, xtol=1e-6))


def guess_counts(canaries: int) -> list[int]:
    """The grid of k (guesses per side) for ``canaries`` canaries: :data:`GUESS_FRACTIONS`, at least 1."""
    return sorted({min(max(1, round(f * canaries)), canaries // 2) for f in GUESS_FRACTIONS} - {0})


def score_audit(scores: Sequence[float], included: Sequence[bool] | np.ndarray, *, delta: float,
                confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Steinke et al.'s guesser on canary ``scores``: "in" for the k highest, "out" for the k lowest,
    the best k of :func:`guess_counts` (Bonferroni over the grid). Returns epsilon, k, guesses, correct."""
    score, truth = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    # Ties broken at random: in canary order they would follow who was included (canaries are drawn in order)
    order = np.lexsort((np.random.default_rng(0).random(len(score)), -score))
    grid = guess_counts(len(score))
    per_test = 1.0 - (1.0 - confidence) / len(grid)
    best: dict[str, Any] = {"epsilon": 0.0, "k": 0, "guesses": 0, "correct": 0}
    for k in grid:
        correct = int(truth[order[:k]].sum() + (~truth[order[-k:]]).sum())
        epsilon = one_run_epsilon(len(score), 2 * k, correct, delta=delta, confidence=per_test)
        if epsilon > best["epsilon"]:
            best = {"epsilon": epsilon, "k": k, "guesses": 2 * k, "correct": correct}
    return best | {"grid": grid}


# --- Andrew et al.: the epsilon of two fitted Gaussians ----------------------------------------------

Gaussian = tuple[float, float]  # (mean, standard deviation)


def _log_mass(low: float, high: float, g: Gaussian) -> float:
    """log P[low < X < high] for X ~ g, accurate far in either tail."""
    a, b = (low - g[0]) / g[1], (high - g[0]) / g[1]
    if a >= b:
        return -math.inf
    if a > 0:  # right tail: survival functions
        big, small = float(stats.norm.logsf(a)), float(stats.norm.logsf(b))
    else:
        big, small = float(stats.norm.logcdf(b)), float(stats.norm.logcdf(a))
    return -math.inf if small >= big else big + math.log1p(-math.exp(small - big))


def _loss_region(epsilon: float, p: Gaussian, q: Gaussian) -> list[tuple[float, float]]:
    """Where log p(x) - log q(x) > epsilon: a quadratic A x^2 + B x + C > 0, as intervals."""
    a = 1 / (2 * q[1] ** 2) - 1 / (2 * p[1] ** 2)
    b = p[0] / p[1] ** 2 - q[0] / q[1] ** 2
    c = q[0] ** 2 / (2 * q[1] ** 2) - p[0] ** 2 / (2 * p[1] ** 2) + math.log(q[1] / p[1]) - epsilon
    inf = math.inf
    if abs(a) < 1e-12 * max(1 / p[1] ** 2, 1 / q[1] ** 2):  # equal variances: a half-line
        if b == 0:
            return [(-inf, inf)] if c > 0 else []
        return [(-c / b, inf)] if b > 0 else [(-inf, -c / b)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-inf, inf)] if a > 0 else []
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    return [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]


def gaussian_delta(epsilon: float, p: Gaussian, q: Gaussian) -> float:
    """The smallest delta with P(S) <= e^eps Q(S) + delta for every S (p's hockey-stick divergence to q)."""
    region = _loss_region(epsilon, p, q)
    if not region:
        return 0.0
    log_p = float(special.logsumexp([_log_mass(lo, hi, p) for lo, hi in region]))
    log_q = float(special.logsumexp([_log_mass(lo, hi, q) for lo, hi in region]))
    if log_p == -math.inf:
        return 0.0
    return max(0.0, math.exp(log_p) * -math.expm1(min(epsilon + log_q - log_p, 0.0)))


def gaussian_epsilon(p: Gaussian, q: Gaussian, delta: float) -> float:
    """Smallest epsilon at which the pair is (epsilon, delta)-indistinguishable, both ways (inf: beyond 1e4)."""

    def excess(epsilon: float) -> float:
        return max(gaussian_delta(epsilon, p, q), gaussian_delta(epsilon, q, p)) - delta

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        if high > 1e4:
            return math.inf
        low, high = high, 2 * high
    return float(optimize.brentq(excess, low, high, xtol=1e-6))


def cosine_audit(canary_cosines: Sequence[float], null_cosines: Sequence[float], *, delta: float) -> dict[str, Any]:
    """Andrew et al.'s estimate: Gaussians fitted to the canaries' and the null's cosines, their epsilon."""
    seen, null = np.asarray(canary_cosines, dtype=float), np.asarray(null_cosines, dtype=float)
    fit_seen = (float(seen.mean()), float(seen.std(ddof=1)))
    fit_null = (float(null.mean()), float(null.std(ddof=1)))
    return {"epsilon": gaussian_epsilon(fit_seen, fit_null, delta), "canary_fit": list(fit_seen),
            "null_fit": list(fit_null)}


# --- canaries ----------------------------------------------------------------------------------------

def canary_direction(seed: int, index: int, dim: int) -> torch.Tensor:
    """Canary ``index``'s fixed random unit direction in ``dim`` dimensions (regenerated, never stored)."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(state))
    return vector / vector.norm()


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float vector (a copy)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class GradientCanaries:
    """Steinke et al.'s white-box canaries on one Opacus ``DPOptimizer``: before each noising, every
    included canary joins the step with probability ``sample_rate`` (as a frame would) and its gradient
    ``-clip * u`` is added to the sum of clipped gradients; Opacus then adds the noise and scales."""

    def __init__(self, count: int, *, dim: int, clip: float, sample_rate: float, seed: int) -> None:
        self.count, self.dim, self.clip, self.sample_rate, self.seed = count, dim, clip, sample_rate, seed
        self.rng = np.random.default_rng([seed, 1])
        self.included = self.rng.random(count) < 0.5  # once per run, before training
        self.joined = np.zeros(count, dtype=int)  # steps each canary joined (for the record)
        # Held as one matrix where it is small (a tiny model), else regenerated from the seed when needed
        self.matrix = (torch.stack([canary_direction(seed, i, dim) for i in range(count)])
                       if count * dim <= CACHED_CANARY_FLOATS else None)

    def direction(self, index: int) -> torch.Tensor:
        return self.matrix[index] if self.matrix is not None else canary_direction(self.seed, index, self.dim)

    def install(self, optimizer: Any) -> None:
        """Wrap ``optimizer.add_noise`` (Opacus: after clipping and accumulation, before the noise)."""
        add_noise = optimizer.add_noise

        def add_noise_with_canaries() -> None:
            sampled = np.flatnonzero(self.included & (self.rng.random(self.count) < self.sample_rate))
            if len(sampled):
                self.joined[sampled] += 1
                total = torch.stack([self.direction(int(i)) for i in sampled]).sum(dim=0)
                offset = 0
                for p in optimizer.params:
                    part = total[offset:offset + p.numel()].view_as(p.summed_grad)
                    p.summed_grad.add_(part.to(p.summed_grad), alpha=-self.clip)  # descent moves along +u
                    offset += p.numel()
            add_noise()

        optimizer.add_noise = add_noise_with_canaries

    def scores(self, moved: torch.Tensor) -> list[float]:
        """Each canary's score: the model's move along its direction."""
        if self.matrix is not None:
            return [float(v) for v in self.matrix @ moved]
        return [float(moved @ self.direction(i)) for i in range(self.count)]


def audit_dpsgd(model: nn.Module, dataset: Dataset, spec: Any, *, batch_size: int, epochs: int, lr: float,
                canaries: int = 1000, seed: int = 0, confidence: float = CONFIDENCE) -> AuditResult:
    """Steinke et al.'s one-run audit of per-frame DP-SGD: trains a **copy** of ``model`` on ``dataset``
    (one vehicle's frames) for ``epochs`` epochs with ``spec``'s mechanism (a
    :class:`~fedseg.privacy.DPSpec`; noise, clipping, sampling, accountant as a vehicle of that size
    would have them) plus ``canaries`` gradient canaries. ``model`` itself is never touched.

    Plain SGD (no momentum): the score reads the canaries' sum exactly (Adam's per-coordinate scaling
    would blur it, a weaker audit; the guarantee is the same for any optimizer). Opacus' ``hooks``
    engine: every engine clips the same (tests/test_privacy.py), and it keeps the clipped sum apart.
    """
    from fedseg.dpsgd import ClientPrivacy  # Opacus: only where a DP-SGD audit runs

    spec = dataclasses.replace(spec, grad_sample_mode="hooks", max_epsilon=None, secure_rng=False, state_dir=None)
    copy_ = copy.deepcopy(model)  # the audit's model: canaries never reach the caller's
    set_trainable(copy_, spec.trainable)
    planned = epochs * steps_per_epoch(len(dataset), spec.logical_batch(batch_size))  # type: ignore[arg-type]
    privacy = ClientPrivacy(spec, num_examples=len(dataset), batch_size=batch_size,  # type: ignore[arg-type]
                            planned_steps=planned)
    optimizer = torch.optim.SGD([p for p in copy_.parameters() if p.requires_grad], lr=lr)
    dp_model, dp_optimizer, dp_loader, criterion = privacy.attach(
        copy_, optimizer, DataLoader(dataset, batch_size=batch_size), seed=seed, epochs=epochs)
    params = list(cast(Any, dp_optimizer).params)  # Opacus' DPOptimizer: the parameters it trains
    start = flat(params)
    gradient = GradientCanaries(canaries, dim=start.numel(), clip=spec.max_grad_norm,
                                sample_rate=privacy.sample_rate, seed=seed)
    gradient.install(dp_optimizer)
    train(dp_model, dp_loader, dp_optimizer, epochs=epochs, criterion=criterion, on_empty=privacy.noise_only_step)
    privacy.commit()
    best = score_audit(gradient.scores(flat(params) - start), gradient.included, delta=privacy.delta,
                       confidence=confidence)
    accountant = privacy.epsilon() if privacy.noise_multiplier > 0 else None
    return AuditResult(
        method="one-run (Steinke, Nasr, Jagielski 2023): white-box gradient canaries", canaries=canaries,
        delta=privacy.delta, accountant_epsilon=accountant, audit_epsilon=best.pop("epsilon"),
        confidence=confidence,
        details=best | {"included": int(gradient.included.sum()), "steps": planned,
                        "sample_rate": privacy.sample_rate, "noise_multiplier": privacy.noise_multiplier,
                        "max_grad_norm": spec.max_grad_norm, "dimensions": start.numel(),
                        "mean_joins_included": float(gradient.joined[gradient.included].mean())})
