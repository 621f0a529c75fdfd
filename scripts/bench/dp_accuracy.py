"""The accuracy price of DP-SGD: the same federated run with no DP, and with DP-SGD at epsilon 8 and 3.

Runs ``fedseg-sim`` once per setting with the same seed and data (extra Hydra overrides are passed
to every run) and prints final mIoU, loss, epsilon and wall time side by side, with mIoU as a ratio
to the no-DP run measured in the same invocation.

    python scripts/bench/dp_accuracy.py                           # the default experiment
    python scripts/bench/dp_accuracy.py federation.rounds=4       # shorter, same shape
    python scripts/bench/dp_accuracy.py experiment=smoke --out /tmp/dp_acc --json   # JSON last line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "no DP": [],
    "DP-SGD eps=8": ["privacy=dpsgd", "privacy.target_epsilon=8"],
    "DP-SGD eps=3": ["privacy=dpsgd", "privacy.target_epsilon=3"],
}


def run(name: str, overrides: list[str], out: Path) -> dict:
    """One fedseg-sim run; returns its summary plus the wall time."""
    run_dir = out / name.replace(" ", "_").replace("=", "")
    exe = Path(sys.executable).with_name("fedseg-sim")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), *overrides, f"hydra.run.dir={run_dir}", "run.progress=false"],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedseg-sim failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary["final"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dp_accuracy"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    rows = {name: run(name, [*args.overrides, *extra], args.out) for name, extra in SETTINGS.items()}
    base = rows["no DP"]["miou"]
    print(f"\noverrides: {' '.join(args.overrides) or '(none)'}")
    print("| setting | final mIoU | x no-DP | loss | epsilon | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"
        print(f"| {name} | {r['miou']:.3f} | {r['miou'] / base:.2f} | {r['loss']:.3f} | {eps} | "
              f"{r['wall_s']:.0f} |")
    if args.json:
        eps8, eps3 = rows["DP-SGD eps=8"]["miou"], rows["DP-SGD eps=3"]["miou"]
        print(json.dumps({"overrides": args.overrides, "miou": {"no_dp": base, "eps8": eps8, "eps3": eps3},
                          "ratio": {"eps8": eps8 / base, "eps3": eps3 / base},
                          "wall_s": {name: r["wall_s"] for name, r in rows.items()}}))


if __name__ == "__main__":
    main()
