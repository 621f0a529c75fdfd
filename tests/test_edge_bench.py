"""scripts/bench/edge.py's result assembly from given numbers (no processes: the bench is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("edge", Path(__file__).resolve().parents[1] / "scripts" / "bench" / "edge.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_speedup_and_drop_are_the_deployed_rows_against_the_teacher() -> None:
    # Prepare: teacher 0.420 mIoU at p95 150 ms; the deployed (last) row 0.405 at 12 ms.
    rows = [{"name": "distillation", "format": "fp32 PyTorch", "miou": 0.41, "p95_ms": 40.0},
            {"name": "distillation + INT8", "format": "INT8 ONNX Runtime", "miou": 0.405, "p95_ms": 12.0}]
    # Execute
    result = bench.assemble(teacher={"miou": 0.42, "p95_ms": 150.0}, rows=rows, wall_s={"teacher": 60.0, "search": 30.5},
                            load={"teacher": 1.0}, smoke=False)
    # Assert: 150 / 12 = 12.5; 100 x (0.420 - 0.405) = 1.5 points; 150 / 40 = 3.75 and 1 point for the fp32 row.
    assert result["speedup"] == 12.5 and result["miou_drop_points"] == pytest.approx(1.5)
    assert (result["teacher_miou"], result["student_miou"], result["deployed"]) == (0.42, 0.405, "distillation + INT8")
    assert result["rows"][0]["speedup"] == 3.75 and result["rows"][0]["miou_drop_points"] == pytest.approx(1.0)
    assert result["wall_s"]["total"] == 90.5 and result["load"] == {"teacher": 1.0} and result["smoke"] is False


def test_student_rows_add_qat_only_when_it_ran_and_share_the_int8_latency() -> None:
    alone, distilled = {"final": {"miou": 0.30}}, {"final": {"miou": 0.35}}
    export = {"parity": {"miou_int8": 0.33}, "qat": {"ran": True, "miou_int8": 0.345}}
    p95 = {"teacher_fp32": 150.0, "torch_fp32": 40.0, "onnx_fp32": 30.0, "onnx_int8": 12.0}
    rows = bench.student_rows(alone, distilled, export, p95)
    assert [(r["name"], r["miou"], r["p95_ms"]) for r in rows] == [
        ("no distillation", 0.30, 40.0), ("distillation", 0.35, 40.0), ("distillation + INT8", 0.33, 12.0),
        ("distillation + INT8 + QAT", 0.345, 12.0)]
    skipped = bench.student_rows(alone, distilled, {**export, "qat": {"ran": False}}, p95)
    assert skipped[-1]["name"] == "distillation + INT8"


def test_no_student_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="no student rows"):
        bench.assemble(teacher={"miou": 0.4, "p95_ms": 1.0}, rows=[], wall_s={}, load={})
