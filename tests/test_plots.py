"""Plots: which files plot_curves writes, how missing values are drawn, the example sheet's input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedseg.data.normalize import denormalize, normalize
from fedseg.plots import _series, plot_curves


def test_series_keeps_zero_and_turns_missing_values_into_gaps() -> None:
    # Prepare: a metric that is 0.0 in round 1, absent in round 2 and None in round 3
    rows = [{"round": 1, "dice": 0.0}, {"round": 2}, {"round": 3, "dice": None}, {"round": 4, "dice": 0.5}]
    # Execute
    values = _series(rows, "dice")
    # Assert
    assert values[0] == 0.0 and values[3] == 0.5
    assert math.isnan(values[1]) and math.isnan(values[2])


def test_plot_curves_writes_the_epsilon_plot_only_for_private_runs(tmp_path: Path) -> None:
    # Prepare
    rows = [{"round": r, "loss": 1.0 / r, "miou": 0.1 * r, "per_class_iou": {"road": 0.2 * r}}
            for r in (1, 2)]
    private = [{**row, "epsilon": 0.5 * row["round"]} for row in rows]
    # Execute
    plain_paths = plot_curves(rows, tmp_path / "plain")
    private_paths = plot_curves(private, tmp_path / "private")
    # Assert
    assert [p.name for p in plain_paths] == ["loss.png", "miou.png", "per_class_iou.png"]
    assert [p.name for p in private_paths] == ["loss.png", "miou.png", "per_class_iou.png", "epsilon.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in plain_paths + private_paths)


def test_example_sheet_input_is_the_camera_image_exactly() -> None:
    # Prepare: plot_examples gets numpy batches (reporting stacks dataset tensors and calls .numpy())
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack([levels, levels[::-1], np.roll(levels, 7)], -1).reshape(16, 16, 3)
    image = normalize(rgb).numpy()
    # Execute
    shown = denormalize(image)
    # Assert
    assert shown.dtype == np.uint8 and shown.shape == (16, 16, 3)
    assert np.array_equal(shown, rgb)
