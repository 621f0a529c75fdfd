"""Federated learning quality against the centralized model: an ablation of the levers, one invocation.

Runs ``fedseg-train`` (the centralized baseline) and ``fedseg-sim`` once per lever combination, one
run at a time, with the same seed and data; ``train.epochs`` stays null, so the baseline trains the
same total local epochs as the federated run (``federation.rounds x federation.local_epochs``).
Levers that change what training does to frames (``federation.augment``, ``federation.lr_schedule``)
apply to the baseline too, so a combination with them gets its own baseline run, and every ratio is
federated mIoU over the centralized mIoU *with the same shared levers*. Every setting names each
lever (strategy, local BatchNorm, augmentation, schedule), so the table does not move when the
defaults do. Extra arguments are Hydra overrides for every run. Wall time is per run; the machine's
load average (1 min) is printed before each run.

    python scripts/bench/fl_quality.py --json                                  # the default experiment
    python scripts/bench/fl_quality.py --json federation.rounds=6              # the screening proxy
    python scripts/bench/fl_quality.py --only fedavg,fedavgm --reuse federation.rounds=6
    python scripts/bench/fl_quality.py experiment=smoke --out /tmp/flq --json  # seconds, a plumbing check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OFF = ["strategy=fedavg", "federation.local_norm=none", "federation.augment=[]",
       "federation.lr_schedule=constant"]
COSINE, AUGMENT = "federation.lr_schedule=cosine", "federation.augment=[hflip,scale,color]"
# Each setting's overrides on top of OFF (later overrides win in Hydra).
SETTINGS: dict[str, list[str]] = {
    "fedavg": [],
    "fedprox": ["strategy=fedprox"],
    "fedavgm": ["strategy=fedavgm"],
    "silobn": ["federation.local_norm=stats"],
    "fedbn": ["federation.local_norm=affine"],
    "augment": [AUGMENT],
    "cosine": [COSINE],
    "fedavgm+cosine": ["strategy=fedavgm", COSINE],
    "fedavgm+cosine+silobn": ["strategy=fedavgm", COSINE, "federation.local_norm=stats"],
    "fedavgm+cosine+augment": ["strategy=fedavgm", COSINE, AUGMENT],
}
SHARED = ("federation.augment=", "federation.lr_schedule=", "federation.lr_final=")  # the baseline's too


def shared_levers(overrides: list[str]) -> list[str]:
    """The overrides the centralized baseline takes as well (augmentation, lr schedule), last one wins."""
    chosen: dict[str, str] = {}
    for item in overrides:
        for prefix in SHARED:
            if item.startswith(prefix):
                chosen[prefix] = item
    return list(chosen.values())


def run(exe: str, overrides: list[str], run_dir: Path, reuse: bool) -> dict[str, Any]:
    """One ``fedseg-sim``/``fedseg-train`` run into ``run_dir``: its final row and wall time (``--reuse``:
    a finished run's own record)."""
    record = run_dir / "bench.json"
    if reuse and record.exists():
        return json.loads(record.read_text())
    load = os.getloadavg()[0]
    print(f"{exe} {' '.join(overrides)}  (load {load:.1f})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name(exe)), *overrides, f"hydra.run.dir={run_dir}",
                           "run.progress=false"], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{exe} {' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    result = {"miou": final["miou"], "loss": final["loss"], "wall_s": time.perf_counter() - t0, "load": load,
              "overrides": overrides}
    record.write_text(json.dumps(result))
    return result


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-" else "_" for c in text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--only", default=",".join(SETTINGS), help=f"settings to run, of {list(SETTINGS)}")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_fl_quality"))
    parser.add_argument("--reuse", action="store_true", help="reuse runs already finished under --out")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if unknown := [n for n in names if n not in SETTINGS]:
        raise SystemExit(f"--only: unknown {unknown}; valid: {list(SETTINGS)}")
    rows: dict[str, dict[str, Any]] = {}
    central: dict[str, dict[str, Any]] = {}
    for name in names:
        overrides = [*OFF, *SETTINGS[name], *args.overrides]
        shared = shared_levers(overrides)
        key = " ".join(shared)
        if key not in central:
            central[key] = run("fedseg-train", [*args.overrides, *shared], args.out / slug(f"central {key}"),
                               args.reuse)
        rows[name] = {**run("fedseg-sim", overrides, args.out / slug(name), args.reuse), "central": key}
    print(f"\noverrides: {' '.join(args.overrides) or '(none)'}")
    print("| setting | fedseg-sim mIoU | fedseg-train mIoU | x centralized | sim wall s | train wall s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        c = central[r["central"]]
        print(f"| {name} | {r['miou']:.3f} | {c['miou']:.3f} | {r['miou'] / c['miou']:.2f} | {r['wall_s']:.0f} | "
              f"{c['wall_s']:.0f} | {r['load']:.1f} |")
    if args.json:
        ratios = {name: r["miou"] / central[r["central"]]["miou"] for name, r in rows.items()}
        print(json.dumps({
            "overrides": args.overrides,
            "miou": {name: r["miou"] for name, r in rows.items()},
            "central_miou": {key or "plain": c["miou"] for key, c in central.items()},
            "ratio": ratios,
            "best": max(ratios, key=lambda n: ratios[n]),
            "wall_s": {name: r["wall_s"] for name, r in rows.items()},
            "central_wall_s": {key or "plain": c["wall_s"] for key, c in central.items()},
        }))


if __name__ == "__main__":
    main()
