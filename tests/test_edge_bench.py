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


def test_the_report_is_one_page_with_the_goals_the_table_and_where_the_teacher_sits(tmp_path: Path) -> None:
    # Prepare: a result as run_pipeline assembles it
    rows = [{"name": "no distillation", "format": "fp32 PyTorch", "miou": 0.38, "p95_ms": 23.2},
            {"name": "distillation + INT8", "format": "INT8 ONNX Runtime", "miou": 0.324, "p95_ms": 8.3}]
    result = bench.assemble(teacher={"miou": 0.305, "p95_ms": 146.1}, rows=rows, wall_s={"search": 10.0},
                            load={"search": 1.0}, profile="edge_cpu_2core", threads=2, image_size=[192, 256],
                            network_size=[144, 192], student="mobileone_s0", search_latency_budget_ms=14.6,
                            student_checkpoint="distilled/checkpoints/global.pt",
                            deployed_files={"fp32": "export_profile/model_fp32.onnx", "int8": None})
    # Execute
    report = bench.write_report(result, tmp_path)
    # Assert: the headline against both goals, the teacher's row first, the plot written and linked
    text = report.read_text()
    assert "speedup 17.60 (goal >= 10), mIoU drop -1.90 points (goal <= 2)" in text
    assert "network input 144x192 inside a graph that takes the camera's 192x256" in text
    assert text.index("| teacher | fp32 PyTorch | 0.305") < text.index("| distillation + INT8 |")
    assert "![held-out mIoU against p95 latency](front.png)" in text and "search/search.png" in text
    assert "- ONNX fp32: `export_profile/model_fp32.onnx`" in text and "ONNX int8" not in text
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
