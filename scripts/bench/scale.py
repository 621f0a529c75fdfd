"""How a federated run scales with its fleet: start-up, round time and peak memory at 10 to 100,000 vehicles.

Each fleet size is one real ``fedseg-sim`` run (Flower's Simulation Engine, 10 vehicles sampled per
round: ``federation.fraction_fit`` = 10/n, ``federation.min_fit_clients=10``), ``experiment=smoke``
unless Hydra overrides say otherwise; every extra argument is passed to every run. A fleet larger than
a round's sample rides as many simulation nodes as a round samples (``federation.sim_nodes``,
fedseg/vehicle_pool.py), so the 10-vehicle run has 10 nodes and so has the 100,000-vehicle run. Each
run gets an empty synthetic cache of its own, so its vehicles render their frames when first sampled,
as on a first run. Measured, with ratios against the 10-vehicle run of the same invocation:

* ``startup_s``: from launching ``fedseg-sim`` to the round-0 row in ``metrics.jsonl`` (the initial
  model evaluated on the held-out set, the server's last step before round 1 samples its vehicles):
  config, SuperLink, Ray, the fleet's nodes and the server's held-out set.
* ``first_round_s`` and ``median_round_s``: ``metrics.jsonl``'s ``round_s`` (sampling, the
  vehicles' training and aggregation) of round 1, and the median of the later rounds (6 rounds
  unless ``federation.rounds`` says otherwise). Round 1 also starts the Ray workers (each imports
  torch and the model code) and meets 10 new vehicles at every fleet size; in later rounds a large
  fleet still meets new vehicles (each renders its frames, about 0.15-0.25 s of one core at 64x64)
  while a 10-vehicle fleet's frames are cached: ``new_per_round`` counts them (vehicles of rounds 2+
  in no earlier round's ``train_s``).
* The 100,000-vehicle fleet runs twice on one synthetic cache: first as every fleet does
  (``n100000``, its vehicles' frames rendered on first use), then again (``n100000-on-disk``): the
  same seed samples the same vehicles (``fedseg/server/compose.py`` seeds the sampling), so their
  frames are on disk, as a real fleet's recordings are and as the 10-vehicle baseline's are from
  round 2. ``round_ratio_100k`` (on the ``--json`` line, null without a 100,000-vehicle run): the
  second run's median round over the baseline's, goal at most 1.2: the federation's cost, not the
  synthetic renderer's; ``round_ratio_100k_first_use`` is the first run's; beside them the first
  run's ``startup_ratio_100k`` and the larger ``peak_pss_mb_100k``.
* ``peak_mb``: the largest sum, over one poll, of the resident memory (RSS) of every process of the
  run (``fedseg-sim``, its SuperLink, the simulation and Ray processes), found by an environment
  tag they all inherit; shared pages count once per process, so this is an upper bound.
  ``peak_pss_mb`` counts shared pages proportionally: what the processes take together, the
  measure the 8 GB goal is judged by (summed RSS counts torch's shared libraries once for each of
  the run's Python processes). ``pss_mb_at_peak`` splits that peak by process.

    python scripts/bench/scale.py --resnet34 --json                    # 10 to 100,000 + ResNet-34 (~8 min alone)
    python scripts/bench/scale.py --fleets 10,1000 --json              # two fleet sizes
    python scripts/bench/scale.py --fleets 10,100 federation.rounds=6   # more rounds for the median
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fedseg.deploy.processes import tagged_pids

FLEETS = "10,100,1000,10000,100000"
SAMPLED = 10  # vehicles per round at every fleet size
ROUNDS = 6  # round 1 starts the Ray workers; the median is over rounds 2-6 (five: steadier than three)
RESNET34_FLEET = 10_000
GOAL_MB, GOAL_STARTUP_RATIO = 8192, 2.0  # the bar this bench checks: all processes within 8 GB, start-up within 2x
GOAL_ROUND_RATIO, FLAT_FLEET = 1.2, 100_000  # and the median round at 100,000 vehicles within 1.2x of 10's
BENCH_TAG = "FEDSEG_SCALE_BENCH"


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in kB; (0, 0) if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[1:]}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def _process_name(pid: int) -> str:
    """A short name for ``pid``: its program (``flwr-simulation``, ``raylet``) or Ray's title
    (``ray::ClientAppActor.run``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    program = next((w for w in words[1:] if not w.startswith("-")), words[0]) if "python" in words[0] else words[0]
    return Path(program).name


def run_fleet(vehicles: int, overrides: list[str], out: Path, poll: float, *, again: bool = False) -> dict[str, Any]:
    """One ``fedseg-sim`` run of ``vehicles`` vehicles, 10 sampled per round; its timings and peak memory.
    ``again``: a second run on the first one's synthetic cache (``-on-disk``: its vehicles' frames are there)."""
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), None)
    name = f"n{vehicles}" + (f"-{model}" if model else "")
    run_dir, tag = out / (name + ("-on-disk" if again else "")), uuid.uuid4().hex
    args = [str(Path(sys.executable).with_name("fedseg-sim")), "experiment=smoke", f"federation.rounds={ROUNDS}",
            *overrides, "run.progress=false",
            f"federation.num_clients={vehicles}", f"federation.fraction_fit={SAMPLED / vehicles:g}",
            f"federation.min_fit_clients={SAMPLED}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, BENCH_TAG: tag, "FEDSEG_DATA_CACHE": str(out / name / "cache")}
    metrics, startup, peak, peak_pss, most = run_dir / "metrics.jsonl", None, 0, 0, 0
    at_peak: dict[str, int] = {}  # PSS kB by process name when the sum peaked
    load, start = os.getloadavg()[0], time.perf_counter()
    with (out / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            pids = tagged_pids(tag, BENCH_TAG)
            memory = {p: _memory_kb(p) for p in pids}
            rss, pss = sum(m[0] for m in memory.values()), sum(m[1] for m in memory.values())
            if pss > peak_pss:
                at_peak = {}
                for p, (_, kb) in memory.items():
                    name = _process_name(p)
                    at_peak[name] = at_peak.get(name, 0) + kb
            peak, peak_pss, most = max(peak, rss), max(peak_pss, pss), max(most, len(pids))
            if startup is None and metrics.is_file() and metrics.read_text().strip():
                startup = time.perf_counter() - start
            time.sleep(poll)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"scale bench: {run_dir.name} failed (exit {proc.returncode}); see {log.name}", flush=True)
        return {"run": run_dir.name, "vehicles": vehicles, "error": f"exit {proc.returncode}, see {log.name}"}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()][1:]
    times = [row["round_s"] for row in rows]
    return {"run": run_dir.name, "vehicles": vehicles, "frames_on_disk": again, "startup_s": round(startup or wall, 1),
            "first_round_s": round(times[0], 2), "median_round_s": round(statistics.median(times[1:] or times), 2),
            "rounds": len(times), "new_per_round": new_vehicles(rows),
            "sampled": [sorted(int(v) for v in row.get("train_s") or {}) for row in rows],
            "peak_mb": round(peak / 1024), "peak_pss_mb": round(peak_pss / 1024),
            "processes": most,
            "pss_mb_at_peak": {name: round(kb / 1024) for name, kb in sorted(at_peak.items(), key=lambda x: -x[1])},
            "wall_s": round(wall, 1), "load_at_start": round(load, 1),
            "run_dir": str(run_dir)}


