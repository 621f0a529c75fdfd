"""Property tests (hypothesis): the run-config bridge, config validation, the delta codec, update
screening and partitions hold for any input, not only for the hand-picked ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseg.config import FederationSpec, from_run_config, parse_spec, to_run_config
from fedseg.data.frames import Frame
from fedseg.data.partition import PARTITIONS, partition_frames
from fedseg.robust import screen_updates
from fedseg.secagg import decode_delta, encode_delta

keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(scalars | st.lists(scalars, max_size=3),
                      lambda inner: st.dictionaries(keys, inner, min_size=1, max_size=4), max_leaves=20)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_run_config_round_trips_any_nested_config(config: dict[str, Any]) -> None:
    flat = to_run_config(config)

    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert from_run_config(flat) == config  # empty mappings travel as JSON: the round trip is exact


federation_values = st.fixed_dictionaries({}, optional={
    "num_clients": st.integers(-3, 50) | st.text(max_size=3) | st.floats(-1, 50),
    "rounds": st.integers(-3, 50) | st.none(),
    "fraction_fit": st.floats(-1, 2) | st.just(float("nan")),
    "lr": st.floats(allow_nan=True) | st.booleans(),
    "batch_size": st.integers(-3, 64),
})


@given(federation_values)
def test_federation_block_parses_within_bounds_or_names_the_bad_key(block: dict[str, Any]) -> None:
    try:
        spec = parse_spec(FederationSpec, block, key="federation")
    except ValueError as err:
        assert str(err).startswith("federation.") and any(k in str(err) for k in block)
        return
    assert spec.num_clients >= 1 and spec.rounds >= 1 and 0 < spec.fraction_fit <= 1
    assert spec.lr > 0 and spec.batch_size >= 1
    assert all(type(getattr(spec, f.name)) is type(f.default) for f in dataclasses.fields(spec)
               if f.name in block and f.default is not None)


arrays = st.lists(st.tuples(st.integers(1, 5), st.sampled_from([np.float32, np.float64, np.int64])),
                  min_size=1, max_size=4)


@given(arrays, st.integers(0, 2**31 - 1))
def test_delta_codec_restores_any_weights(shapes: list[tuple[int, Any]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    global_ = [(rng.standard_normal(n) * 100).astype(dtype) for n, dtype in shapes]
    local = [(g + rng.standard_normal(g.shape) * 10).astype(g.dtype) for g in global_]

    restored = decode_delta(global_, encode_delta(local, global_))

    for a, b in zip(restored, local, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4 if a.dtype.kind == "f" else 0)


@given(st.lists(st.floats(0.5, 2.0), min_size=2, max_size=8), st.floats(10.5, 1e4), st.integers(0, 7))
def test_screening_keeps_comparable_updates_and_drops_one_far_above_them(
        scales: list[float], factor: float, hostile: int) -> None:
    global_ = [np.zeros(6, np.float32)]
    updates = [[np.full(6, s, np.float32)] for s in scales]
    kept = screen_updates(updates, global_, max_norm_ratio=10.0)
    assert kept == [None] * len(scales)  # norms within 4x of each other: nobody is rejected

    hostile %= len(scales)
    updates[hostile] = [np.full(6, 2.0 * factor, np.float32)]  # > 10x every honest norm
    reasons = screen_updates(updates, global_, max_norm_ratio=10.0)

    assert reasons[hostile] is not None and all(r is None for i, r in enumerate(reasons) if i != hostile)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(PARTITIONS)), st.lists(st.integers(1, 9), min_size=1, max_size=5),
       st.integers(1, 6), st.integers(0, 1000))
def test_every_partition_gives_each_frame_to_exactly_one_vehicle(scheme: str, sizes: list[int], vehicles: int,
                                                                seed: int) -> None:
    sources = {f"town{s}": [Frame(Path(f"t{s}_{i}.png"), Path(f"s{s}_{i}.png"), f"town{s}") for i in range(n)]
               for s, n in enumerate(sizes)}
    total = sum(sizes)
    impossible = ("one frame each" if total < vehicles else
                  "one source folder" if scheme == "vehicle" and len(sizes) != vehicles else None)
    if impossible:  # refused with the reason, never a partial split
        with pytest.raises(ValueError, match=impossible):
            partition_frames(sources, vehicles, scheme, seed=seed)
        return

    parts = partition_frames(sources, vehicles, scheme, seed=seed)

    handed_out = [frame for part in parts for frame in part]
    assert len(parts) == vehicles and sorted(map(str, handed_out)) == sorted(
        str(f) for frames in sources.values() for f in frames)
    assert parts == partition_frames(sources, vehicles, scheme, seed=seed)  # deterministic from the seed
