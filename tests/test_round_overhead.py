"""A round's training on its critical path and the share of the round beyond it (hand-computed)."""

from __future__ import annotations

import pytest

from fedseg.measurement import critical_path_s, overhead_share


@pytest.mark.parametrize(("train_s", "slots", "expected"), [
    ([10.0, 10.0, 10.0, 10.0], 2, 20.0),  # two waves of two
    ([30.0, 5.0, 5.0], 2, 30.0),  # the longest vehicle bounds the round
    ([4.0, 6.0], 1, 10.0),  # one slot: in turn
    ([4.0, 6.0], 4, 6.0),  # more slots than vehicles: all at once
    ([], 2, 0.0),
])
def test_critical_path_is_the_longest_vehicle_or_the_work_spread_over_the_slots(
        train_s: list[float], slots: int, expected: float) -> None:
    assert critical_path_s(train_s, slots) == pytest.approx(expected)


def test_overhead_share_is_what_the_round_spends_beyond_training() -> None:
    assert overhead_share(21.0, [10.0, 10.0, 10.0, 10.0], 2) == pytest.approx(1 / 21)
    assert overhead_share(19.0, [10.0, 10.0, 10.0, 10.0], 2) == 0.0  # never negative
    assert overhead_share(0.0, [1.0], 1) == 0.0
