"""Update codecs: hand-computed round trips, error feedback, shared-seed positions, and whole rounds through
the real mods and server composition (``toy_fleet``); end to end, ``fedseg-sim`` with every codec.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from smoke_runs import rows_of, run_sim
from toy_fleet import EXAMPLES, START, Fleet

from fedseg.compression import (
    FP16Compression,
    Int8Compression,
    RandKCompression,
    TopKCompression,
    clip_encoded,
    parse_compression,
    round_seed,
    update_norm,
)
from fedseg.server.codecs import weights_from
from fedseg.server.compose import check_composition
from fedseg.settings import RunSettings

PLAIN = {"name": "none"}
SECAGG = {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2}
MEAN = (1 * 1.0 + 2 * 4.0 + 3 * -2.0) / 6  # 0.5: FedAvg's example-weighted mean of (1, 4, -2), by hand
F32 = np.zeros(4, np.float32)


@pytest.fixture(autouse=True)
def quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)


# ---- each codec on its own, by hand ----

def test_fp16_is_exact_on_representable_values_and_halves_the_bytes() -> None:
    update = [np.array([0.5, -1.25, 2.0**-10, 1024.0]), np.array(3.0)]
    like = [F32, np.array(7, np.int64)]  # a float array and an integer counter (travels whole)

    encoded = FP16Compression().encode(update, like)

    assert encoded[0].dtype == np.float16 and encoded[0].nbytes == 8 and encoded[1].dtype == np.int64
    np.testing.assert_array_equal(FP16Compression().decode(encoded, like)[0], update[0])
    assert int(FP16Compression().decode(encoded, like)[1]) == 3


def test_int8_scale_is_the_peak_over_127_and_values_on_the_grid_are_exact() -> None:
    update = [np.array([1.27, -0.635, 0.3, 0.0])]  # scale 0.01: 127, -63.5, 30, 0 steps

    encoded = Int8Compression().encode(update, [F32], rng=np.random.default_rng(0))

    assert encoded[0].dtype == np.int8 and encoded[1].dtype == np.float32
    assert encoded[1][0] == pytest.approx(0.01)
    assert [int(encoded[0][i]) for i in (0, 2, 3)] == [127, 30, 0]
    assert int(encoded[0][1]) in (-64, -63)  # -63.5 steps: either neighbour


def test_int8_stochastic_rounding_is_unbiased_with_error_below_one_step() -> None:
    update = [np.array([1.27, -0.635, 0.003, 0.0051])]
    codec, rng = Int8Compression(), np.random.default_rng(1)

    decoded = np.array([codec.decode(codec.encode(update, [F32], rng=rng), [F32])[0] for _ in range(4000)])

    assert np.abs(decoded - update[0]).max() <= 0.01 + 1e-6  # one step
    # the mean of 4000 draws is within 4 standard errors (step / 2 / sqrt(4000)) of the true value
    np.testing.assert_allclose(decoded.mean(axis=0), update[0], atol=4 * 0.005 / np.sqrt(4000))


def test_topk_keeps_the_largest_and_error_feedback_sends_the_rest_later() -> None:
    codec = TopKCompression(fraction=0.25, dense_below=1, values="float32")  # 1 of 4 values per round
    residual = np.zeros(4)

    sent = []
    for update in ([5.0, 1.0, -3.0, 0.5], [0.0, 1.0, 0.0, 0.0]):
        acc = np.array(update) + residual
        encoded = codec.encode([acc], [F32])
        sent.append(codec.decode(encoded, [F32])[0])
        residual = acc - sent[-1]

    np.testing.assert_array_equal(sent[0], [5.0, 0, 0, 0])  # round 1: the 5
    np.testing.assert_array_equal(sent[1], [0, 0, -3.0, 0])  # round 2: the -3 kept from round 1 beats 1 + 1
    np.testing.assert_array_equal(residual, [0, 2.0, 0, 0.5])
    assert encoded[0].dtype == np.uint8 and encoded[0].size == 1  # 4 positions: one byte of bitmask


def test_topk_int8_values_are_within_a_step_of_the_kept_values() -> None:
    codec = TopKCompression(fraction=0.5, dense_below=1)  # int8 values by default
    update = [np.array([1.27, -0.1, 0.3, -0.635])]  # keeps 1.27 and -0.635: scale 0.01

    encoded = codec.encode(update, [F32], rng=np.random.default_rng(0))
    decoded = codec.decode(encoded, [F32])[0]

    assert [e.dtype for e in encoded] == [np.uint8, np.int8, np.float32] and encoded[1].size == 2
    assert decoded[0] == pytest.approx(1.27) and decoded[1] == decoded[2] == 0
    assert abs(decoded[3] + 0.635) <= 0.01 + 1e-6  # -63.5 steps: either neighbour; the residual keeps the rest


def test_topk_int4_packs_two_values_a_byte_within_a_step_and_unbiased() -> None:
    codec, like = TopKCompression(fraction=0.6, dense_below=1, values="int4"), [np.zeros(6, np.float32)]
    update = [np.array([0.7, -0.01, 0.35, -0.7, 0.02, 0.0])]  # keeps 4 of 6: 0.7, 0.35, -0.7, 0.02; scale 0.1

    encoded = codec.encode(update, like, rng=np.random.default_rng(0))
    decoded = codec.decode(encoded, like)[0]

    assert [e.dtype for e in encoded] == [np.uint8, np.uint8, np.float32] and encoded[1].size == 2  # 4 values
    assert list(np.flatnonzero(np.unpackbits(encoded[0], count=6))) == [0, 2, 3, 4]
    assert encoded[2][0] == pytest.approx(0.1)
    assert decoded[0] == pytest.approx(0.7) and decoded[3] == pytest.approx(-0.7)  # on the grid: exact
    assert abs(decoded[2] - 0.35) <= 0.1 + 1e-6 and decoded[1] == decoded[5] == 0
    # Unbiased: the mean of many stochastic roundings of 0.35 (3.5 steps) is 0.35.
    mean = np.mean([codec.decode(codec.encode(update, like, rng=np.random.default_rng(i)), like)[0][2]
                    for i in range(400)])
    assert mean == pytest.approx(0.35, abs=0.01)
    with pytest.raises(ValueError, match="topk: 4 positions but 3 bytes of int4 values"):
        codec.decode([encoded[0], np.zeros(3, np.uint8), encoded[2]], like)


def test_topk_error_feedback_makes_the_sum_sent_track_the_sum_of_updates() -> None:
    codec, rng = TopKCompression(fraction=0.1, dense_below=1), np.random.default_rng(2)
    like = [np.zeros(200, np.float32)]
    residual, total_true, total_sent = np.zeros(200), np.zeros(200), np.zeros(200)

    for _ in range(300):
        update = rng.normal(0.1, 1.0, 200)  # a drift every coordinate shares, plus noise
        acc = update + residual
        sent = codec.decode(codec.encode([acc], like), like)[0]
        residual = acc - sent
        total_true, total_sent = total_true + update, total_sent + sent

    # what is owed stays bounded (the residual) while the sums grow: 300 rounds x 0.1 drift = 30 each
    np.testing.assert_allclose(total_sent + residual, total_true, atol=1e-6)
    assert np.abs(residual).max() < 8 and np.abs(total_true).mean() > 20


def test_randk_positions_come_from_the_seed_on_both_sides() -> None:
    codec, like = RandKCompression(fraction=0.5, dense_below=1), [np.zeros(8, np.float32)]
    update = [np.arange(1.0, 9.0)]

    vehicle = codec.encode(update, like, seed=round_seed(0, 1))  # only 4 values travel
    server = codec.decode(vehicle, like, seed=round_seed(0, 1))[0]

    kept = np.flatnonzero(server)
    assert vehicle[0].size == 4 and kept.size == 4
    np.testing.assert_array_equal(server[kept], update[0][kept])  # the values at the server's own positions
    np.testing.assert_array_equal(codec.positions(round_seed(0, 1), 0, 8), kept)
    assert not np.array_equal(codec.positions(round_seed(0, 2), 0, 8), kept)  # a new round, new positions
    with pytest.raises(ValueError, match="randk needs the round's seed"):
        codec.encode(update, like, seed=None)


def test_randk_without_error_feedback_rescales_to_an_unbiased_update() -> None:
    codec, like = RandKCompression(fraction=0.25, dense_below=1, error_feedback=False), [np.zeros(8, np.float32)]
    update = [np.arange(1.0, 9.0)]

    decoded = np.array([codec.decode(codec.encode(update, like, seed=s), like, seed=s)[0] for s in range(4000)])

    assert set(np.unique(decoded[0])) <= {0.0} | set(4 * update[0])  # each kept value x 8 / 2
    # each value is kept with probability 1/4 and scaled by 4: the mean is the update, within 4 standard
    # errors (the standard deviation of one draw is x * sqrt(3))
    assert np.all(np.abs(decoded.mean(axis=0) - update[0]) <= 4 * update[0] * np.sqrt(3 / 4000))


def test_encoded_update_is_clipped_to_central_dps_norm_by_its_floats() -> None:
    like = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    update = [np.array([3.0, 0.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0, 0.0])]  # norm 5
    for codec in (TopKCompression(fraction=0.25, dense_below=1), Int8Compression(), FP16Compression()):
        encoded = codec.encode(update, like, rng=np.random.default_rng(0))

        clipped = clip_encoded(codec, encoded, like, seed=None, max_norm=1.0)

        assert update_norm(codec.decode(clipped, like), like) == pytest.approx(1.0, rel=1e-3)


def test_server_refuses_encodings_that_do_not_fit_the_global_arrays() -> None:
    like = [np.zeros(4, np.float32)]
    with pytest.raises(ValueError, match="fp16: 2 encoded arrays, expected 1"):
        weights_from(FP16Compression(), [np.zeros(4), np.zeros(4)], like, seed=None)
    with pytest.raises(ValueError, match="topk: 1 positions but 2 values"):
        weights_from(TopKCompression(fraction=0.25, dense_below=1, values="float16"),
                     [np.packbits([1, 0, 0, 0]), np.zeros(2, np.float16)], like, seed=None)
    with pytest.raises(ValueError, match="randk: array #0 has 3 values, the round keeps 1"):
        weights_from(RandKCompression(fraction=0.25, dense_below=1), [np.zeros(3)], like, seed=1)


def test_malformed_codec_settings_fail_when_parsed() -> None:
    with pytest.raises(ValueError, match=r"compression.fraction=0.0 is out of range: must be > 0 and <= 1"):
        parse_compression({"name": "topk", "fraction": 0})
    with pytest.raises(ValueError, match=r"compression=gzip: valid: \['none', 'fp16', 'int8', 'topk', 'randk'\]"):
        parse_compression({"name": "gzip"})
    with pytest.raises(ValueError, match=r"unknown compression keys \['fraction'\]"):
        parse_compression({"name": "int8", "fraction": 0.5})


# ---- whole rounds through the real mods and server composition ----

def big_updates(values: tuple[float, ...] = (1.0, 4.0, -2.0)) -> list[list[np.ndarray]]:
    """Vehicle i adds ``values[i]`` to a 64x64 array, ``-values[i] / 2`` to a bias; a counter moves by 1."""
    return [[np.full((64, 64), v, np.float32), np.full(16, -v / 2, np.float32), np.array(1, np.int64)]
            for v in values]


def run(tmp: Path, name: str, compression: dict[str, Any], secagg: dict[str, Any] = PLAIN, rounds: int = 1,
        values: tuple[float, ...] = (1.0, 4.0, -2.0)) -> Fleet:
    return Fleet(big_updates(values), list(EXAMPLES), secagg, compression=compression, rounds=rounds,
                 output_dir=str(tmp / name)).run()


@pytest.mark.parametrize("codec, low, high", [("fp16", 0.50, 0.52), ("int8", 0.25, 0.28),
                                              ("topk", 0.13, 0.16), ("randk", 0.10, 0.13)])
def test_codec_bytes_up_against_none_and_the_mean_it_decodes(tmp_path: Path, codec: str, low: float,
                                                             high: float) -> None:
    plain = run(tmp_path, "none", PLAIN)
    coded = run(tmp_path, codec, {"name": codec})

    ratio = coded.rows[-1]["bytes_up"] / plain.rows[-1]["bytes_up"]
    assert low <= ratio <= high, ratio
    final = coded.globals[-1]
    changed = np.abs(final[0] - START) > 1e-6
    if codec in ("fp16", "int8"):  # constant updates are exact in both (int8: each is its array's peak)
        np.testing.assert_allclose(final[0], START + MEAN, rtol=1e-6)
    else:  # sparse: only a part of the big array moved (topk 0.3 per vehicle, randk 0.1 on all), by at
        # most the largest vehicle's update
        assert 0.05 < changed.mean() < 0.95 and np.abs(final[0] - START).max() <= 4.0 + 1e-6
    np.testing.assert_allclose(final[1], START - MEAN / 2, rtol=1e-6)  # 16 values: dense in every codec
    assert final[2] == plain.globals[-1][2]  # the counter travels whole (FedAvg then averages it as usual)


def test_randk_moves_the_round_positions_by_the_weighted_mean(tmp_path: Path) -> None:
    fleet = run(tmp_path, "randk", {"name": "randk"})

    kept = RandKCompression().positions(round_seed(fleet.settings.seed, 1), 0, 64 * 64)
    moved = np.flatnonzero(np.abs(fleet.globals[-1][0].ravel() - START) > 1e-6)
    np.testing.assert_array_equal(moved, kept)  # the server rebuilt the positions from its own seed
    np.testing.assert_allclose(fleet.globals[-1][0].ravel()[kept], START + MEAN, rtol=1e-6)


def test_topk_residual_lives_in_context_state_and_on_disk_and_is_sent_later(tmp_path: Path) -> None:
    # Every vehicle adds 2 everywhere, every round, so all pick the same positions and the global
    # model moves by exactly what each one sent. Top-k sends a tenth of what a vehicle owes, and what
    # it owes grows where it was not sent, so within ~10 rounds every position has travelled.
    fleet = run(tmp_path, "topk", {"name": "topk", "values": "float32"}, rounds=12, values=(2.0, 2.0, 2.0))

    sent = fleet.globals[-1][0] - START
    assert (np.abs(sent) > 1e-6).mean() > 0.9
    for i in range(3):
        state = fleet.grid.contexts[100 + i].state.array_records["compression.residual"].to_numpy_ndarrays()
        with np.load(tmp_path / "topk" / "compression" / f"vehicle_{i}.npz") as disk:
            np.testing.assert_array_equal(disk["arr_0"], state[0])
        # what the vehicle sent plus what it still owes is every update it made: 12 x 2
        np.testing.assert_allclose(sent + state[0], 12 * 2.0, atol=1e-4)


def test_central_dp_bounds_every_decoded_update_by_the_clipping_norm(tmp_path: Path) -> None:
    # noise 0 isolates the clipping: updates of norm >= 1 are scaled to norm 1 (0.5 per value on 4
    # values); with topk's error feedback the vehicle would otherwise send more than that later on.
    privacy = {"name": "central", "noise_multiplier": 0.0, "clipping_norm": 1.0}
    updates = [[np.full(4, v, np.float32)] for v in (1.0, 4.0, 2.0)]
    fleet = Fleet(updates, list(EXAMPLES), PLAIN, privacy=privacy, rounds=3, output_dir=str(tmp_path),
                  compression={"name": "topk", "fraction": 0.5, "dense_below": 1, "values": "float32"}).run()

    for before, after in zip(fleet.globals, fleet.globals[1:], strict=False):
        assert np.linalg.norm(after[0] - before[0]) <= 1.0 + 1e-6  # the mean of clipped updates


@pytest.mark.parametrize("codec", ["topk", "int8", "fp16"])
def test_secaggplus_refuses_codecs_whose_sum_cannot_be_decoded_saying_why(codec: str) -> None:
    settings = RunSettings.from_config({"federation": {"num_clients": 3, "min_fit_clients": 3},
                                        "secagg": SECAGG, "compression": {"name": codec}})
    why = {"topk": "topk sends each vehicle's own top coordinates: their sum cannot be decoded from a masked sum",
           "int8": "int8 scales each vehicle's arrays by that vehicle's own maximum",
           "fp16": "fp16 would save nothing"}[codec]

    with pytest.raises(ValueError, match=rf"^secagg=secaggplus cannot take compression={codec}: {why}") as err:
        check_composition(settings, partition_sizes=[8, 8, 8])
    assert str(err.value).endswith("valid with SecAgg+: ['none', 'randk']") and "\n" not in str(err.value)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_randk_under_secaggplus_gives_the_mean_on_the_round_positions(tmp_path: Path, error_feedback: bool) -> None:
    codec = {"name": "randk", "error_feedback": error_feedback}
    secure = run(tmp_path, "secure", codec, SECAGG)
    plain = run(tmp_path, "plain", codec)

    kept = RandKCompression().positions(round_seed(secure.settings.seed, 1), 0, 64 * 64)
    scale = 1.0 if error_feedback else 4096 / kept.size  # without error feedback: unbiased rescaling
    np.testing.assert_allclose(secure.globals[-1][0].ravel()[kept], START + scale * MEAN, atol=1e-4)
    np.testing.assert_allclose(secure.globals[-1][0], plain.globals[-1][0], atol=1e-4)
    assert secure.rows[-1]["secagg"]["stages"]["collect_masked_vectors"]["up"] < 0.2 * 3 * 4 * 4096


# ---- end to end: fedseg-sim with a codec, and SecAgg+ refusing topk in one line ----
# (Every codec's bytes and decoded mean go through the real mods and server above, in-process; one
# Ray run a codec would add a minute each and nothing those do not check.)


@pytest.mark.e2e
def test_smoke_with_topk_sends_a_fraction_of_the_dense_bytes_and_keeps_its_residual(tmp_path: Path) -> None:
    proc, out = run_sim(tmp_path, "topk", "compression=topk")

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out)[1:]  # rounds 1..: the server sends the dense global model down, vehicles send topk up
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["bytes_up"] < 0.2 * r["bytes_down"] for r in rows), [(r["bytes_up"], r["bytes_down"]) for r in rows]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "compression" / "vehicle_0.npz").exists()  # error feedback kept on disk


@pytest.mark.e2e
def test_secaggplus_refuses_topk_before_training_and_runs_randk(tmp_path: Path) -> None:
    bad, bad_out = run_sim(tmp_path, "topk", "secagg=secaggplus", "compression=topk")
    good, good_out = run_sim(tmp_path, "randk", "secagg=secaggplus", "compression=randk")

    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("fedseg-sim: error: secagg=secaggplus cannot take compression=topk: topk sends")
    assert not (bad_out / "metrics.jsonl").exists()
    assert good.returncode == 0, good.stderr[-3000:]
    last = [json.loads(line) for line in (good_out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["secagg"]["survivors"] == 3 and np.isfinite(last["loss"])
