"""The profiler on the tiny UNet returns sane, positive numbers and leaves torch as it found it."""

from __future__ import annotations

import copy

import pytest
import torch

from fedseg.measurement import LiveTensorMemory, interleaved_latency, torch_threads
from fedseg.models import build_model, count_parameters
from fedseg.search.profile import profile_model


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", 3)


def test_profile_of_tiny_model_is_sane(tiny: torch.nn.Module) -> None:
    threads_before = torch.get_num_threads()
    training_before = tiny.training
    p = profile_model(tiny, image_size=(32, 48), threads=1, warmup=1, repeats=5,
                      train_batch_size=2, train_image_size=(32, 32))
    assert p.params == count_parameters(tiny)
    assert p.macs > 0 and p.size_mb > 0
    assert 0 < p.latency_ms <= p.latency_p95_ms
    weights_mb = sum(t.numel() * t.element_size() for t in tiny.state_dict().values()) / 2**20
    assert p.memory_mb > weights_mb  # weights plus activations
    assert p.train_step_memory_mb is not None and p.train_step_memory_mb > p.memory_mb  # grads + Adam state
    assert p.dp_step_memory_mb is None and p.int8_latency_ms is None  # not requested
    assert (p.image_size, p.threads) == ((32, 48), 1)
    assert torch.get_num_threads() == threads_before and tiny.training == training_before


def test_macs_scale_with_pixels(tiny: torch.nn.Module) -> None:
    small = profile_model(tiny, image_size=(32, 32), threads=1, warmup=0, repeats=1)
    large = profile_model(tiny, image_size=(64, 64), threads=1, warmup=0, repeats=1)
    assert large.macs == 4 * small.macs  # a fully convolutional net: cost is linear in pixels


def test_live_tensor_memory_counts_storage_once_and_releases_it() -> None:
    tracker = LiveTensorMemory()
    with tracker:
        a = torch.ones(1024)          # 4 KiB
        b = a.view(32, 32)            # a view: same storage, not counted again
        c = torch.ones(2048)          # 8 KiB more: peak 12 KiB
        del a, b, c                   # freed
        d = torch.ones(256)           # 1 KiB
    assert tracker.peak == 12 * 1024
    assert tracker.live == 1024
    del d
    assert tracker.live == 0


class _Recorder(torch.nn.Module):
    """Identity model that logs, per call, its name, the input shape and torch's thread count."""

    def __init__(self, name: str, log: list[tuple[str, tuple[int, ...], int]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, tuple(x.shape), torch.get_num_threads()))
        return x


def test_interleaved_latency_times_every_model_equally() -> None:
    # Prepare: two models that record how they are called; a thread count unlike the current one.
    threads_before = torch.get_num_threads()
    threads = 1 if threads_before != 1 else 2
    log: list[tuple[str, tuple[int, ...], int]] = []
    models = {"a": _Recorder("a", log), "b": _Recorder("b", log)}
    # Execute: 7 timed runs each in blocks of 3 -> blocks of 3, 3, 1, each after one untimed run.
    latency = interleaved_latency(models, (32, 48), threads=threads, repeats=7, block=3)
    # Assert: same input, same threads, same number of runs, in alternating blocks.
    assert {shape for _, shape, _ in log} == {(1, 3, 32, 48)}
    assert {n for _, _, n in log} == {threads}
    blocks = [("a", 4), ("b", 4), ("a", 4), ("b", 4), ("a", 2), ("b", 2)]
    assert [name for name, _, _ in log] == [name for name, runs in blocks for _ in range(runs)]
    assert set(latency) == {"a", "b"}
    assert all(0 < lat.median_ms <= lat.p95_ms for lat in latency.values())
    assert torch.get_num_threads() == threads_before


def test_torch_threads_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    inside = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="boom"), torch_threads(inside):
        assert torch.get_num_threads() == inside
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_identical_models_get_identical_measurements(tiny: torch.nn.Module) -> None:
    """Every candidate is profiled alike: a copy of a model measures the same except for time."""
    first = profile_model(tiny, image_size=(32, 32), threads=1, warmup=0, repeats=1, train_batch_size=2)
    second = profile_model(copy.deepcopy(tiny), image_size=(32, 32), threads=1, warmup=0, repeats=1,
                           train_batch_size=2)
    timing = ("latency_ms", "latency_p95_ms")
    assert {k: v for k, v in vars(first).items() if k not in timing} == \
        {k: v for k, v in vars(second).items() if k not in timing}
