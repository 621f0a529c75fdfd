"""scripts/bench/vehicle_dp.py's overrides and result from given numbers (no processes: the bench is run by hand)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "vehicle_dp", Path(__file__).resolve().parents[1] / "scripts" / "bench" / "vehicle_dp.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_ratio_and_gain_kept_are_against_no_dp_and_its_pretrained_start(capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: start 0.30; no DP 0.40; eps8 0.36; eps3 0.33; one ablation row that failed.
    def row(miou: float | None, eps: float | None = None, audit: float | None = None) -> dict:
        return {"miou": miou, "start_miou": 0.30, "epsilon": eps, "delta": 1e-5 if eps else None,
                "audit_epsilon": audit, "wall_s": 60.0, "load_at_start": 0.5}
    rows = {"no_dp": row(0.40), "eps8": row(0.36, 8.0, 1.2), "eps3": row(0.33, 3.0, 0.6),
            "eps8 fedavg": {"miou": None, "error": "boom", "wall_s": 5.0},
            "eps8 without noise": row(0.38, float("inf"))}
    # Execute
    bench.report(rows, {"eps8": 1.6, "eps3": 3.0}, {"miou": 0.39, "cached": True, "wall_s": 0.0}, vehicles=2000,
                 per_round=200, rounds=15, fleet=["experiment=vehicle_dp"], wall_s=185.0, load=((0.1,), (0.2,)),
                 as_json=True)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=lambda name: pytest.fail(name))
    # Assert: 0.36 / 0.40 = 0.9, (0.36 - 0.30) / (0.40 - 0.30) = 0.6; the audit beside the accountant.
    assert result["ratio"]["eps8"] == pytest.approx(0.9) and result["ratio"]["eps3"] == pytest.approx(0.825)
    assert result["gain_kept"]["eps8"] == pytest.approx(0.6)
    assert result["epsilon"]["eps8"] == 8.0 and result["audit_epsilon"]["eps8"] == 1.2
    assert result["errors"] == {"eps8 fedavg": "boom"} and result["ablation"]["eps8 fedavg"]["miou"] is None
    # an unbounded epsilon (no noise) is null: the line stays strict JSON
    assert result["ablation"]["eps8 without noise"]["epsilon"] is None and result["epsilon"]["eps8 without noise"] is None
    assert (result["vehicles"], result["vehicles_per_round"], result["rounds"]) == (2000, 200, 15)


def test_a_lever_replaces_the_setting_it_changes_and_delta_is_within_one_over_the_fleet() -> None:
    merged = bench.merged(["privacy.clipping=adaptive", "federation.rounds=15"], ["privacy.clipping=fixed"])
    assert merged == ["privacy.clipping=fixed", "federation.rounds=15"]
    overrides, z = bench.private(8.0, 2000, 200, 15)
    assert f"privacy.noise_multiplier={z:.4f}" in overrides and "privacy.audit=true" in overrides
    from fedseg.privacy import default_delta
    assert default_delta(2000) <= 1 / 2000
