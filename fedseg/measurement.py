"""Measuring a model on this machine: threads, latency (PyTorch and ONNX Runtime), memory, frames.

Shared by ``fedseg-search`` (profiling candidates) and ``fedseg-export`` (timing the exported
files), so both report numbers obtained the same way:

* **Threads**: :func:`usable_threads` caps a requested count at this process's cores;
  :func:`torch_threads` is the one place torch's thread count is set and restored.
* **Latency**: batch 1, ``warmup`` untimed runs, then median and 95th percentile of ``repeats``
  timed runs (:class:`Latency`). :func:`interleaved_latency` times several models in alternation so
  load drift on a shared machine hits them alike. ONNX Runtime sessions (:func:`onnx_session`) get
  the same thread count and sleep rather than spin when idle.
* **Memory**: 1 MB = 2**20 bytes (:data:`MB`). Peak memory is weights + buffers + inputs plus the
  peak of *live tensor storage* tracked op by op (:class:`LiveTensorMemory`): deterministic and
  independent of the allocator and other processes, unlike RSS; it leaves out scratch memory an op
  allocates and frees internally (oneDNN workspaces) and the interpreter.
* **Frames**: calibration frames are taken one per vehicle in turn (:func:`round_robin_indices`),
  so every vehicle's camera is represented however few frames are used.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import ConcatDataset, Dataset

MB = float(2**20)

# ---------------------------------------------------------------- threads


def usable_threads(requested: int) -> int:
    """``requested`` capped at the cores this process may run on: more threads only oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(requested), cores))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to ``threads``; restore it afterwards.

    Measurements change the process-wide setting, and the caller (a test, the search loop) must
    find it as it left it, exceptions included.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- latency


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency over ``repeats`` timed runs after warm-up (milliseconds)."""

    median_ms: float
    p95_ms: float


def summarize_times(times_ms: Sequence[float]) -> Latency:
    """Median and 95th percentile (linear interpolation) of a list of timings."""
    return Latency(float(statistics.median(times_ms)), float(np.percentile(times_ms, 95)))


def _timed(run: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``run`` (at least one)."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def torch_latency(model: nn.Module, x: torch.Tensor, *, warmup: int, repeats: int) -> Latency:
    """Latency of ``model(x)`` under inference mode, after ``warmup`` runs, with torch's current threads."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        return summarize_times(_timed(lambda: model(x), repeats))


def interleaved_latency(models: dict[str, nn.Module], image_size: Sequence[int], *, threads: int,
                        repeats: int, block: int = 5) -> dict[str, Latency]:
    """Batch-1 latency of several models timed in alternation: ``block`` timed runs of each in turn.

    Load on a machine shared with other jobs drifts over the minutes a search takes; timing the
    models in alternation spreads that drift over all of them, so their ratios stay fair. Each block
    starts with one untimed run, so a model runs with warm caches as it would on a vehicle. Every
    model gets the same input and ``repeats`` timings.
    """
    x = torch.randn(1, 3, int(image_size[0]), int(image_size[1]), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch_threads(threads), torch.inference_mode():
        while any(len(t) < repeats for t in times.values()):
            for name, model in models.items():
                model(x)
                times[name] += _timed(functools.partial(model, x), min(block, repeats - len(times[name])))
    return {name: summarize_times(t) for name, t in times.items()}


def onnx_session(path: str | Path, *, threads: int) -> ort.InferenceSession:
    """A CPU session pinned to ``threads`` intra-op threads (one inter-op thread: a UNet is a chain)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    # Idle workers sleep instead of spinning: a vehicle's cores are shared with the rest of its stack,
    # and spinning threads then stall each other (measured here at load ~3.5 on 2 cores, UNet-ResNet34
    # 192x256: p95 201 ms spinning vs 61 ms not, same 58 ms median).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_latency(path: str | Path, image_size: Sequence[int], *, threads: int, repeats: int = 20,
                 warmup: int = 3) -> Latency:
    """Median and p95 batch-1 latency of an ONNX model (one image input) in ONNX Runtime."""
    session = onnx_session(path, threads=threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (1, 3, int(image_size[0]), int(image_size[1]))).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    return summarize_times(_timed(lambda: session.run(None, feed), repeats))


# ---------------------------------------------------------------- memory


class LiveTensorMemory(TorchDispatchMode):
    """Tracks bytes of tensor storage created inside the mode and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen:  # views and in-place results share a counted storage
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # Storage Python objects are preserved while the storage lives, so this fires on free.
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes the tensors' elements occupy (views counted at their own size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def state_dict_mb(model: nn.Module) -> float:
    """Size of the saved state dict, i.e. of the checkpoint file a vehicle downloads."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / MB


def inference_memory_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Weights + buffers + input + peak live tensor storage of one forward under inference mode."""
    tracker = LiveTensorMemory()
    with torch.inference_mode(), tracker:
        model(x)
    resident = tensor_bytes([*model.parameters(), *model.buffers(), x])
    return (resident + tracker.peak) / MB


def step_memory_mb(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any,
                   x: torch.Tensor, y: torch.Tensor) -> float:
    """Weights + buffers + batch + peak live tensors of one training step (optimizer state included)."""
    tracker = LiveTensorMemory()
    resident = tensor_bytes([*model.parameters(), *model.buffers(), x, y])
    with tracker:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    return (resident + tracker.peak) / MB


# ---------------------------------------------------------------- frames


def round_robin_indices(lengths: Sequence[int], limit: int | None) -> list[int]:
    """Indices into the concatenation of datasets of ``lengths``, taking one frame per vehicle in turn."""
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    order = [offsets[v] + i for i in range(max(lengths, default=0))
             for v in range(len(lengths)) if i < lengths[v]]
    return order if limit is None else order[:limit]


def calibration_images(datasets: Sequence[Dataset], count: int, image_size: Sequence[int]) -> torch.Tensor:
    """The first ``count`` images taken round-robin from ``datasets``, resized to ``image_size`` (H, W).

    INT8 activation ranges are calibrated on these, at the size the model will run at on the vehicle.
    Each dataset item is ``(image, mask)`` with a normalised (3,H,W) image.
    """
    pooled: ConcatDataset[Any] = ConcatDataset(datasets)
    ends = pooled.cumulative_sizes  # ConcatDataset has measured each dataset's length
    order = round_robin_indices([end - start for start, end in zip([0, *ends], ends)], count)
    if not order:
        raise ValueError(f"no calibration frames: {len(datasets)} dataset(s) hold no frames")
    frames = torch.stack([pooled[i][0] for i in order])
    size = (int(image_size[0]), int(image_size[1]))
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- rounds


def critical_path_s(train_s: Sequence[float], slots: int) -> float:
    """Training seconds on a round's critical path: vehicles with ``train_s`` seconds each, ``slots`` at once.

    ``max(longest vehicle, total / slots)``: no schedule of the vehicles on ``slots`` workers finishes
    its training sooner (a lower bound, exact when one slot or all vehicles train at once), so the
    overhead it leaves in a round is an upper bound.
    """
    if not train_s:
        return 0.0
    return max(max(train_s), sum(train_s) / max(1, int(slots)))


def overhead_share(round_s: float, train_s: Sequence[float], slots: int) -> float:
    """Share of a round's wall time beyond the training on its critical path (0 when it is all training)."""
    if round_s <= 0:
        return 0.0
    return max(0.0, round_s - critical_path_s(train_s, slots)) / round_s
