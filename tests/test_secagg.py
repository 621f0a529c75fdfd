"""SecAgg+: Flower's protocol driven end to end in-process (LoopbackGrid), golden numbers by hand.

Every vehicle is a toy NumPyClient that adds a known update to the global arrays, behind the real
client mods (delta codec, range check, Flower's secaggplus_mod and fixedclipping_mod); the server
side is the real DefaultWorkflow + SecAggPlusFit + SecureSumStrategy + RoundRecorder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from smoke_runs import rows_of, run_sim
from toy_fleet import EXAMPLES, START, UPDATES, Fleet, toy_updates

from fedseg.secagg import (
    PACKED_RECORD,
    PACKED_SHAPES,
    FixedPoint,
    SecAggRangeError,
    SecAggSpec,
    aggregate_error_bound,
    auto_quantization_range,
    decode_delta,
    encode_delta,
    pack_masked,
    resolve_shares,
    unpack_masked,
)
from fedseg.server.compose import check_composition, compose_server
from fedseg.server.grids import GridWrapper
from fedseg.server.secagg import SecAggRoundError
from fedseg.settings import RunSettings

SECAGG = {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2}
MEAN = (1 * 1.0 + 2 * 4.0 + 3 * -2.0) / 6  # 0.5: FedAvg's example-weighted mean of UPDATES, by hand


def bound(examples: tuple[int, ...], peak: float, spec: dict[str, Any] = SECAGG) -> float:
    """The codec's error bound for this fleet, plus float32 rounding of the global arrays."""
    qr = spec.get("quantization_range") or auto_quantization_range(len(examples))
    return aggregate_error_bound(examples, clipping_range=64.0, quantization_range=qr,
                                 max_weight=max(examples), peak=peak) + 1e-6


def test_secure_aggregate_equals_the_hand_computed_weighted_mean() -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG).run()

    final = fleet.globals[-1]
    tol = bound(EXAMPLES, peak=4.0)
    assert tol < 1e-5  # the bound is tight enough for the assertions below to mean something
    np.testing.assert_allclose(final[0], np.full((2, 3), START + MEAN), atol=tol)
    np.testing.assert_allclose(final[1], np.full(4, START - MEAN / 2), atol=tol)
    assert final[0].dtype == np.float32  # decoded back into the global dtype, not Flower's float64
    plain = Fleet(toy_updates(), list(EXAMPLES), {"name": "none"}).run().globals[-1]
    np.testing.assert_allclose(final[0], plain[0], atol=tol)


def test_server_never_receives_a_single_vehicles_update() -> None:
    # Prepare: 1000-element updates, so that statistics over one masked vector are meaningful.
    updates = [[np.full(1000, v, np.float32)] for v in UPDATES]
    fleet = Fleet(updates, list(EXAMPLES), SECAGG).run()

    replies = fleet.grid.received
    assert len(replies) == 4 * 3  # four stages, three vehicles
    qr = auto_quantization_range(3)
    for reply in replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no arrays in clear
        config = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS not in config:
            continue
        i = reply.metadata.src_node_id - 100
        vectors = cast(list[bytes], config[Key.MASKED_PARAMETERS])
        masked = bytes_to_ndarray(vectors[1])  # [0] is the masked weight factor
        # What the vehicle would send unmasked: its weighted update on Flower's grid, all within [0, qr].
        w = EXAMPLES[i] / max(EXAMPLES)
        clear = (UPDATES[i] * w + 64.0) * qr / 128.0
        assert np.median(np.abs(masked - clear)) > qr / 100
        assert np.mean(masked > qr) > 0.5  # uniform over [0, 2**32): 3/4 lie where no clear value can
    np.testing.assert_allclose(fleet.globals[-1][0], START + MEAN, atol=bound(EXAMPLES, peak=4.0))


