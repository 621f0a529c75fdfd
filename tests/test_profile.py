"""The profiler on the tiny UNet returns sane, positive numbers and leaves torch as it found it."""

from __future__ import annotations

import pytest
import torch

from fedseg.models import build_model, count_parameters
from fedseg.search.profile import LiveTensorMemory, profile_model


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


def test_interleaved_latency_times_every_model_equally(tiny: torch.nn.Module) -> None:
    from fedseg.search.measure import interleaved_latency

    threads_before = torch.get_num_threads()
    latency = interleaved_latency({"a": tiny.eval(), "b": tiny.eval()}, (32, 32), threads=1, repeats=7, block=3)
    assert set(latency) == {"a", "b"}
    assert all(0 < lat.median_ms <= lat.p95_ms for lat in latency.values())
    assert torch.get_num_threads() == threads_before