def new_vehicles(rows: list[dict[str, Any]]) -> list[int]:
    """For rounds 2+: how many of the round's vehicles (``train_s`` keys) trained in no earlier round."""
    seen: set[str] = set()
    counts = []
    for row in rows:
        trained = set(row.get("train_s") or {})
        counts.append(len(trained - seen))
        seen |= trained
    return counts[1:]


def flat_fleet(results: list[dict[str, Any]], vehicles: int = FLAT_FLEET) -> dict[str, Any]:
    """The ``vehicles`` runs against the baseline, if they finished: ``round_ratio_100k`` (the second run's
    median round over the baseline's: frames on disk), ``round_ratio_100k_first_use`` (the first run's),
    ``startup_ratio_100k`` and ``peak_pss_mb_100k``; empty without such runs."""
    runs = {r["frames_on_disk"]: r for r in results[1:] if r["vehicles"] == vehicles and "median_round_ratio" in r}
    if len(runs) < 2:
        return {}
    first, on_disk = runs[False], runs[True]
    if on_disk["sampled"] != first["sampled"]:  # then its frames were not all on disk: no such figure
        print(f"scale bench: {on_disk['run']} sampled other vehicles than {first['run']}", flush=True)
        return {}
    return {"round_ratio_100k": on_disk["median_round_ratio"], "round_ratio_100k_first_use": first["median_round_ratio"],
            "startup_ratio_100k": first.get("startup_ratio"),
            "peak_pss_mb_100k": max(first["peak_pss_mb"], on_disk["peak_pss_mb"])}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Start-up and round times against the first run (the 10-vehicle baseline), in place."""
    base = results[0]
    for r in results:
        for key in ("startup_s", "first_round_s", "median_round_s"):
            if key in r and key in base:
                r[key[:-2] + "_ratio"] = round(r[key] / base[key], 2)


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'run':<16s} {'vehicles':>8s} {'start-up s':>10s} {'x':>5s} {'round 1 s':>9s} {'x':>5s} "
          f"{'median round s':>14s} {'x':>5s} {'peak MB':>8s} {'PSS MB':>7s} {'procs':>5s}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:<16s} {r['vehicles']:8d} failed: {r['error']}")
            continue
        ratio = {key: f"{r[key]:5.2f}" if key in r else f"{'-':>5s}"  # no ratio without the baseline
                 for key in ("startup_ratio", "first_round_ratio", "median_round_ratio")}
        print(f"{r['run']:<16s} {r['vehicles']:8d} {r['startup_s']:10.1f} {ratio['startup_ratio']} "
              f"{r['first_round_s']:9.2f} {ratio['first_round_ratio']} {r['median_round_s']:14.2f} "
              f"{ratio['median_round_ratio']} {r['peak_mb']:8d} {r['peak_pss_mb']:7d} {r['processes']:5d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", default=FLEETS, help=f"comma list of fleet sizes, the first is the baseline "
                        f"(default {FLEETS})")
    parser.add_argument("--resnet34", action="store_true",
                        help=f"also UNet-ResNet34 (model=resnet34) at {RESNET34_FLEET} vehicles")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between memory samples (default 0.5)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args, overrides = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="scale_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    cases = [(int(n), overrides, False) for n in args.fleets.split(",")]
    cases += [(FLAT_FLEET, overrides, True)] if FLAT_FLEET in {n for n, _, _ in cases} else []  # its frames on disk
    if args.resnet34:
        cases.append((RESNET34_FLEET, [*overrides, "model=resnet34"], False))
    results = []
    for vehicles, extra, again in cases:
        print(f"scale bench: {vehicles} vehicles {' '.join(extra)}{' (frames on disk)' if again else ''} ...",
              flush=True)
        results.append(run_fleet(vehicles, extra, out, args.poll, again=again))
    add_ratios(results)
    load = os.getloadavg()
    print(f"overrides: {' '.join(overrides) or '(none)'}; {os.cpu_count()} cores, load {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; runs in {out}")
    print_table(results)
    finished = [r for r in results if "error" not in r]
    goals = {"all_finished": len(finished) == len(results),
             "peak_within_8gb": all(r["peak_pss_mb"] <= GOAL_MB for r in finished),  # PSS: see the docstring
             "startup_within_2x": all(r.get("startup_ratio", GOAL_STARTUP_RATIO + 1) <= GOAL_STARTUP_RATIO
                                      for r in finished)}  # no ratio without the baseline
    flat = flat_fleet(results)
    if flat:
        goals["round_within_1.2x_at_100k"] = flat["round_ratio_100k"] <= GOAL_ROUND_RATIO
    print(f"goals: every run finished: {goals['all_finished']}; of those, all processes within {GOAL_MB} MB (PSS): "
          f"{goals['peak_within_8gb']}; start-up within "
          f"{GOAL_STARTUP_RATIO:g}x of {results[0]['run']}: {goals['startup_within_2x']}"
          + (f"; median round at {FLAT_FLEET:,} vehicles {flat['round_ratio_100k']:.2f}x with frames on disk (goal "
             f"{GOAL_ROUND_RATIO:g}x), {flat['round_ratio_100k_first_use']:.2f}x rendering them" if flat else ""))
    if args.json:
        print(json.dumps({"overrides": overrides, "cores": os.cpu_count(), "load": [round(x, 1) for x in load],
                          "results": results, "round_ratio_100k": flat.get("round_ratio_100k"),
                          **{k: v for k, v in flat.items() if k != "round_ratio_100k"}, "goals": goals}))


if __name__ == "__main__":
    main()