@pytest.mark.parametrize("how", ["vanish", "crash"])
def test_vehicle_lost_after_key_sharing_leaves_the_mean_of_the_others(how: str) -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, crash=(1,) if how == "crash" else ())
    if how == "vanish":  # vehicle 1 drives out of coverage after it shared its key shares
        fleet.grid.vanish(101, 1, "collect_masked_vectors")

    fleet.run()

    expected = (1 * 1.0 + 3 * -2.0) / 4  # -1.25: vehicles 0 and 2 only
    np.testing.assert_allclose(fleet.globals[-1][0], START + expected, atol=bound((1, 3), peak=2.0))
    row = fleet.rows[-1]
    assert row["clients"] == 2 and row["train_loss"] == pytest.approx((1 * 0.0 + 3 * 2.0) / 4)
    assert row["secagg"]["dropped"] == 1 and row["secagg"]["failed"] is False


def test_vehicle_lost_during_unmasking_still_counts() -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG)
    fleet.grid.vanish(101, 1, "unmask")  # its masked vector is in the sum; neighbours hold its shares

    fleet.run()

    np.testing.assert_allclose(fleet.globals[-1][0], START + MEAN, atol=bound(EXAMPLES, peak=4.0))
    assert fleet.rows[-1]["secagg"]["stages"]["unmask"]["replied"] == 2


def test_resumed_run_aggregates_securely_and_records_the_protocol() -> None:
    # A resumed run's outermost strategy is the round offset, not the secure sum; the SecAgg+ fit round
    # reads the round's outcome from the shared notes (it once looked for the secure sum by type on the
    # strategy Flower hands it, and raised TypeError).
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, rounds=2).run(start_round=1)

    np.testing.assert_allclose(fleet.globals[-1][0], START + MEAN, atol=bound(EXAMPLES, peak=4.0))
    assert [row["round"] for row in fleet.rows] == [2]
    assert fleet.rows[0]["secagg"]["survivors"] == 3 and fleet.rows[0]["secagg"]["failed"] is False


def test_round_below_threshold_keeps_the_global_model_and_the_run_goes_on() -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, rounds=2)
    fleet.grid.vanish(101, 1, "collect_masked_vectors")
    fleet.grid.vanish(102, 1, "collect_masked_vectors")  # 1 survivor < threshold 2

    fleet.run()

    np.testing.assert_array_equal(fleet.globals[1][0], START)  # round 1: the initial model, untouched
    # round 2: every vehicle is back
    np.testing.assert_allclose(fleet.globals[2][0], START + MEAN, atol=bound(EXAMPLES, peak=4.0))
    assert fleet.rows[1]["secagg"]["failed"] is True and fleet.rows[1]["clients"] == 0
    assert fleet.rows[2]["secagg"]["failed"] is False and fleet.rows[2]["clients"] == 3


def test_round_below_threshold_stops_the_run_when_configured() -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), {**SECAGG, "on_failure": "stop"}, rounds=2)
    fleet.grid.vanish(101, 1, "share_keys")
    fleet.grid.vanish(102, 1, "share_keys")

    with pytest.raises(SecAggRoundError, match=r"round 1 failed: only 1 of 3 vehicles answered stage 'share"):
        fleet.run()


@pytest.mark.parametrize("secagg", [SECAGG, {"name": "none"}])
def test_vehicle_that_skipped_training_is_left_out_as_in_a_plain_run(secagg: dict[str, Any]) -> None:
    fleet = Fleet(toy_updates(), list(EXAMPLES), secagg, skip=(1,)).run()

    np.testing.assert_allclose(fleet.globals[-1][0], START + (1 * 1.0 + 3 * -2.0) / 4,
                               atol=bound((1, 3), peak=2.0))
    assert fleet.rows[-1]["skipped"] == ["101"] and fleet.rows[-1]["clients"] == 2  # node 101: vehicle 1


@pytest.mark.parametrize("how", ["vanish", "crash"])
def test_central_dp_round_with_a_dropout_fails_cleanly(how: str) -> None:
    # Central DP's noise is calibrated to the sampled vehicles: a round that lost one is discarded.
    privacy = {"name": "central", "noise_multiplier": 0.0, "clipping_norm": 1.0}
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, privacy=privacy, rounds=2,
                  crash=(1,) if how == "crash" else ())
    if how == "vanish":
        fleet.grid.vanish(101, 1, "collect_masked_vectors")

    fleet.run()

    np.testing.assert_array_equal(fleet.globals[1][0], START)
    assert fleet.rows[1]["secagg"]["failed"] is True and fleet.rows[2]["secagg"]["failed"] is False


