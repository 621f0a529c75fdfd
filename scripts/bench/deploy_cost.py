"""What a deployed round costs against a simulated one, plain and under SecAgg+, on loopback.

The same run in Flower's Simulation Engine and on its Deployment Engine (a real SuperLink and
SuperNodes on this machine), with the steady round time of each and their ratios.

Modes (``--modes``, default all, in this order):

* ``sim``: ``fedseg-sim`` (a real process: its own SuperLink in simulation mode, Ray actors as vehicles).
* ``deployed``: a real ``flower-superlink`` (TLS, node authentication) and 3 ``fedseg-vehicle`` SuperNodes
  on loopback (``tests/deploy_fleet.py``'s ``LocalFleet``, as the deploy tests use it), ``flwr run``;
  the vehicles as ``fedseg-vehicle`` starts them by default (its long-lived worker, where it has one).
* ``deployed_noworker``: the same fleet with ``fedseg-vehicle --no-worker``: one ``flwr-clientapp``
  process per message, Flower's own process model (the "before" figure). A ``fedseg-vehicle`` without
  that flag has only this path, and then runs it with no flag.

Each mode runs ``plain`` and ``secagg`` (``secagg=secaggplus``), same seed, same overrides. The
configuration: UNet-ResNet34 at 96x128 (``experiment=default``, so FedBN), 3 vehicles all sampled every round
(SecAgg+ needs at least 3), 5 rounds (``--rounds``), and a short local fit, 16 frames per vehicle
in 2 steps of 8 (1 epoch), so the ratio shows what the engine adds to a round instead of hiding it
under training (raise ``data.frames_per_vehicle`` to watch it shrink). ``round_s`` is
``metrics.jsonl``'s (the server's recorder, the same code in both engines: from sampling to the end
of aggregation); the steady round is the median of the rounds after the first ``--skip`` (1: round 1
also starts Ray's actors, a vehicle's worker, and renders each vehicle's frames into the shared cache).
Ratios are deployed over simulated, in the same run: ``ratio.round_s`` plain, ``ratio.round_s_secagg``
under SecAgg+ (``ratio_noworker``: the same for ``deployed_noworker``).

Same threads, same parallelism, so the ratio measures the engines and not contention: every vehicle
trains with 1 torch thread (simulation: ``federation.client_cpus=1``, which ``client_fn`` also sets as
torch's threads; deployed: ``fedseg-vehicle --threads 1``, the node config's ``threads``), and all 3
vehicles train at once in both: deployed, each SuperNode is its own process; in simulation Ray would
run only cores // client_cpus = 2 actors on this 2-core machine, so the bench sets
``federation.ray_cpus=3`` (Ray's ``num_cpus``, passed as ``init-args-num-cpus``): 3 actors, 3 vehicles
at once. On 2 cores both engines oversubscribe the same way.

Per message (deployed modes): each task a vehicle runs prints ``fedseg-task {json}`` to its log
(``where``: worker or process; ``launch_s``: from the task's process start to the task starting: the
imports in a process of its own, the thin shim's start and connect with the worker; ``pull_s`` and
``push_s``: getting the message and returning the reply; ``app_s``: inside the ClientApp; ``total_s``);
each run's medians over all its tasks are reported (null where the vehicles print no such lines or key).

CPU by process (``cpu``, every mode): every 0.5 s the bench reads the CPU seconds (user + system,
``/proc/PID/stat``) of each process the run started (found by the tag in their environment, Ray's
node processes included) and how many rows its ``metrics.jsonl`` holds. ``cpu.by_process`` is each
kind of process's CPU seconds per round over the steady rounds (from the row of round ``--skip`` to
the last row: a round here runs from one row to the next, so it includes the server's evaluation),
``cpu.core_s_per_round`` their sum and ``cpu.cores_busy`` that over the rounds' wall time (2 cores:
at most 2). It shows where a deployed round's time goes that a simulated one does not spend: in which
process, and whether the machine was saturated.

    python scripts/bench/deploy_cost.py --json                         # the measurement (~30 min, quiet machine)
    python scripts/bench/deploy_cost.py --modes sim,deployed --json    # after only
    python scripts/bench/deploy_cost.py --quick --modes sim,deployed_noworker --variants plain   # plumbing (~3 min)
    python scripts/bench/deploy_cost.py --rounds 3 data.frames_per_vehicle=64   # Hydra overrides go to every run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from fedseg.deploy.processes import proc_stat, tagged_pids
from fedseg.deploy.worker_link import task_records

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODES = ("sim", "deployed", "deployed_noworker")
VARIANTS = {"plain": "secagg=none", "secagg": "secagg=secaggplus"}
VEHICLES, THREADS = 3, 1
CONFIG = ["experiment=default", "model=resnet34", "data.image_size=[96,128]",
          f"federation.num_clients={VEHICLES}", f"federation.min_fit_clients={VEHICLES}",
          "federation.fraction_fit=1.0", "federation.local_epochs=1", "federation.batch_size=8",
          "data.frames_per_vehicle=16", "data.heldout_frames=16", f"federation.client_cpus={THREADS}", "seed=0"]
QUICK = ["model=tiny", "data.image_size=[64,64]", "data.frames_per_vehicle=8", "data.heldout_frames=8"]
TASK_TIMES = ("launch_s", "pull_s", "app_s", "push_s", "total_s")
BENCH_TAG = "FEDSEG_DEPLOY_COST_BENCH"
CPU_SAMPLE_S = 0.5


# ---- pure helpers (tests/test_bench_deploy_cost.py) -------------------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def task_medians(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Median of each of ``TASK_TIMES`` over ``tasks`` (null where no task has it),
    their count, where they ran and their types; ``None`` when there are none."""
    if not tasks:
        return None
    medians = {}
    for key in TASK_TIMES:
        values = [float(t[key]) for t in tasks if _number(t.get(key))]
        medians[key] = round(statistics.median(values), 4) if values else None
    types: dict[str, int] = {}
    for t in tasks:
        types[str(t.get("type"))] = types.get(str(t.get("type")), 0) + 1
    return {"tasks": len(tasks), "where": sorted({str(t.get("where")) for t in tasks}), "types": types, **medians}


