"""Accelerators: device names and GPU shares are refused before a run starts when this machine or Ray
cannot honour them (runs on CPU); where a GPU exists, a vehicle trains on it and several vehicles of a
simulation share it (skipped, with the reason, elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict
from smoke_runs import rows_of, run_sim

from fedseg.config import resolve_device, to_run_config
from fedseg.settings import settings_of
from fedseg.sim.engine import check_accelerators

NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_device_names_resolve_on_a_cpu_machine(no_cuda: None) -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize(("device", "message"), [
    ("cuda", "device=cuda: this machine has 0 CUDA device(s)"),
    ("cuda:0", "device=cuda:0: this machine has 0 CUDA device(s)"),
    ("gpu", "device='gpu'; valid: ['cpu', 'cuda', 'cuda:N', 'auto']"),
    ("cuda:x", "device='cuda:x'; valid:"),
])
def test_a_device_this_machine_lacks_fails_in_one_line_naming_it(no_cuda: None, device: str, message: str) -> None:
    with pytest.raises(ValueError, match="^device=") as err:
        resolve_device(device)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("device", "client_gpus", "gpus", "message"), [
    ("auto", 0.2, 0, "federation.client_gpus=0.2: this machine has no CUDA GPU"),  # paper_* on a CPU box
    ("cuda", 2.0, 1, "federation.client_gpus=2: more than this machine's 1 GPU(s)"),
    ("cuda", 0.0, 1, "device=cuda with federation.client_gpus=0: Ray hides the GPU"),
    ("auto", 0.0, 1, "device=auto with federation.client_gpus=0"),
    ("cuda:1", 0.5, 2, "device=cuda:1: Ray gives each vehicle its GPU as cuda:0"),
    ("cpu", 0.5, 1, "federation.client_gpus=0.5 with device=cpu"),
])
def test_gpu_shares_ray_cannot_honour_are_refused(device: str, client_gpus: float, gpus: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_accelerators(device, client_gpus, gpus=gpus)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(("device", "client_gpus", "gpus"), [
    ("cpu", 0.0, 0), ("auto", 0.0, 0), ("cpu", 0.0, 1), ("cuda", 0.25, 1), ("auto", 0.2, 1), ("cuda", 1.0, 1),
    ("cuda:0", 0.5, 1), ("cuda", 2.0, 2),
])
def test_gpu_shares_ray_can_honour_pass(device: str, client_gpus: float, gpus: int) -> None:
    check_accelerators(device, client_gpus, gpus=gpus)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(("args", "message"), [
    (["experiment=smoke", "device=cuda"], "fedseg-sim: error: device=cuda: this machine has 0 CUDA device(s)"),
    (["experiment=paper_rgb"], "fedseg-sim: error: federation.client_gpus=0.2: this machine has no CUDA GPU"),
])
def test_fedseg_sim_refuses_a_gpu_run_here_before_anything_starts(
        args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fedseg.sim.federated import main

    monkeypatch.setattr(sys, "argv", ["fedseg-sim", *args, "run.progress=false", f"hydra.run.dir={tmp_path}"])
    monkeypatch.setenv("FEDSEG_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(message)
    assert not (tmp_path / "cache").exists()  # refused before any frame was made


class DeviceSpy:
    """A LocalTrainer around the vehicle's own, noting where the model's weights were during training."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.devices: set[str] = set()

    def train_round(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        outcome = self.inner.train_round(model, *args, **kwargs)
        self.devices |= {p.device.type for p in model.parameters()}
        return outcome

    def __getattr__(self, name: str) -> Any:  # the rest of the trainer (DP-SGD's accountant, say) as it is
        return getattr(self.inner, name)


@needs_gpu
@pytest.mark.parametrize("privacy", [
    {"name": "none"},
    # Opacus draws the noise where the gradients are: the vehicle's seeded noise generator must be there too
    {"name": "dpsgd", "noise_multiplier": 1.0, "target_epsilon": None},
], ids=["no-dp", "dp-sgd"])
def test_a_vehicle_trains_on_the_gpu_and_replies_with_numpy_weights(tmp_path: Path, privacy: dict) -> None:
    # Prepare: the tiny model on a vehicle told device=cuda.
    from fedseg.clients.client_app import VehicleClient
    from fedseg.models import build_run_model, get_weights

    cfg = {"data": {"root": str(tmp_path / "data"), "image_size": [32, 32], "frames_per_vehicle": 4,
                    "heldout_frames": 2}, "model": {"name": "tiny"}, "device": "cuda", "privacy": privacy,
           "federation": {"num_clients": 2, "min_fit_clients": 2, "rounds": 1, "batch_size": 2, "client_gpus": 0.5},
           "output_dir": str(tmp_path / "run")}
    settings = settings_of(to_run_config(cfg))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    client = VehicleClient(settings, 0, context)
    client.trainer = spy = DeviceSpy(client.trainer)
    start = get_weights(build_run_model(settings.model, client.num_classes, seed=0, dp=privacy["name"] == "dpsgd"))
    # Execute
    weights, examples, metrics = client.fit(start, {"server_round": 1, "local_epochs": 1})
    # Assert: trained on the GPU, replied in host memory, and the weights moved.
    assert spy.devices == {"cuda"} and examples == 4 and metrics["train_s"] > 0
    assert all(isinstance(w, np.ndarray) for w in weights)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start, strict=True))


@needs_gpu
@pytest.mark.e2e
def test_smoke_vehicles_share_one_gpu_in_the_simulation(tmp_path: Path) -> None:
    # Three vehicles with half a GPU each: Ray runs two at a time on the one GPU.
    proc, out = run_sim(tmp_path, "gpu", "device=cuda", "federation.client_gpus=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 3 for r in rows[1:])
    assert all(len(r["train_s"]) == 3 for r in rows[1:])
