"""Backbone selection on hand-made measurements: budgets, tie-breaks, Pareto front, none-fits error."""

from __future__ import annotations

import pytest

from fedseg.search.hardware import HardwareBudget
from fedseg.search.select import (
    Candidate,
    NoBackboneFits,
    fits,
    pareto_front,
    select_backbone,
)

BUDGET = HardwareBudget(name="edge", latency_ms=100.0, memory_mb=500.0, model_mb=50.0)


def cand(name: str, miou: float | None, latency: float | None, *, p95: float | None = None,
         memory: float | None = 100.0, model_mb: float | None = 10.0, params: int = 1_000_000,
         train_memory: float | None = None) -> Candidate:
    return Candidate(name=name, miou=miou, latency_ms=latency,
                     latency_p95_ms=p95 if p95 is not None else latency, memory_mb=memory,
                     model_mb=model_mb, params=params, train_memory_mb=train_memory)


def test_over_budget_candidate_never_chosen_even_if_most_accurate() -> None:
    # Prepare: the most accurate candidate misses each limit in turn.
    ok = cand("ok", 0.40, 80.0)
    for over in (cand("big", 0.90, 80.0, p95=101.0),        # p95 over 100 ms (median fits)
                 cand("big", 0.90, 80.0, memory=500.1),
                 cand("big", 0.90, 80.0, model_mb=51.0),
                 cand("big", 0.90, 80.0, memory=None)):      # missing measurement never fits
        # Execute
        choice = select_backbone([over, ok], BUDGET)
        # Assert
        assert choice.selected.name == "ok"
        assert [c.name for c in choice.ranked] == ["ok"]
        assert "big" in choice.rejected


def test_fits_reports_every_missed_limit() -> None:
    ok, reasons = fits(cand("x", 0.5, 90.0, p95=120.0, memory=600.0), BUDGET)
    assert not ok
    assert reasons == ["latency_p95_ms 120.0 > latency_ms 100", "memory_mb 600.0 > memory_mb 500"]
    assert fits(cand("y", 0.5, 100.0, memory=500.0, model_mb=50.0), BUDGET) == (True, [])  # limits inclusive


def test_train_memory_limit_checked_only_when_set() -> None:
    heavy = cand("heavy", 0.5, 50.0, train_memory=4000.0)
    assert fits(heavy, BUDGET)[0]
    strict = HardwareBudget(name="strict", latency_ms=100.0, train_memory_mb=2000.0)
    assert fits(heavy, strict) == (False, ["train_memory_mb 4000.0 > train_memory_mb 2000"])


def test_ties_broken_by_latency_then_params_then_name() -> None:
    # mIoU equal at 3 decimals (0.5004 and 0.4996 both print 0.500) is a tie.
    slow = cand("slow", 0.5004, 90.0)
    fast_big = cand("fast_big", 0.4996, 60.0, params=5_000_000)
    fast_small = cand("fast_small", 0.5000, 60.0, params=2_000_000)
    twin = cand("a_twin", 0.5000, 60.0, params=2_000_000)
    better = cand("better", 0.502, 99.0)

    assert select_backbone([slow, fast_big], BUDGET).selected.name == "fast_big"
    assert select_backbone([slow, fast_big, fast_small], BUDGET).selected.name == "fast_small"
    assert select_backbone([fast_small, twin], BUDGET).selected.name == "a_twin"
    # A real mIoU gain (visible at 3 decimals) beats any latency advantage.
    ranked = select_backbone([slow, fast_big, fast_small, better], BUDGET).ranked
    assert [c.name for c in ranked] == ["better", "fast_small", "fast_big", "slow"]


def test_pareto_front_on_hand_data() -> None:
    points = [
        cand("a", 0.30, 10.0),   # fastest: on the front
        cand("b", 0.50, 20.0),   # on the front
        cand("c", 0.45, 25.0),   # dominated by b (slower and worse)
        cand("d", 0.50, 30.0),   # dominated by b (equal mIoU, slower)
        cand("e", 0.70, 80.0),   # most accurate: on the front
        cand("f", None, 5.0),    # not trained: left out
    ]
    assert [c.name for c in pareto_front(points)] == ["a", "b", "e"]
    assert [c.name for c in pareto_front([cand("x", 0.5, 10.0), cand("y", 0.5, 10.0)])] == ["x", "y"]


def test_none_fits_error_names_closest_candidates_and_missed_limits() -> None:
    near = cand("near", 0.4, 105.0)                   # 5% over on latency
    far = cand("far", 0.9, 300.0, model_mb=200.0)     # 3x latency, 4x size
    mid = cand("mid", 0.5, 150.0)
    worst = cand("worst", 0.6, 1000.0)
    with pytest.raises(NoBackboneFits) as err:
        select_backbone([far, worst, mid, near], BUDGET)
    message = str(err.value)
    assert "'edge'" in message and "latency_ms<=100" in message
    assert message.index("near: latency_p95_ms 105.0 > latency_ms 100") < message.index("mid:")
    assert "far: latency_p95_ms 300.0 > latency_ms 100, model_mb 200.0 > model_mb 50" in message
    assert "worst" not in message  # only the three closest are named


def test_empty_candidates_and_bad_budget_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        select_backbone([], BUDGET)
    with pytest.raises(ValueError, match="hardware.latency_ms must be > 0"):
        HardwareBudget(name="bad", latency_ms=0)


def test_default_backbones_leave_out_exactly_the_test_only_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: one more test-only entry, to show the flag (not a name) decides.
    import dataclasses

    from fedseg import models
    from fedseg.search.measure import resolve_backbones

    probe = dataclasses.replace(models.BACKBONES["tiny"], test_only=True)
    monkeypatch.setitem(models.BACKBONES, "probe", probe)
    # Execute
    names = resolve_backbones(None)
    # Assert
    assert "tiny" not in names and "probe" not in names
    assert names == [n for n, spec in models.BACKBONES.items() if not spec.test_only]
    assert resolve_backbones(["probe", "tiny", "probe"]) == ["probe", "tiny"]  # named: always searched
