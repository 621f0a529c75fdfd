"""The privacy audit: its bounds by hand, both audits on a tiny model (audit <= accountant, power without DP)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from scipy import integrate, stats
from smoke_runs import run_sim
from torch.utils.data import TensorDataset

from fedseg._dp_compat import make_dp_compatible
from fedseg.audit import (
    GUESS_FRACTIONS,
    audit_dpsgd,
    gaussian_delta,
    gaussian_epsilon,
    guess_counts,
    one_run_epsilon,
    one_run_p_value,
    score_audit,
)
from fedseg.config import FederationSpec
from fedseg.models import build_model
from fedseg.privacy import CentralDPSpec, DPSpec, parse_privacy
from fedseg.server.audit import AUDIT_FILE, audit_central, write_audit
from fedseg.server.central_dp import calibrate_noise_multiplier

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# --- the bounds, by hand --------------------------------------------------------------------------

def test_one_run_bound_with_every_guess_right_and_no_delta() -> None:
    """10 of 10 right, delta 0: the p-value is q^10, q = e^eps / (1 + e^eps); at 95% q = 0.05^(1/10)."""
    q = 0.05 ** 0.1
    assert one_run_epsilon(100, 10, 10, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert one_run_p_value(100, 10, 10, 1.0, 0.0) == pytest.approx((math.e / (1 + math.e)) ** 10)


def test_one_run_p_value_adds_the_delta_term() -> None:
    """m=10, 2 of 2 right at eps 0 (q = 1/2): beta = 1/4; alpha = max(P[B=1]/1, P[B<=1]/2) = max(1/2, 3/8);
    p = 1/4 + 1/2 * delta * 2m = 0.25 + 0.5 * 0.01 * 20 = 0.35."""
    assert one_run_p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.35)
    assert one_run_epsilon(10, 2, 1, delta=0.0) == 0.0  # half right: nothing rejected


def test_score_audit_takes_the_best_guess_count_with_bonferroni() -> None:
    """Scores that rank the 50 included canaries first: every guess right at every k, the largest k wins,
    tested at 1 - 0.05 / len(grid)."""
    included = [True] * 50 + [False] * 50
    best = score_audit([100.0 - i for i in range(100)], included, delta=0.0)
    grid = guess_counts(100)
    assert grid == sorted({max(1, round(f * 100)) for f in GUESS_FRACTIONS}) and best["k"] == 50
    q = (0.05 / len(grid)) ** (1 / 100)
    assert best["epsilon"] == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert score_audit([0.0] * 100, included, delta=0.0)["epsilon"] == 0.0  # no signal: ties in random order


def test_gaussian_delta_is_the_gaussian_mechanism_for_equal_variances() -> None:
    """N(1, 1) against N(0, 1) (mu = 1): delta(eps) = Phi(1/2 - eps) - e^eps Phi(-1/2 - eps) (Balle and
    Wang 2018): at eps 0, 2 Phi(1/2) - 1 = 0.3829 (total variation); at eps 1, 0.30854 - e * 0.066807."""
    p, q = (1.0, 1.0), (0.0, 1.0)
    assert gaussian_delta(0.0, p, q) == pytest.approx(2 * stats.norm.cdf(0.5) - 1)
    at_one = stats.norm.cdf(-0.5) - math.e * stats.norm.cdf(-1.5)
    assert at_one == pytest.approx(0.30854 - math.e * 0.066807, abs=1e-5)
    assert gaussian_delta(1.0, p, q) == pytest.approx(at_one)
    assert gaussian_epsilon(p, q, at_one) == pytest.approx(1.0, abs=1e-5)
    assert gaussian_epsilon((0.0, 1.0), (0.0, 1.0), 1e-5) == 0.0


def test_gaussian_delta_with_unequal_variances_matches_integration() -> None:
    """N(0, 1.2^2) against N(0.3, 1): the hockey-stick integral max(0, p - e^eps q) done numerically."""
    p, q, eps = (0.0, 1.2), (0.3, 1.0), 0.5

    def excess(x: float) -> float:
        return max(0.0, stats.norm.pdf(x, *p) - math.exp(eps) * stats.norm.pdf(x, *q))

    numeric = integrate.quad(excess, -30, 30, limit=200, epsabs=1e-12)[0]
    assert gaussian_delta(eps, p, q) == pytest.approx(numeric, rel=1e-5)


# --- both audits on a tiny model --------------------------------------------------------------------

def _frames(n: int = 32, size: int = 16) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen),
                         torch.randint(0, 3, (n, size, size), generator=gen))


def test_per_frame_audit_is_below_the_accountant_and_has_power() -> None:
    """Steinke et al. on the tiny UNet, 32 frames, 20 steps at q = 1/4, 500 canaries: at epsilon 8 the
    audit's lower bound stays below Opacus' epsilon; with no noise it is clearly above 1. The caller's
    model never moves (the audit trains a copy)."""
    torch.manual_seed(0)
    model = make_dp_compatible(build_model("tiny", 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = {"batch_size": 8, "epochs": 5, "lr": 0.1, "canaries": 500, "seed": 0}
    private = audit_dpsgd(model, _frames(), DPSpec(target_epsilon=8.0, delta=1e-5), **run)  # type: ignore[arg-type]
    assert private.accountant_epsilon == pytest.approx(8.0, abs=0.05)
    assert private.accountant_epsilon is not None and 0 <= private.audit_epsilon <= private.accountant_epsilon
    plain = audit_dpsgd(model, _frames(), DPSpec(noise_multiplier=0.0, target_epsilon=None, delta=1e-5),
                        **run)  # type: ignore[arg-type]
    assert plain.accountant_epsilon is None and plain.audit_epsilon > 2.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vehicle_audit_is_below_the_accountant_and_has_power(caplog: pytest.LogCaptureFixture) -> None:
    """Andrew et al.'s canary vehicles through Flower's clipping and DP wrapper: 1000 vehicles, 100 a round,
    10 rounds, 500 canaries, 4000 coordinates. Epsilon 8 and 1, and 8 with adaptive clipping (the canaries
    at each round's norm, their clipped bits counted): the estimate below the accountant's; no noise: far
    above 1."""
    caplog.set_level(logging.WARNING)
    vehicles, sampled, rounds = 1000, 100, 10
    fed = FederationSpec(num_clients=vehicles, fraction_fit=sampled / vehicles, min_fit_clients=sampled,
                         rounds=rounds)
    shapes = [(40, 50), (2000,)]
    for target, clipping in ((8.0, "fixed"), (1.0, "fixed"), (8.0, "adaptive")):
        noise = calibrate_noise_multiplier(target, vehicles=vehicles, sampled=sampled, rounds=rounds, delta=1e-5)
        spec = CentralDPSpec(noise_multiplier=noise, clipping=clipping, clipping_norm=0.1)  # type: ignore[arg-type]
        result = audit_central(spec, fed, shapes, rounds=rounds, canaries=500, seed=0)
        assert result.accountant_epsilon == pytest.approx(target, rel=1e-2)
        assert result.accountant_epsilon is not None and 0 <= result.audit_epsilon <= result.accountant_epsilon
    plain = audit_central(CentralDPSpec(noise_multiplier=0.0), fed, shapes, rounds=rounds, canaries=500, seed=0)
    assert plain.accountant_epsilon is None and plain.audit_epsilon > 2.0


def test_audit_key_parses_and_the_record_is_written(tmp_path: Path) -> None:
    assert parse_privacy({"name": "central", "audit": True}).audit
    assert not parse_privacy({"name": "dpsgd", "target_epsilon": 8.0}).audit
    assert parse_privacy({"name": "none", "audit": True}).audit
    fed = FederationSpec(num_clients=8, fraction_fit=0.5, min_fit_clients=4, rounds=2)
    result = audit_central(CentralDPSpec(noise_multiplier=1.0), fed, [(50,)], rounds=2, canaries=4, nulls=20)
    record = write_audit(tmp_path, result, run_epsilon=result.accountant_epsilon)
    assert json.loads((tmp_path / AUDIT_FILE).read_text()) == record
    assert {"method", "canaries", "confidence", "accountant_epsilon", "audit_epsilon"} <= record.keys()


@pytest.mark.e2e
@pytest.mark.parametrize("privacy", ["central", "dpsgd", "none"])
def test_a_run_with_audit_writes_the_audit_and_its_epsilon(tmp_path: Path, privacy: str) -> None:
    proc, out = run_sim(tmp_path, privacy, f"privacy={privacy}", "privacy.audit=true",
                        "federation.num_clients=4", "federation.min_fit_clients=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = json.loads((out / AUDIT_FILE).read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit_epsilon"] == audit["audit_epsilon"] is not None and audit["separate_audit_run"]
    if privacy == "none":  # no accountant; the run's model is the BatchNorm one, the audit's a GroupNorm copy
        assert audit["accountant_epsilon"] is None and audit["audit_epsilon"] > 1
    else:
        assert audit["audit_epsilon"] <= audit["accountant_epsilon"]
        assert audit["accountant_epsilon"] == pytest.approx(audit["run_accountant_epsilon"], rel=1e-3)