def steady_round_s(rows: list[dict[str, Any]], skip: int) -> float | None:
    """Median ``round_s`` of the rounds after the first ``skip`` (round 0, the initial evaluation, is no
    round); all rounds if that leaves none; ``None`` without any."""
    times = [float(r["round_s"]) for r in rows if r.get("round", 0) >= 1 and _number(r.get("round_s"))]
    steady = times[skip:] or times
    return statistics.median(steady) if steady else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` to 3 digits; ``None`` if either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def engine_ratios(results: dict[str, dict[str, dict[str, Any]]], deployed: str) -> dict[str, float | None]:
    """Deployed mode ``deployed`` over ``sim``, steady round time: ``round_s`` plain, ``round_s_secagg``."""
    def steady(mode: str, variant: str) -> float | None:
        return results.get(mode, {}).get(variant, {}).get("round_s")

    return {"round_s": ratio(steady(deployed, "plain"), steady("sim", "plain")),
            "round_s_secagg": ratio(steady(deployed, "secagg"), steady("sim", "secagg"))}


def same_final_loss(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, bool | None]:
    """Per variant, whether every mode that ran it ended at the same loss (same seed, same run: the
    engines should agree to the last digit); ``None`` with fewer than two."""
    same: dict[str, bool | None] = {}
    for variant in VARIANTS:
        losses = [r[variant]["final_loss"] for r in results.values() if r.get(variant, {}).get("final_loss") is not None]
        same[variant] = len(set(losses)) == 1 if len(losses) > 1 else None
    return same


Sample = tuple[float, int, dict[int, tuple[str, float]]]  # (time, metrics rows, {pid: (kind, CPU s)})


def process_kind(argv: list[str]) -> str:
    """What a process is, from its command line: the program a Python runs (``flower-superlink``,
    ``fedseg-supernode``; the vehicle's worker is ``fedseg-clientapp --serve``), Ray's process title
    (``ray::ClientAppActor``), else the executable's name."""
    if not argv or not argv[0]:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    name, rest = Path(argv[0]).name, argv[1:]
    if name.startswith("python") and rest and not rest[0].startswith("-"):
        name, rest = Path(rest[0]).name, rest[1:]
    return f"{name} --serve" if "--serve" in rest else name


def steady_cpu(samples: list[Sample], skip: int) -> dict[str, Any] | None:
    """CPU per round by kind of process over the steady rounds: from the first sample whose metrics file
    holds round ``skip``'s row (rows: round 0's, then one a round) to the first that holds the last
    row. A process that ended inside the window counts with the last CPU seen of it; ``None`` without
    a whole round in the window."""
    if not samples:
        return None
    last_rows = samples[-1][1]
    start = next((s for s in samples if s[1] >= skip + 1), None)
    end = next((s for s in samples if s[1] >= last_rows), None)
    if start is None or end is None or end[1] <= start[1] or end[0] <= start[0]:
        return None
    rounds = end[1] - start[1]
    seen: dict[int, tuple[str, float]] = {}
    for sample in samples:
        if start[0] <= sample[0] <= end[0]:
            seen.update(sample[2])
    by_kind: dict[str, float] = {}
    for pid, (kind, cpu) in seen.items():
        spent = cpu - start[2].get(pid, (kind, 0.0))[1]
        by_kind[kind] = by_kind.get(kind, 0.0) + spent
    total = sum(by_kind.values())
    return {"rounds": rounds, "core_s_per_round": round(total / rounds, 2),
            "cores_busy": round(total / (end[0] - start[0]), 2),
            "by_process": {k: round(v / rounds, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
                           if v / rounds >= 0.01}}


def summarize_run(rows: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """One run's figures from its ``metrics.jsonl`` rows: steady and per-round times, the vehicles'
    median training seconds in the steady rounds, and the final loss and mIoU (same seed: the engines
    should agree)."""
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    train = [float(s) for r in rounds[skip:] for s in (r.get("train_s") or {}).values() if _number(s)]
    steady = steady_round_s(rows, skip)
    return {"round_s": None if steady is None else round(steady, 3),
            "rounds_s": [round(float(r.get("round_s", 0.0)), 3) for r in rounds],
            "train_s": round(statistics.median(train), 3) if train else None,
            "final_loss": rows[-1].get("loss") if rows else None, "final_miou": rows[-1].get("miou") if rows else None}


# ---- runs ------------------------------------------------------------------------------------------

def _rows(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []


def _row_count(metrics: Path | None) -> int:
    """Whole lines (ending in a newline) in ``metrics``; 0 while it does not exist."""
    try:
        return 0 if metrics is None else sum(1 for line in metrics.read_bytes().split(b"\n")[:-1] if line.strip())
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> tuple[str, float] | None:
    """``pid``'s kind and CPU seconds so far (user + system), or ``None`` once it is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    stat = proc_stat(pid)
    return (process_kind(argv), stat.cpu_s) if stat.state else None


class CpuSampler:
    """Every ``interval`` s, in a thread: the CPU seconds of each of a run's processes (``pids()``) and how
    many rows its metrics file (``metrics()``, ``None`` until it exists) holds."""

    def __init__(self, pids: Callable[[], list[int]], metrics: Callable[[], Path | None],
                 interval: float = 0.5) -> None:
        self.pids, self.metrics, self.interval = pids, metrics, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rows = _row_count(self.metrics())
            cpu = {pid: seen for pid in self.pids() if (seen := _cpu_seconds(pid)) is not None}
            self.samples.append((time.monotonic(), rows, cpu))


def run_sim(variant: str, overrides: list[str], out: Path, cache: Path, *, skip: int,
            timeout: float) -> dict[str, Any]:
    """One ``fedseg-sim`` run; its figures, or ``error``."""
    run_dir, tag = out / f"sim-{variant}", uuid.uuid4().hex
    cmd = [str(BIN / "fedseg-sim"), *overrides, VARIANTS[variant], f"federation.ray_cpus={VEHICLES}",
           "run.progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, BENCH_TAG: tag, "FEDSEG_DATA_CACHE": str(cache), "WANDB_MODE": "offline"}
    start = time.perf_counter()
    sampler = CpuSampler(lambda: tagged_pids(tag, BENCH_TAG), lambda: run_dir / "metrics.jsonl", CPU_SAMPLE_S)
    with (out / f"sim-{variant}.log").open("w") as log, sampler:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:g} s"
        finally:
            if proc.poll() is None:  # SIGTERM: fedseg-sim stops its SuperLink and Ray; then whatever is left
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                for pid in tagged_pids(tag, BENCH_TAG):
                    os.kill(pid, signal.SIGKILL)
    wall = round(time.perf_counter() - start, 1)
    if code != 0:
        return {"error": f"fedseg-sim: exit {code}; see {log.name}", "wall_s": wall}
    return {**summarize_run(_rows(run_dir / "metrics.jsonl"), skip), "wall_s": wall,
            "cpu": steady_cpu(sampler.samples, skip), "run_dir": str(run_dir)}


def vehicle_flags() -> str:
    """``fedseg-vehicle --help``: which options this version has."""
    return subprocess.run([str(BIN / "fedseg-vehicle"), "--help"], capture_output=True, text=True, check=False,
                          timeout=120).stdout


def run_deployed(mode: str, variants: list[str], overrides: list[str], out: Path, cache: Path,
                 vehicle_args: list[str], *, skip: int, timeout: float) -> dict[str, dict[str, Any]]:
    """A SuperLink and ``VEHICLES`` SuperNodes started with ``vehicle_args``; one ``flwr run`` per variant."""
    sys.path.insert(0, str(PROJECT / "tests"))
    from deploy_fleet import LocalFleet  # the deploy tests' fleet: real processes, all stopped on stop()

    from fedseg.deploy.certs import make_credentials, vehicle_names

    root = out / mode
    names = vehicle_names(VEHICLES)
    make_credentials(root / "certs", vehicles=names)
    fleet = LocalFleet(root, certs=root / "certs", env_extra={"FEDSEG_DATA_CACHE": str(cache),
                                                              "WANDB_MODE": "offline"})
    results: dict[str, dict[str, Any]] = {}
    try:
        (root / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=root / "server")
        for i, name in enumerate(names):
            fleet.register(root / "certs" / "vehicles" / f"{name}.pub")
            fleet.start_vehicle(name, "--partition-id", str(i), "--num-partitions", str(VEHICLES),
                                "--threads", str(THREADS), *vehicle_args)
        for variant in variants:
            seen = {name: len(fleet.log(name)) for name in names}
            start, before = time.perf_counter(), set((root / "runs").glob("*/metrics.jsonl"))

            def metrics(before: set[Path] = before) -> Path | None:  # this run's: the one that was not there
                return next((p for p in (root / "runs").glob("*/metrics.jsonl") if p not in before), None)

            with CpuSampler(lambda: tagged_pids(fleet.tag), metrics, CPU_SAMPLE_S) as sampler:
                run = fleet.run(" ".join([*overrides, VARIANTS[variant], f"deploy.output_dir={root / 'runs'}"]),
                                timeout=timeout)
            wall = round(time.perf_counter() - start, 1)
            tasks = [t for name in names for t in task_records(fleet.log(name)[seen[name]:])]
            if run.status != "finished:completed":
                (root / f"{variant}.out").write_text(run.output)
                results[variant] = {"error": f"flwr run: {run.status}; see {root / f'{variant}.out'} and "
                                             f"{root / 'logs'}", "wall_s": wall}
                continue
            run_dir = root / "runs" / str(run.run_id)
            results[variant] = {**summarize_run(_rows(run_dir / "metrics.jsonl"), skip), "wall_s": wall,
                                "per_message": task_medians(tasks), "cpu": steady_cpu(sampler.samples, skip),
                                "run_dir": str(run_dir)}
    finally:
        fleet.stop()
    return results


def mode_vehicle_args(mode: str, flags: str, poll_interval: float | None) -> list[str]:
    """``fedseg-vehicle`` options of a deployed mode (``flags``: its ``--help``)."""
    args = ["--poll-interval", f"{poll_interval:g}"] if poll_interval is not None else []
    if mode == "deployed_noworker" and "--no-worker" in flags:
        args.append("--no-worker")
    return args


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    print(f"{'mode':<18s} {'variant':<7s} {'round s':>8s} {'x sim':>6s} {'train s':>8s} {'final loss':>11s} "
          f"{'msgs':>5s} {'launch s':>8s} {'app s':>7s} {'total s':>8s}  where")
    for mode, variants in results.items():
        for variant, r in variants.items():
            if "error" in r:
                print(f"{mode:<18s} {variant:<7s} failed: {r['error']}")
                continue
            x = ratio(r["round_s"], results.get("sim", {}).get(variant, {}).get("round_s"))
            msg = r.get("per_message") or {}

            def cell(value: float | None, width: int, digits: int = 2) -> str:
                return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"

            print(f"{mode:<18s} {variant:<7s} {cell(r['round_s'], 8)} {cell(x, 6)} {cell(r['train_s'], 8)} "
                  f"{cell(r['final_loss'], 11, 5)} {msg.get('tasks', 0):5d} {cell(msg.get('launch_s'), 8)} "
                  f"{cell(msg.get('app_s'), 7)} {cell(msg.get('total_s'), 8)}  {','.join(msg.get('where', []))}")


def print_cpu(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Each run's CPU seconds per steady round by kind of process (the five largest)."""
    for mode, variants in results.items():
        for variant, r in variants.items():
            cpu = r.get("cpu")
            if cpu:
                top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu["by_process"].items())[:5])
                print(f"cpu {mode} {variant}: {cpu['core_s_per_round']:.1f} core-s a round, {cpu['cores_busy']:.2f} "
                      f"cores busy; {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} "
                        "(default: all; the ratios need sim)")
    parser.add_argument("--variants", default="plain,secagg", help="comma list of plain, secagg (default: both)")
    parser.add_argument("--rounds", type=int, default=None, help="federation.rounds (default 5; --quick 3)")
    parser.add_argument("--skip", type=int, default=1, help="first rounds left out of the steady median (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"plumbing check: {' '.join(QUICK)}")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="fedseg-vehicle --poll-interval SECONDS (default: fedseg-vehicle's own)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args, extra = parser.parse_known_args()
    modes, variants = args.modes.split(","), args.variants.split(",")
    for name, given, valid in (("--modes", modes, MODES), ("--variants", variants, tuple(VARIANTS))):
        if unknown := [v for v in given if v not in valid]:
            parser.error(f"{name} {','.join(unknown)}: valid: {', '.join(valid)}")
    rounds = args.rounds or (3 if args.quick else 5)
    overrides = [*CONFIG, *(QUICK if args.quick else []), f"federation.rounds={rounds}", *extra]
    from fedseg.deploy.runconfig import compose_overrides

    try:
        config = compose_overrides(overrides)  # bad overrides fail here, in one line, before any process starts
    except ValueError as err:
        parser.error(str(err))
    flags = vehicle_flags() if any(m != "sim" for m in modes) else ""
    if args.poll_interval is not None and "--poll-interval" not in flags:
        parser.error("--poll-interval: this fedseg-vehicle has no --poll-interval option")
    out = Path(args.out or tempfile.mkdtemp(prefix="deploy_cost_"))
    out.mkdir(parents=True, exist_ok=True)
    cache, load = out / "cache", os.getloadavg()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    vehicle_args: dict[str, list[str]] = {}
    for mode in [m for m in MODES if m in modes]:
        print(f"deploy_cost: {mode} ({', '.join(variants)}) ...", flush=True)
        if mode == "sim":
            results[mode] = {v: run_sim(v, overrides, out, cache, skip=args.skip, timeout=args.timeout)
                             for v in variants}
        else:
            vehicle_args[mode] = mode_vehicle_args(mode, flags, args.poll_interval)
            results[mode] = run_deployed(mode, variants, overrides, out, cache, vehicle_args[mode], skip=args.skip,
                                         timeout=args.timeout)
    end_load = os.getloadavg()
    print(f"{config['model']['name']} at {config['data']['image_size']}, {VEHICLES} vehicles x {THREADS} thread, "
          f"{rounds} rounds (steady: after round {args.skip}); {os.cpu_count()} cores, load {load[0]:.1f} -> "
          f"{end_load[0]:.1f}; runs in {out}")
    print_table(results)
    print_cpu(results)
    report = {"ratio": engine_ratios(results, "deployed"), "ratio_noworker": engine_ratios(results, "deployed_noworker"),
              "model": config["model"]["name"], "image_size": config["data"]["image_size"], "vehicles": VEHICLES,
              "threads": THREADS, "ray_cpus": VEHICLES, "rounds": rounds, "skip": args.skip,
              "local_fit": {"frames": config["data"]["frames_per_vehicle"], "epochs": config["federation"]["local_epochs"],
                            "batch_size": config["federation"]["batch_size"]},
              "overrides": overrides, "vehicle_args": vehicle_args, "cores": os.cpu_count(),
              "load": [round(load[0], 1), round(end_load[0], 1)], "same_final_loss": same_final_loss(results),
              "modes": results}
    print(f"deployed / simulated steady round: plain {report['ratio']['round_s']}, SecAgg+ "
          f"{report['ratio']['round_s_secagg']}; without the worker: plain {report['ratio_noworker']['round_s']}, "
          f"SecAgg+ {report['ratio_noworker']['round_s_secagg']}; same final loss in every mode: "
          f"{report['same_final_loss']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