def test_updates_of_most_vehicles_outside_the_range_stop_with_the_setting_to_change() -> None:
    fleet = Fleet(toy_updates((1.0, 40.0, -40.0)), list(EXAMPLES), {**SECAGG, "clipping_range": 8.0})

    # 40 * (2 / 3 examples/max_weight) = 26.7 > 8: Flower would clip it to 8 without a word.
    with pytest.raises(SecAggRangeError, match=r"reaches 26.67.*clipping_range=8.*clipping_range>=40"):
        fleet.run()


def test_one_vehicle_outside_the_range_fails_its_round_only() -> None:
    # A single vehicle (faulty, or lying in its error text) cannot stop the fleet: it drops out of the
    # round, and the others' sum is applied.
    fleet = Fleet(toy_updates((1.0, 40.0, -2.0)), list(EXAMPLES), {**SECAGG, "clipping_range": 8.0}, rounds=2)

    fleet.run()

    # Vehicles 0 and 2 are summed: (1 * 1.0 + 3 * -2.0) / 4 = -1.25 a round.
    assert [row["round"] for row in fleet.rows] == [0, 1, 2]
    assert all(row["secagg"]["dropped"] == 1 and not row["secagg"]["failed"] for row in fleet.rows[1:])
    assert "SecAggRangeError" in fleet.rows[1]["failure"]
    np.testing.assert_allclose(fleet.globals[2][0], START - 2 * 1.25)


class WeightSlotTamper(GridWrapper):
    """Node 100's masked weight factor shifted by ``shift`` (mod 2**32) on its way to the server: what a
    vehicle that changed its own secaggplus_mod can send (masks cancel, so the unmasked sum of the
    weights shifts by the same amount)."""

    def __init__(self, inner: Any, shift: int) -> None:
        super().__init__(inner)
        self.shift = shift

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.src_node_id == 100 and PACKED_RECORD in reply.content.array_records:
                record = reply.content.array_records[PACKED_RECORD]
                packed = record.to_numpy_ndarrays()[0].copy()  # [0]: the weight factor, first array
                packed[0] = (int(packed[0]) + self.shift) % 2**32
                reply.content.array_records[PACKED_RECORD] = type(record)([packed])
        return replies


@pytest.mark.parametrize(("total", "problem"), [(1, r"the unmasked mean reaches .* beyond the 96"),
                                                (0, r"array #0 of the unmasked sum is not finite")])
def test_a_sum_no_in_range_fleet_can_produce_is_not_applied(total: int, problem: str) -> None:
    # Prepare: the weights' sum is 2 x qr (1/3 + 2/3 + 3/3 of qr); node 100 shifts it to `total`, which
    # multiplies the mean by 2 x qr (or divides by 0). Honest vehicles stay within +-64 x weight, so no
    # element of their mean can pass (3 x 64 + 3 steps) / 2 = 96.
    qr = auto_quantization_range(3)
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, rounds=2)
    fleet.grid = WeightSlotTamper(fleet.grid, total - 2 * qr)  # type: ignore[assignment]

    # Execute
    fleet.run()

    # Assert: no round applied it (the model stays at START), each row says why, the run finished.
    for global_ in fleet.globals:
        np.testing.assert_array_equal(global_[0], START)
    for row in fleet.rows[1:]:
        assert row["secagg"]["failed"] is True
        assert re.search(problem, row["secagg"]["rejected"]), row["secagg"]["rejected"]


def test_honest_vehicles_at_the_edge_of_the_range_pass_the_sum_check() -> None:
    # Each sends update x examples / max_weight just inside +-8: 23.9/3, 11.9 x 2/3, 7.9 x 3/3.
    spec = {**SECAGG, "clipping_range": 8.0}
    fleet = Fleet(toy_updates((23.9, 11.9, 7.9)), list(EXAMPLES), spec).run()

    expected = (23.9 * 1 + 11.9 * 2 + 7.9 * 3) / 6  # 11.9: near FixedPoint's bound (3 x 8 + ...) / 2 = 12
    np.testing.assert_allclose(fleet.globals[-1][0], START + expected, atol=1e-5)
    assert fleet.rows[-1]["secagg"]["failed"] is False


