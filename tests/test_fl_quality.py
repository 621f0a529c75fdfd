"""The learning-quality levers: the server's lr schedule, augmentation, BatchNorm kept on the vehicle
(FedBN/SiloBN), and the composed server averaging statistics plainly. Golden numbers by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    Context,
    FitRes,
    RecordDict,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from torch.utils.data import TensorDataset

from fedseg.clients.client_app import NORM_KEY, VehicleClient
from fedseg.config import to_run_config
from fedseg.models import build_run_model, get_weights
from fedseg.server.compose import compose_server
from fedseg.server.notes import RoundNotes
from fedseg.server.recorder import RoundRecorder
from fedseg.server.resume import restore, resume_state
from fedseg.server.statistics_mean import StatisticsMean
from fedseg.server.strategies import build_strategy
from fedseg.settings import RunSettings, settings_of
from fedseg.training import AugmentedDataset, epoch_round, norm_state_keys, scheduled_lr, statistics_mask


def run_settings(tmp_path: Path | None = None, **federation: Any) -> RunSettings:
    cfg: dict[str, Any] = {"model": {"name": "tiny"}, "federation": {
        "num_clients": 2, "min_fit_clients": 2, "rounds": 3, "batch_size": 2, **federation}}
    if tmp_path is not None:
        cfg |= {"data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                         "heldout_frames": 2}, "output_dir": str(tmp_path / "run")}
    return settings_of(to_run_config(cfg))


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [1e-3, 1e-3, 1e-3]),
    # cosine from lr (round 1) to lr x 0.1 (round 3): the middle is lr x (0.1 + 0.9 x (1 + cos(pi/2)) / 2)
    ("cosine", [1e-3, 5.5e-4, 1e-4]),
    ("step", [1e-3, 1e-3, 1e-4]),  # the last third of 3 rounds is round 3
])
def test_server_sends_each_rounds_lr_in_the_fit_config(schedule: str, expected: list[float]) -> None:
    s = run_settings(lr=1e-3, lr_schedule=schedule, lr_final=0.1)
    parts = compose_server(s, on_round=lambda row, resume: None,
                           initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))

    sent = [parts.base.on_fit_config_fn(r)["lr"] for r in (1, 2, 3)]  # type: ignore[attr-defined]

    assert sent == pytest.approx(expected)
    assert [parts.recorder.notes.pop(r)["lr"] for r in (1, 2, 3)] == sent  # each round's row says it


def test_plateau_sends_the_dropped_lr_once_the_reporter_says_the_rule_fired() -> None:
    cfg = {"model": {"name": "tiny"}, "early_stop": {"window": 2}, "federation": {
        "num_clients": 2, "min_fit_clients": 2, "rounds": 3, "lr": 1e-3, "lr_schedule": "plateau", "lr_final": 0.1}}
    s = settings_of(to_run_config(cfg))
    dropped = [0]
    parts = compose_server(s, on_round=lambda row, resume: None, lr_dropped=lambda: dropped[0],
                           initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))

    before = parts.base.on_fit_config_fn(2)["lr"]  # type: ignore[attr-defined]
    dropped[0] = 1
    after = parts.base.on_fit_config_fn(3)["lr"]  # type: ignore[attr-defined]

    assert (before, after) == pytest.approx((1e-3, 1e-4))
    with pytest.raises(ValueError, match="lr_schedule=plateau .* set early_stop.window"):
        run_settings(lr_schedule="plateau")


def test_centralized_epochs_follow_the_rounds_lr() -> None:
    # 3 rounds x 2 local epochs = 6 epochs: two epochs per round, as a vehicle trains them.
    assert [epoch_round(e, epochs=6, rounds=3) for e in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    assert scheduled_lr(1.0, "cosine", round_=2, rounds=3, final=0.0) == pytest.approx(0.5)
    assert scheduled_lr(1.0, "cosine", round_=1, rounds=1, final=0.1) == 1.0  # one round: no decay
    assert math.isclose(scheduled_lr(2.0, "constant", round_=5, rounds=9, final=0.1), 2.0)


def test_hflip_mirrors_image_and_mask_together() -> None:
    # Prepare: the mask is the image's first channel thresholded, so any pairing error shows.
    torch.manual_seed(0)
    image = torch.randn(8, 3, 6, 10)
    masks = (image[:, 0] > 0).long()
    data = AugmentedDataset(TensorDataset(image, masks), ["hflip"])

    # Execute
    pairs = [data[i] for i in range(8)]

    # Assert: every pair still agrees, some frames were mirrored and some not.
    assert all(torch.equal((im[0] > 0).long(), m) for im, m in pairs)
    flipped = [torch.equal(im, image[i].flip(-1)) for i, (im, _) in enumerate(pairs)]
    assert any(flipped) and not all(flipped)


def test_scale_and_color_keep_the_frame_size_and_the_mask_labels() -> None:
    torch.manual_seed(1)
    image, mask = torch.randn(3, 16, 24), torch.randint(0, 4, (16, 24))
    mask[0, 0] = 255  # an ignored pixel stays a valid label
    data = AugmentedDataset(TensorDataset(image[None], mask[None]), ["hflip", "scale", "color"])

    out_image, out_mask = data[0]

    assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())  # nearest: no invented class
    assert not torch.equal(out_image, image)


def test_unknown_augmentation_is_one_line_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"federation.augment=\['blur'\]: expected a list of 'hflip' \| 'scale' \| 'color'"):
        run_settings(augment=["blur"])


def vehicle(s: RunSettings, state: RecordDict) -> VehicleClient:
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=state, run_config={})
    return VehicleClient(s, 0, context)


@pytest.mark.parametrize("mode", ["none", "stats", "affine"])
def test_vehicle_keeps_its_own_batchnorm_across_rounds(tmp_path: Path, mode: str) -> None:
    # Prepare: round 1 from the initial model; round 2's global model carries BatchNorm statistics
    # (and affine weights) set to 50, as a server mean might be.
    state = RecordDict()
    client = vehicle(run_settings(tmp_path, local_norm=mode), state)
    model = build_run_model(client.settings.model, client.num_classes, seed=0)
    keys = list(model.state_dict())
    client.fit(get_weights(model), {"server_round": 1, "local_epochs": 1})
    served = get_weights(model)
    stats = norm_state_keys(model, affine=False)
    affine = [k for k in norm_state_keys(model, affine=True) if k not in stats]
    for key in [k for k in stats if "running_mean" in k] + affine:
        served[keys.index(key)] = np.full_like(served[keys.index(key)], 50.0)

    # Execute
    sent, _, _ = client.fit(served, {"server_round": 2, "local_epochs": 1})

    # Assert: with BatchNorm local, round 2 started from the vehicle's own (near 0, not 50); without,
    # from the server's (2 steps at momentum 0.1 keep 0.9^2 of it).
    mean = keys.index(next(k for k in stats if "running_mean" in k))
    weight = keys.index(affine[0])
    assert (NORM_KEY in state) == (mode != "none")
    assert (abs(sent[mean]).max() < 20) == (mode != "none")
    assert (abs(sent[weight] - 50).max() > 10) == (mode == "affine")  # Adam moves 50 by about 2 x lr


def test_statistics_mask_flags_buffers_not_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))

    assert statistics_mask(model) == ["", "", "", "", "running_mean", "running_var", "buffer"]
    assert norm_state_keys(model, affine=True) == ["1.running_mean", "1.running_var", "1.num_batches_tracked",
                                                   "1.weight", "1.bias"]


def test_fedavgm_velocity_survives_a_resume() -> None:
    # Prepare: one round of server momentum, then a fresh server restored from the checkpointed state.
    def results(value: float) -> list:
        return [(MagicMock(), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(2, value, np.float32)]),
                                     1, {}))]

    def server() -> Any:
        return build_strategy("fedavgm", {"server_momentum": 0.5},
                              initial_parameters=ndarrays_to_parameters([np.zeros(2, np.float32)]))

    first = server()
    first.aggregate_fit(1, results(2.0), [])  # velocity -2, weights 2
    state = resume_state(first, RoundRecorder(first, RoundNotes(), on_round=lambda row, resume: None))
    second = server()
    restore(state, second, RoundRecorder(second, RoundNotes(), on_round=lambda row, resume: None))

    # Execute: round 2, the vehicle sends 4 (2 above the global).
    params, _ = second.aggregate_fit(2, results(4.0), [])

    # Assert: velocity 0.5 x -2 + (2 - 4) = -3 -> 2 + 3 = 5 (a server that forgot it would give 4).
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [5.0, 5.0])


def test_server_pools_batchnorm_statistics_as_one_mixture_of_the_vehicles_frames() -> None:
    # Prepare: town A's feature has mean 0, variance 1; town B's mean 2, variance 1; equal frames.
    def sent(mean: float) -> FitRes:
        arrays = [np.ones(1, np.float32), np.full(1, mean, np.float32), np.ones(1, np.float32), np.array(4)]
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 5, {})

    strategy = StatisticsMean(build_strategy("fedavg", {}), ["", "running_mean", "running_var", "buffer"])

    # Execute
    params, _ = strategy.aggregate_fit(1, [(MagicMock(), sent(0.0)), (MagicMock(), sent(2.0))], [])

    # Assert: pooled mean 1; variance of the mixture (1 + 0 + 1 + 4) / 2 - 1 = 2, where the plain
    # mean of the variances (FedAvg's) is 1; the counter stays 4.
    _, mean, variance, count = parameters_to_ndarrays(params)
    assert mean[0] == pytest.approx(1.0) and variance[0] == pytest.approx(2.0) and count == 4
