"""fedseg.measurement's frame selection: every vehicle represented, in a fixed order, at the deploy size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedseg.measurement import calibration_images, round_robin_indices, tensor_bytes, usable_threads


def test_round_robin_takes_one_frame_per_vehicle_in_turn() -> None:
    # Vehicles of 3, 1 and 2 frames: concatenated indices 0-2, 3, 4-5.
    assert round_robin_indices([3, 1, 2], None) == [0, 3, 4, 1, 5, 2]
    assert round_robin_indices([3, 1, 2], 4) == [0, 3, 4, 1]
    assert round_robin_indices([], None) == []


def test_calibration_images_are_round_robin_frames_resized() -> None:
    # Prepare: each frame is a constant image whose value says which vehicle and frame it is.
    def vehicle(values: list[float]) -> TensorDataset:
        images = torch.stack([torch.full((3, 4, 4), v) for v in values])
        return TensorDataset(images, torch.zeros(len(values), 4, 4, dtype=torch.long))

    datasets = [vehicle([10.0, 11.0]), vehicle([20.0]), vehicle([30.0, 31.0])]
    # Execute
    images = calibration_images(datasets, 4, (8, 6))
    # Assert: order 10, 20, 30, 11; bilinear resizing keeps a constant image constant.
    assert images.shape == (4, 3, 8, 6)
    assert images[:, 0, 0, 0].tolist() == pytest.approx([10.0, 20.0, 30.0, 11.0])
    assert torch.allclose(images[1], torch.full((3, 8, 6), 20.0))


def test_calibration_images_need_frames() -> None:
    empty = TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0, 4, 4))
    with pytest.raises(ValueError, match="no calibration frames"):
        calibration_images([empty], 4, (4, 4))


def test_tensor_bytes_and_usable_threads() -> None:
    assert tensor_bytes([torch.zeros(10), torch.zeros(3, dtype=torch.float64)]) == 10 * 4 + 3 * 8
    assert usable_threads(1) == 1
    assert usable_threads(0) == 1  # never zero threads
    assert 1 <= usable_threads(10_000) < 10_000  # capped at this machine's cores
