"""What each update codec costs and saves: bytes up per vehicle per round and final mIoU, every codec in one
invocation with the same seed, data and model.

Each codec is a real ``fedseg-sim`` run (Flower's Simulation Engine, the real mods and composition),
one after another, on the default experiment unless Hydra overrides say otherwise; every extra
argument is passed to every run. A codec entry may carry its own options: ``topk:fraction=0.2``
runs ``compression=topk compression.fraction=0.2``. ``bytes up`` is ``metrics.jsonl``'s ``bytes_up``
(the encoded arrays' serialized size) divided by the vehicles that answered, averaged over rounds.

    python scripts/bench/compression.py --json                        # the default experiment (~35-40 min)
    python scripts/bench/compression.py --json federation.rounds=4    # shortened
    python scripts/bench/compression.py --codecs none,topk,topk:fraction=0.2 experiment=smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CODECS = "none,fp16,int8,topk,randk"
GOAL_SAVING, GOAL_MIOU_POINTS = 8.0, 1.0  # the bar this bench checks: 8x fewer bytes up, at most 1 mIoU point lost


def codec_overrides(entry: str) -> list[str]:
    """``topk:fraction=0.2`` -> ``["compression=topk", "compression.fraction=0.2"]``."""
    name, *options = entry.split(":")
    return [f"compression={name}", *(f"compression.{option}" for option in options)]


def run_codec(entry: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One ``fedseg-sim`` run with this codec; its per-round bytes and final metrics."""
    exe = Path(sys.executable).with_name("fedseg-sim")
    run_dir = out / entry.replace(":", "_").replace("=", "")
    args = [str(exe), "run.progress=false", f"hydra.run.dir={run_dir}", *overrides, *codec_overrides(entry)]
    start = time.perf_counter()
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - start
    if proc.returncode != 0:  # reported in its row; the other codecs still run
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        print(f"compression bench: {entry} failed (exit {proc.returncode}): {error}", flush=True)
        return {"codec": entry, "error": error, "wall_s": round(wall, 1), "run_dir": str(run_dir)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0 and r.get("clients")]
    per_vehicle = [r["bytes_up"] / r["clients"] for r in trained]
    return {"codec": entry, "bytes_up_per_vehicle": sum(per_vehicle) / len(per_vehicle),
            "miou": rows[-1]["miou"], "loss": rows[-1]["loss"], "rounds": rows[-1]["round"],
            "wall_s": round(wall, 1), "run_dir": str(run_dir)}


def add_ratios(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Saving and mIoU change against ``none`` (when measured); the best codec that meets the goal."""
    finished = [r for r in results if "error" not in r]
    base = next((r for r in finished if r["codec"] == "none"), None)
    if base is None:
        return None
    for r in finished:
        r["saving"] = base["bytes_up_per_vehicle"] / r["bytes_up_per_vehicle"]
        r["miou_points"] = 100 * (r["miou"] - base["miou"])
    meets = [r for r in finished if r["saving"] >= GOAL_SAVING and r["miou_points"] >= -GOAL_MIOU_POINTS]
    return max(meets, key=lambda r: r["miou"]) if meets else None


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'codec':<22s} {'MB up/veh/round':>15s} {'x fewer':>8s} {'final mIoU':>10s} {'vs none':>8s} "
          f"{'wall s':>7s}")
    for r in results:
        if "error" in r:
            print(f"{r['codec']:<22s} failed: {r['error']}")
            continue
        saving = f"{r['saving']:7.1f}x" if "saving" in r else "-"
        points = f"{r['miou_points']:+7.2f}" if "miou_points" in r else "-"
        print(f"{r['codec']:<22s} {r['bytes_up_per_vehicle'] / 1e6:15.3f} {saving:>8s} {r['miou']:10.4f} "
              f"{points:>8s} {r['wall_s']:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default=CODECS, help=f"comma list (default {CODECS}); name:key=value:...")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on the last line")
    args, overrides = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="compression_bench_"))
    results = []
    for entry in args.codecs.split(","):
        print(f"compression bench: {entry} ...", flush=True)
        results.append(run_codec(entry, overrides, out))
    best = add_ratios(results)
    print(f"overrides: {' '.join(overrides) or '(default experiment)'}; runs in {out}")
    print_table(results)
    print(f"goal (>= {GOAL_SAVING:g}x fewer bytes up, <= {GOAL_MIOU_POINTS:g} mIoU point below none): "
          + (f"met by {best['codec']}" if best else "not met"))
    failed = [r["codec"] for r in results if "error" in r]
    if args.json:
        print(json.dumps({"overrides": overrides, "results": results,
                          "goal_met_by": best["codec"] if best else None, "failed": failed}))
    if failed:
        raise SystemExit(f"compression bench: {len(failed)} codec run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
