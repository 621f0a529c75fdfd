"""scripts/bench/deploy_cost.py's pure helpers: the vehicles' ``fedseg-task`` lines, the steady round and the
ratios (no processes; the bench itself is run by hand, docs/PERFORMANCE.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedseg.deploy.worker_link import task_line, task_records

_SPEC = importlib.util.spec_from_file_location(
    "deploy_cost", Path(__file__).resolve().parents[1] / "scripts" / "bench" / "deploy_cost.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_task_lines_are_read_from_a_vehicle_log_and_anything_else_is_skipped() -> None:
    lines = [
        "INFO :      Starting Flower SuperNode",
        'fedseg-task {"where": "process", "type": "train", "launch_s": 6.5, "app_s": 2.0, "total_s": 8.75}',
        "12:00:01 fedseg-task {\"where\": \"worker\", \"type\": \"train\", \"launch_s\": 0.25}",  # a prefixed line
        "fedseg-task {not json",
        "fedseg-task [1, 2]",
        # another process's output after a record on its line (one that printed it in two writes)
        'fedseg-task {"where": "worker", "type": "evaluate"}WARNING :   heartbeat',
    ]

    tasks = task_records("\n".join(lines))

    assert tasks == [{"where": "process", "type": "train", "launch_s": 6.5, "app_s": 2.0, "total_s": 8.75},
                     {"where": "worker", "type": "train", "launch_s": 0.25}, {"where": "worker", "type": "evaluate"}]
    assert task_records("no such lines\n") == []


def test_a_task_record_is_one_line_written_whole_and_read_back() -> None:
    line = task_line({"where": "worker", "type": "train", "total_s": 1.5})

    assert line.count("\n") == 1 and line.endswith("\n")  # one write() carries the record and its newline
    assert task_records("other output" + line + line) == [{"where": "worker", "type": "train", "total_s": 1.5}] * 2


def test_task_medians_per_key_with_null_where_no_task_has_it() -> None:
    tasks = [{"where": "worker", "type": "train", "launch_s": 0.5, "app_s": 3.0},
             {"where": "worker", "type": "train", "launch_s": 0.25, "app_s": 1.0},
             {"where": "process", "type": "evaluate", "launch_s": 7.0, "app_s": True}]  # a bool is no time

    medians = bench.task_medians(tasks)

    assert medians == {"tasks": 3, "where": ["process", "worker"], "types": {"train": 2, "evaluate": 1},
                       "launch_s": 0.5, "pull_s": None, "app_s": 2.0, "push_s": None, "total_s": None}
    assert bench.task_medians([]) is None


def test_the_steady_round_leaves_out_round_0_and_the_first_rounds() -> None:
    rows = [{"round": 0, "round_s": 0.0}, {"round": 1, "round_s": 30.0}, {"round": 2, "round_s": 4.0},
            {"round": 3, "round_s": 6.0}, {"round": 4, "round_s": 5.5}]

    assert bench.steady_round_s(rows, skip=1) == 5.5  # median of 4.0, 6.0, 5.5
    assert bench.steady_round_s(rows, skip=2) == 5.75  # median of 6.0, 5.5
    assert bench.steady_round_s(rows[:2], skip=1) == 30.0  # nothing after the skip: every round
    assert bench.steady_round_s(rows[:1], skip=1) is None


def test_ratios_are_deployed_over_simulated_and_null_where_a_side_is_missing() -> None:
    results = {"sim": {"plain": {"round_s": 4.0}, "secagg": {"round_s": 5.0}},
               "deployed": {"plain": {"round_s": 5.0}, "secagg": {"error": "flwr run: finished:failed"}},
               "deployed_noworker": {"plain": {"round_s": 60.0}, "secagg": {"round_s": 160.0}}}

    assert bench.engine_ratios(results, "deployed") == {"round_s": 1.25, "round_s_secagg": None}
    assert bench.engine_ratios(results, "deployed_noworker") == {"round_s": 15.0, "round_s_secagg": 32.0}
    assert bench.engine_ratios({"deployed": results["deployed"]}, "deployed") == {"round_s": None,
                                                                                  "round_s_secagg": None}


def test_a_run_summary_takes_training_seconds_from_the_steady_rounds_only() -> None:
    rows = [{"round": 0, "round_s": 0.0, "loss": 2.5},
            {"round": 1, "round_s": 9.0, "train_s": {"0": 7.0, "1": 8.0}},
            {"round": 2, "round_s": 4.0, "train_s": {"0": 2.0, "1": 3.0, "2": 2.5}, "loss": 2.25, "miou": 0.125}]

    summary = bench.summarize_run(rows, skip=1)

    assert summary == {"round_s": 4.0, "rounds_s": [9.0, 4.0], "train_s": 2.5, "final_loss": 2.25,
                       "final_miou": 0.125}


@pytest.mark.parametrize(("mode", "flags", "poll", "expected"), [
    ("deployed", "--no-worker --poll-interval", None, []),
    ("deployed_noworker", "--no-worker --poll-interval", 0.5, ["--poll-interval", "0.5", "--no-worker"]),
    ("deployed_noworker", "--threads", None, []),  # a fedseg-vehicle with only the per-message process
])
def test_vehicle_options_of_each_deployed_mode(mode: str, flags: str, poll: float | None,
                                               expected: list[str]) -> None:
    assert bench.mode_vehicle_args(mode, flags, poll) == expected


def test_final_losses_agree_per_variant_across_the_modes_that_ran_it() -> None:
    results = {"sim": {"plain": {"final_loss": 2.5}, "secagg": {"final_loss": 2.5}},
               "deployed": {"plain": {"final_loss": 2.5}, "secagg": {"final_loss": 2.75}},
               "deployed_noworker": {"plain": {"error": "flwr run: finished:failed"}}}

    assert bench.same_final_loss(results) == {"plain": True, "secagg": False}
    assert bench.same_final_loss({"sim": results["sim"]}) == {"plain": None, "secagg": None}


@pytest.mark.parametrize(("argv", "kind"), [
    (["/venv/bin/python3", "/venv/bin/flower-superlink", "--host", "127.0.0.1"], "flower-superlink"),
    (["/venv/bin/python3", "/venv/bin/fedseg-clientapp", "--serve", "--socket", "/tmp/w.sock"], "fedseg-clientapp --serve"),
    (["/venv/bin/python3", "/venv/bin/fedseg-clientapp", "--runtime-api-address", "127.0.0.1:9094"], "fedseg-clientapp"),
    (["ray::ClientAppActor.run_clientapp_task", ""], "ray::ClientAppActor"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_id=ab"], "raylet"),
    (["/usr/bin/python3", "-u", "script.py"], "python3"),
    ([], "?"),
])
def test_a_process_is_named_by_the_program_it_runs(argv: list[str], kind: str) -> None:
    assert bench.process_kind(argv) == kind


def test_cpu_per_round_counts_the_steady_rounds_only_by_kind_of_process() -> None:
    # rows: round 0's row, then one a round; skip=1 starts at round 1's row (2 rows) and ends at the last (4)
    samples = [
        (0.0, 0, {1: ("flower-superlink", 1.0)}),
        (5.0, 1, {1: ("flower-superlink", 3.0), 2: ("fedseg-supernode", 1.0)}),
        (10.0, 2, {1: ("flower-superlink", 5.0), 2: ("fedseg-supernode", 2.0), 3: ("fedseg-supernode", 1.0)}),
        # process 4 starts and ends inside the window (a per-message process): its last CPU seen counts
        (15.0, 3, {1: ("flower-superlink", 9.0), 2: ("fedseg-supernode", 4.0), 3: ("fedseg-supernode", 2.0),
                   4: ("fedseg-clientapp", 3.0)}),
        (20.0, 4, {1: ("flower-superlink", 13.0), 2: ("fedseg-supernode", 6.0), 3: ("fedseg-supernode", 3.0)}),
        (25.0, 4, {1: ("flower-superlink", 14.0)}),  # after the last row: not counted
    ]

    cpu = bench.steady_cpu(samples, skip=1)

    assert cpu is not None
    assert cpu["rounds"] == 2
    # superlink 13 - 5 = 8, supernodes (6 - 2) + (3 - 1) = 6, the per-message process 3: 17 over 2 rounds in 10 s
    assert cpu["by_process"] == {"flower-superlink": 4.0, "fedseg-supernode": 3.0, "fedseg-clientapp": 1.5}
    assert cpu["core_s_per_round"] == 8.5
    assert cpu["cores_busy"] == 1.7
    assert list(cpu["by_process"]) == ["flower-superlink", "fedseg-supernode", "fedseg-clientapp"]  # largest first


def test_cpu_per_round_is_null_without_a_whole_steady_round() -> None:
    assert bench.steady_cpu([], skip=1) is None
    only_round_1 = [(0.0, 1, {1: ("a", 1.0)}), (5.0, 2, {1: ("a", 2.0)})]
    assert bench.steady_cpu(only_round_1, skip=1) is None  # round 1's row is the last: nothing after it
    assert bench.steady_cpu(only_round_1, skip=0) == {
        "rounds": 1, "core_s_per_round": 1.0, "cores_busy": 0.2, "by_process": {"a": 1.0}}


def test_the_metrics_row_count_takes_whole_lines_only(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    assert bench._row_count(None) == 0
    assert bench._row_count(metrics) == 0  # not there yet
    metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "lo')  # the last row is being written
    assert bench._row_count(metrics) == 2
