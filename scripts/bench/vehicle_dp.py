"""Vehicle-level DP at fleet scale: no DP vs vehicle-level epsilon 8 and 3 on one fleet, one invocation.

1. Public pretraining: ``fedseg-train experiment=dp_pretrain`` with the fleet's model (the embedded
   synthetic towns are public; other towns than the fleet's), cached in ``<out>/public_pretraining``
   and reused by later invocations with the same settings. Its checkpoint is every run's initial model.
2. ``fedseg-sim experiment=vehicle_dp`` (10,000 vehicles x 8 frames, 500 sampled a round without
   replacement, 15 rounds, the tiny UNet (109,093 parameters) at 48x64; conf/experiment/vehicle_dp.yaml
   says why) with no DP, and with
   ``privacy=central`` at vehicle-level epsilon 8 and 3: the noise multiplier is calibrated here with
   the run's own accountant (``fedseg.server.central_dp.calibrate_noise_multiplier``, delta =
   min(1e-5, 0.1 / vehicles) <= 1 / fleet size). The private runs use the levers on by default below:
   the whole (small) model trained, adaptive clipping, and server momentum on the noised mean. Each
   private run audits itself (``privacy.audit=true``: Andrew et al.'s canary vehicles in a separate audit
   run), so its row has the audit's epsilon beside the accountant's.

Prints final mIoU of the pretrained start (round 0 of the no-DP run), no DP, eps8 and eps3; ratios to
no DP and the share of the no-DP gain over the start that epsilon 8 keeps; epsilon and delta per row;
wall time per run and the load average around the invocation. ``--ablation`` adds epsilon-8 rows with
one lever changed each. Extra Hydra overrides go to every federated run.

    python scripts/bench/vehicle_dp.py --json                  # ~45 min on 2 idle cores (the first time)
    python scripts/bench/vehicle_dp.py --ablation --json       # + 5 epsilon-8 rows (~65 min more; one at 1/4 the fleet)
    python scripts/bench/vehicle_dp.py --ablation --reuse --json   # the ablation after a finished --json run
    python scripts/bench/vehicle_dp.py --smoke --json          # plumbing check: tiny model and fleet, ~6 min
    python scripts/bench/vehicle_dp.py --rounds 10 --vehicles 2000 --per-round 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from fedseg.privacy import default_delta
from fedseg.server.central_dp import calibrate_noise_multiplier

# The private runs' levers (each one changed alone in --ablation). clipping_norm: adaptive clipping's
# initial norm, also the fixed norm of the fixed-clipping row: 0.75, where adaptive clipping from 0.5
# settled (0.74-0.77 after rounds 6-8) for the whole tiny model's update in a probe on this fleet's
# towns. Flower's default start, 0.1, clips such an update to a seventh, and adaptive clipping raises C
# by at most 10% a round, so in 15 rounds it would not catch up.
PRIVATE = ["privacy=central", "privacy.trainable=all", "privacy.clipping=adaptive", "privacy.clipping_norm=0.75",
           "privacy.audit=true"]
ABLATION = {  # epsilon 8, one lever changed; (overrides, (vehicles, per round) or None: the bench's fleet)
    # The same clipping and trained part without the noise (epsilon unbounded): what the noise costs, apart
    # from what clipping costs against no DP.
    "eps8 without noise": (["privacy.noise_multiplier=0"], None),
    "eps8 trainable=norm": (["privacy.trainable=norm"], None),  # normalization affines and head only
    "eps8 fixed clipping": (["privacy.clipping=fixed"], None),
    "eps8 fedavg": (["strategy.server_momentum=0.0", "strategy.server_learning_rate=1.0"], None),  # no momentum
    "eps8 fleet / 4": ([], 4),
}
# The fleet's model (conf/experiment/vehicle_dp.yaml), which the public pretraining must share.
PRETRAIN_MODEL = ["model=tiny", "data.image_size=[48,64]"]
# --smoke: 20 vehicles, 4 a round, 2 rounds; the tiny UNet at 32x32, 4 frames a vehicle; a 1-epoch pretraining.
SMOKE_FLEET = ["data.image_size=[32,32]", "data.frames_per_vehicle=4", "data.heldout_frames=8", "federation.local_epochs=1",
               "federation.batch_size=4"]
SMOKE_PRETRAIN = ["model=tiny", "data.image_size=[32,32]", "train.epochs=1", "data.frames_per_vehicle=8",
                  "federation.num_clients=2", "data.heldout_frames=8"]


def run(command: str, name: str, overrides: list[str], run_dir: Path, reuse: bool = False) -> dict:
    """One ``fedseg-sim``/``fedseg-train`` run: its summary's final row, its round-0 mIoU and wall time
    (``reuse``: a run this bench finished in ``run_dir`` before with the same overrides, not run again)."""
    record = run_dir / "bench.json"
    kept = json.loads(record.read_text()) if reuse and record.exists() else None
    reused = kept is not None and kept["overrides"] == overrides
    if reused:
        print(f"{name}: reusing {run_dir}", flush=True)
        wall, load = kept["wall_s"], kept["load"]
    else:
        exe = Path(sys.executable).with_name(command)
        load = os.getloadavg()[0]
        print(f"{name}: {command} {' '.join(overrides)} (load {load:.1f})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([str(exe), *overrides, f"hydra.run.dir={run_dir}", "run.progress=false"],
                              check=False, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:  # reported in its row; the other rows still run
            lines = [line for line in proc.stderr.strip().splitlines() if "HYDRA_FULL_ERROR" not in line]
            error = (lines or ["no output"])[-1][:300]
            print(f"{name}: {command} failed: {error}", flush=True)
            return {"miou": None, "error": error, "run_dir": str(run_dir), "wall_s": wall}
        record.write_text(json.dumps({"overrides": overrides, "wall_s": wall, "load": load}))
    summary = json.loads((run_dir / "summary.json").read_text())
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {**summary["final"], "start_miou": first.get("miou"), "audit_epsilon": summary.get("audit_epsilon"),
            "run_dir": str(run_dir), "wall_s": wall, "load_at_start": load, "reused": reused}


def pretrained(out: Path, overrides: list[str]) -> dict:
    """The public pretraining, reused from ``out`` when a finished one has the same overrides."""
    run_dir = out / "public_pretraining"
    key = run_dir / "bench_overrides.json"
    if (run_dir / "checkpoints" / "global.pt").exists() and key.exists() and json.loads(key.read_text()) == overrides:
        print(f"public pretraining: reusing {run_dir}", flush=True)
        return {**json.loads((run_dir / "summary.json").read_text())["final"], "run_dir": str(run_dir),
                "wall_s": 0.0, "cached": True}
    result = run("fedseg-train", "public pretraining", overrides, run_dir)
    if "error" not in result:
        key.write_text(json.dumps(overrides))
    return {**result, "cached": False}


def merged(*groups: list[str]) -> list[str]:
    """Hydra overrides, a later value of a key replacing an earlier one (a lever changes one setting)."""
    return [f"{key}={value}" for key, value in dict(o.split("=", 1) for group in groups for o in group).items()]


def fleet_overrides(vehicles: int, per_round: int, rounds: int) -> list[str]:
    return [f"federation.num_clients={vehicles}", f"federation.fraction_fit={per_round / vehicles}",
            f"federation.min_fit_clients={per_round}", f"federation.rounds={rounds}"]


def private(epsilon: float, vehicles: int, per_round: int, rounds: int) -> tuple[list[str], float]:
    """Overrides for vehicle-level ``epsilon`` on this fleet: the noise multiplier the accountant calibrates.
    Adaptive clipping's count noise is Flower's per_round / 20 (Andrew et al.'s choice) where that is
    above z / 2, else z (a small fleet: the update noise rises to 1.15 z)."""
    z = calibrate_noise_multiplier(epsilon, vehicles=vehicles, sampled=per_round, rounds=rounds,
                                   delta=default_delta(vehicles))
    count = [] if per_round / 20 > z / 2 else [f"privacy.clipped_count_stddev={z:.4f}"]
    return [*PRIVATE, f"privacy.noise_multiplier={z:.4f}", *count], z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every federated run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_vehicle_dp"))
    parser.add_argument("--vehicles", type=int, default=10000, help="fleet size")
    parser.add_argument("--per-round", type=int, default=500, help="vehicles sampled each round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ablation", nargs="?", const=",".join(ABLATION), default="", metavar="ROWS",
                        help=f"also epsilon-8 rows with one lever changed (all, or a comma list of: {list(ABLATION)})")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse runs this bench finished under --out with the same overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny model and fleet: a plumbing check")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.ablation.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in ABLATION]:
        parser.error(f"unknown --ablation rows {unknown}; valid: {list(ABLATION)}")
    t0, load_start = time.perf_counter(), os.getloadavg()
    fleet, pretrain_extra = ["experiment=vehicle_dp"], PRETRAIN_MODEL
    vehicles, per_round, rounds = args.vehicles, args.per_round, args.rounds
    if args.smoke:
        vehicles, per_round, rounds = 20, 4, 2
        fleet, pretrain_extra = [*fleet, *SMOKE_FLEET], SMOKE_PRETRAIN
    pretrain = pretrained(args.out, ["experiment=dp_pretrain", *pretrain_extra])
    if "error" in pretrain:
        raise SystemExit(f"vehicle_dp: the public pretraining failed: {pretrain['error']}")
    fleet += [f"model.init={Path(pretrain['run_dir']).resolve() / 'checkpoints' / 'global.pt'}", *args.overrides]
    sizes = fleet_overrides(vehicles, per_round, rounds)
    rows, noise = {"no_dp": run("fedseg-sim", "no_dp", [*fleet, *sizes], args.out / "no_dp", args.reuse)}, {}
    for name, eps in (("eps8", 8.0), ("eps3", 3.0)):
        extra, noise[name] = private(eps, vehicles, per_round, rounds)
        rows[name] = run("fedseg-sim", name, [*fleet, *sizes, *extra], args.out / name, args.reuse)
    for name in chosen:
        levers, shrink = ABLATION[name]
        n, m = (vehicles // shrink, per_round // shrink) if shrink else (vehicles, per_round)
        overrides = merged(fleet, fleet_overrides(n, m, rounds), private(8.0, n, m, rounds)[0], levers)
        noise[name] = float(dict(o.split("=", 1) for o in overrides)["privacy.noise_multiplier"])
        run_dir = args.out / "".join(c if c.isalnum() else "_" for c in name)
        rows[name] = run("fedseg-sim", name, overrides, run_dir, args.reuse)
    report(rows, noise, pretrain, vehicles=vehicles, per_round=per_round, rounds=rounds, fleet=fleet,
           wall_s=time.perf_counter() - t0, load=(load_start, os.getloadavg()), as_json=args.json)


def finite(value: float | None) -> float | None:
    """An epsilon for the JSON line: an unbounded one (no noise) is null, as JSON has no infinity."""
    return value if value is None or math.isfinite(value) else None


def report(rows: dict[str, dict], noise: dict[str, float], pretrain: dict, *, vehicles: int, per_round: int,
           rounds: int, fleet: list[str], wall_s: float, load: tuple, as_json: bool) -> None:
    """The table, and (``as_json``) one JSON object on the last line; a failed row is null and in "errors"."""
    if "error" in rows["no_dp"]:
        raise SystemExit(f"vehicle_dp: the no-DP run failed ({rows['no_dp']['error']}): no ratio to report")
    base, start = rows["no_dp"]["miou"], rows["no_dp"]["start_miou"]

    def ratio(r: dict) -> float | None:
        return None if r["miou"] is None else r["miou"] / base

    def gain_kept(r: dict) -> float | None:
        return None if r["miou"] is None or base == start else (r["miou"] - start) / (base - start)

    print(f"\nfleet: {vehicles} vehicles, {per_round} a round, {rounds} rounds; pretrained start mIoU {start:.3f}")
    print("| row | final mIoU | x no-DP | gain kept | epsilon | audit epsilon | delta | noise multiplier | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | - | - | - | - | - | - | {r['wall_s']:.0f} |")
            continue
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"
        delta = f"{r['delta']:.1e}" if r.get("delta") is not None else "-"
        audit = f"{r['audit_epsilon']:.2f}" if r.get("audit_epsilon") is not None else "-"
        z = f"{noise[name]:.3f}" if name in noise else "-"
        print(f"| {name} | {r['miou']:.3f} | {ratio(r):.2f} | {gain_kept(r) or 0:.2f} | {eps} | {audit} | {delta} | {z} | "
              f"{r['wall_s']:.0f} |")
    if not as_json:
        return
    ablation = {n: {"miou": r["miou"], "ratio": ratio(r), "gain_kept": gain_kept(r), "epsilon": finite(r.get("epsilon")),
                    "audit_epsilon": r.get("audit_epsilon")}
                for n, r in rows.items() if n in ABLATION}
    print(json.dumps({
        "pretrained": start, "no_dp": base, "eps8": rows["eps8"]["miou"], "eps3": rows["eps3"]["miou"],
        "ratio": {"eps8": ratio(rows["eps8"]), "eps3": ratio(rows["eps3"])},
        "gain_kept": {"eps8": gain_kept(rows["eps8"])},
        "vehicles": vehicles, "vehicles_per_round": per_round, "rounds": rounds,
        "epsilon": {n: finite(r.get("epsilon")) for n, r in rows.items()}, "delta": {n: r.get("delta") for n, r in rows.items()},
        "audit_epsilon": {n: r.get("audit_epsilon") for n, r in rows.items()},
        "noise_multiplier": noise, "ablation": ablation, "fleet": fleet,
        "pretraining": {"miou_own_heldout": pretrain.get("miou"), "cached": pretrain["cached"]},
        "errors": {n: r["error"] for n, r in rows.items() if "error" in r},
        "wall_s": {"public pretraining": pretrain["wall_s"], **{n: r["wall_s"] for n, r in rows.items()},
                   "total": wall_s},
        "reused": [n for n, r in rows.items() if r.get("reused")],
        "load_at_start": {n: r.get("load_at_start") for n, r in rows.items()},
        "load": {"start": list(load[0]), "end": list(load[1])}}))


if __name__ == "__main__":
    main()