def test_fixed_point_sum_bound_by_hand() -> None:
    # Weights 1/4 and 1 (max_weight 4), step 2 x 8 / 16 = 1: (2 x 8 + 3 x 1) / 1.25 = 15.2; the
    # skipped vehicle (0 examples) adds rounding but no value.
    point = FixedPoint(clipping_range=8.0, quantization_range=16, max_weight=4.0)

    assert point.sum_bound([1, 4, 0]) == pytest.approx(15.2)
    assert point.sum_problem([np.array([15.2, -15.0])], [1, 4, 0]) is None
    assert "reaches 15.3" in (point.sum_problem([np.array([0.0, -15.3])], [1, 4, 0]) or "")


@pytest.mark.parametrize(("claim", "reason"), [
    ({"metrics": {"loss": "low"}}, "metric loss='low' is not a finite number >= 0"),
    ({"examples": 4}, "claims 4 examples, above the 3 a vehicle may weigh"),
])
def test_a_bad_reply_under_secaggplus_leaves_the_round_unapplied_and_the_run_goes_on(
        claim: dict[str, Any], reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: vehicle 2 (node 102) says something the server cannot believe. The sum holds every
    # survivor's vector, so the server cannot leave it out: the round is void. A count above the cap
    # needs the vehicle's own range check off (a vehicle that changed its code); Flower's mod then
    # weighs it 4/3 and clips, so the sum itself looks in range.
    monkeypatch.setattr("fedseg.clients.mods.check_secagg_range", lambda *args, **kwargs: None)
    fleet = Fleet(toy_updates(), list(EXAMPLES), SECAGG, claims={2: claim}, rounds=2)

    # Execute
    fleet.run()

    # Assert: neither round applied, each row names node 102 and why, the run finished.
    assert [r["round"] for r in fleet.rows] == [0, 1, 2]
    for global_, row in zip(fleet.globals[1:], fleet.rows[1:], strict=True):
        np.testing.assert_array_equal(global_[0], START)
        assert row["rejected"] == [{"vehicle": "102", "partition": 2, "reason": row["rejected"][0]["reason"]}]
        assert row["rejected"][0]["reason"].startswith(reason)
        assert row["secagg"]["failed"] is True and "node 102's reply" in row["secagg"]["rejected"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_weighted_sum_strategies_match_their_plain_runs(strategy: str) -> None:
    secure = Fleet(toy_updates(), list(EXAMPLES), SECAGG, strategy=strategy, rounds=2).run().globals
    plain = Fleet(toy_updates(), list(EXAMPLES), {"name": "none"}, strategy=strategy, rounds=2).run().globals

    for s, p in zip(secure[1:], plain[1:], strict=True):
        assert np.abs(p[0] - START).max() > 1e-3  # the strategy moved the model
        np.testing.assert_allclose(s[0], p[0], atol=1e-5)


def test_central_dp_clipping_happens_before_masking() -> None:
    # Noise 0 isolates the clipping: every update (norm >= 1) is scaled to norm 1 on its vehicle.
    privacy = {"name": "central", "noise_multiplier": 0.0, "clipping_norm": 1.0}
    updates = [[np.full(4, v, np.float32)] for v in (1.0, 4.0, 2.0)]
    fleet = Fleet(updates, list(EXAMPLES), SECAGG, privacy=privacy).run()

    # each clipped update is 1/sqrt(4) = 0.5 per element, so their weighted mean is too
    np.testing.assert_allclose(fleet.globals[-1][0], START + 0.5, atol=bound(EXAMPLES, peak=1.0))


def test_row_counts_the_bytes_every_stage_really_carried() -> None:
    secure = Fleet(toy_updates(), list(EXAMPLES), SECAGG).run().rows[-1]
    plain = Fleet(toy_updates(), list(EXAMPLES), {"name": "none"}).run().rows[-1]

    stages = secure["secagg"]["stages"]
    assert list(stages) == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert secure["bytes_up"] == sum(s["up"] for s in stages.values())
    assert secure["bytes_up"] > 4 * plain["bytes_up"]  # keys and shares dwarf 10 floats per vehicle


def test_masked_vectors_travel_packed_to_32_bits_and_cost_no_more_than_plain_float32() -> None:
    # 40 arrays of 1000 values: Flower would send 40 int64 arrays (8 bytes a value) per vehicle.
    updates = [[np.full(1000, v, np.float32) for _ in range(40)] for v in UPDATES]
    fleet = Fleet(updates, list(EXAMPLES), SECAGG)
    wire: list[tuple[list[str], list[str]]] = []  # each stage-2 reply as it left the vehicle
    deliver = fleet.grid._deliver

    def spy(msg: Any) -> Any:
        reply = deliver(msg)
        if reply.has_content() and PACKED_RECORD in reply.content.array_records:
            packed = reply.content.array_records[PACKED_RECORD]["0"]
            config = reply.content.config_records[RECORD_KEY_CONFIGS]
            wire.append(([packed.dtype, str(packed.shape)], list(config)))
        return reply

    fleet.grid._deliver = spy  # type: ignore[method-assign]
    secure = fleet.run().rows[-1]
    plain = Fleet(updates, list(EXAMPLES), {"name": "none"}).run().rows[-1]

    assert wire == [(["uint32", "(40001,)"], [PACKED_SHAPES])] * 3  # the weight factor plus 40 x 1000 values
    assert secure["bytes_up"] <= plain["bytes_up"]  # keys and shares cost less than 40 .npy headers
    np.testing.assert_allclose(fleet.globals[-1][5], START + MEAN, atol=bound(EXAMPLES, peak=4.0))


@pytest.mark.parametrize("modulus, dtype", [(2**32, np.uint32), (2**20, np.uint32), (2**16, np.uint16),
                                            (2**8, np.uint8)])
def test_pack_masked_round_trips_in_the_narrowest_unsigned_type(modulus: int, dtype: type) -> None:
    vectors = [np.array([modulus - 1], np.int64), np.arange(6, dtype=np.int64).reshape(2, 3), np.array(5)]

    packed, shapes = pack_masked(vectors, modulus)
    back = unpack_masked(packed, shapes)

    assert packed.dtype == dtype and packed.size == 8 and shapes == [1, 1, 2, 2, 3, 0]
    for v, b in zip(vectors, back, strict=True):
        np.testing.assert_array_equal(b, v)
    with pytest.raises(ValueError, match="outside"):
        pack_masked([np.array([modulus])], modulus)


# ---- configuration: impossible settings fail before training, with their message ----

def settings_for(num_clients: int = 3, strategy: str = "fedavg", privacy: str = "none",
                 **secagg: Any) -> RunSettings:
    return RunSettings.from_config({
        "federation": {"num_clients": num_clients, "min_fit_clients": 2}, "strategy": {"name": strategy},
        "privacy": {"name": privacy}, "secagg": {**SECAGG, **secagg}})


@pytest.mark.parametrize("settings, message", [
    (settings_for(num_clients=2), r"needs at least 3 vehicles per round, got 2"),
    (settings_for(num_clients=4, num_shares=5, reconstruction_threshold=3), r"num_shares=5 exceeds the 4"),
    (settings_for(reconstruction_threshold=3), r"threshold=3 must be at least 2 and below num_shares=3"),
    (settings_for(num_clients=5, num_shares=4, reconstruction_threshold=3), r"num_shares=4 must be odd"),
    (settings_for(num_clients=5, num_shares=5, reconstruction_threshold=2), r"exceed half of num_shares=5"),
    (settings_for(strategy="fedmedian"), r"strategy=fedmedian needs each update; valid: \['fedavg'"),
    (settings_for(num_clients=5, quantization_range=2**30), r"overflows: 5 vehicles x 1073741824.*536870912"),
    (settings_for(num_shares=1.5), r"num_shares=1.5: a float is a fraction in \(0, 1\]"),
    (settings_for(max_weight=4), r"max_weight=4 is below the 8 frames of the largest vehicle"),
])
def test_impossible_configurations_are_rejected(settings: RunSettings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_composition(settings, partition_sizes=[8, 8, 8])


@pytest.mark.parametrize("block, message", [
    ({"name": "secaggplus", "clipping": 8}, r"unknown secagg keys \['clipping'\]"),
    ({"name": "secaggplus", "num_shares": "three"}, r"secagg.num_shares='three': expected an integer or a number"),
    ({"name": "secaggplus", "clipping_range": -1}, r"secagg.clipping_range=-1.0 is out of range: must be > 0"),
    ({"name": "secaggplus", "on_failure": "retry"}, r"secagg.on_failure='retry': expected 'skip' \| 'stop'"),
    ({"name": "secaggplus", "max_weight": 0}, r"secagg.max_weight=0.0 is out of range: must be > 0"),
    ({"name": "secaggplus", "quantization_range": 2**31},
     r"secagg.quantization_range=2147483648 is out of range: must be >= 2 and <= 1.07374e\+09"),
    ({"name": "secagg"}, r"secagg=secagg: valid: \['none', 'secaggplus'\]"),
])
def test_malformed_secagg_blocks_fail_when_parsed(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunSettings.from_config({"secagg": block})


def test_possible_configurations_pass_and_plain_runs_are_left_alone() -> None:
    fraction = settings_for(num_clients=10, num_shares=0.5, reconstruction_threshold=0.6)
    check_composition(fraction)  # no error
    assert resolve_shares(SecAggSpec(num_shares=0.5, reconstruction_threshold=0.6), 10) == (5, 3)
    plain = RunSettings.from_config({"secagg": {"name": "none"}, "strategy": {"name": "fedmedian"}})
    parts = compose_server(plain, on_round=lambda row, resume: None)
    assert parts.fit_workflow is None and parts.strategy is parts.recorder


def test_finest_grid_that_cannot_overflow_by_hand() -> None:
    # n * q < 2**32: 3 -> 2**30 (capped by int32 rounding), 4 -> 2**29 (4 * 2**30 wraps), 30 -> 2**27.
    assert [auto_quantization_range(n) for n in (3, 4, 30, 1000)] == [2**30, 2**29, 2**27, 2**22]


def test_delta_codec_round_trips_weights_and_counters() -> None:
    local: list[np.ndarray] = [np.array([1.5, -2.0], np.float32), np.array(7, np.int64)]
    global_: list[np.ndarray] = [np.array([1.0, 1.0], np.float32), np.array(5, np.int64)]

    delta = encode_delta(local, global_)
    back = decode_delta(global_, [delta[0], delta[1] - 1e-7])  # quantization noise on a counter

    np.testing.assert_array_equal(delta[0], [0.5, -3.0])
    assert back[0].dtype == np.float32 and back[1].dtype == np.int64 and int(back[1]) == 7


# ---- end to end: the smoke run under SecAgg+ against the plain smoke run (same seed) ----





@pytest.mark.e2e
def test_smoke_under_secaggplus_matches_the_plain_run(tmp_path: Path) -> None:
    plain, plain_out = run_sim(tmp_path, "plain")
    secure, secure_out = run_sim(tmp_path, "secagg", "secagg=secaggplus")

    assert plain.returncode == 0, plain.stderr[-3000:]
    assert secure.returncode == 0, secure.stderr[-3000:]
    p, s = rows_of(plain_out)[-1], rows_of(secure_out)[-1]
    assert abs(s["miou"] - p["miou"]) <= 0.01 and abs(s["loss"] - p["loss"]) <= 0.02 * p["loss"]
    # keys and shares included, packed masked vectors cost no more than the plain float32 weights
    assert s["secagg"]["survivors"] == 3 and s["bytes_up"] <= p["bytes_up"]
    assert {"loss.png", "miou.png"} <= {f.name for f in (secure_out / "plots").iterdir()}
    assert json.loads((secure_out / "summary.json").read_text())["secagg"]["name"] == "secaggplus"


@pytest.mark.e2e
def test_impossible_secagg_setting_fails_in_one_line_before_any_vehicle_starts(tmp_path: Path) -> None:
    proc, out = run_sim(tmp_path, "bad", "secagg=secaggplus", "federation.num_clients=2",
                        "federation.min_fit_clients=2")

    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedseg-sim: error: secagg=secaggplus needs at least 3")
    assert not (out / "metrics.jsonl").exists()
