"""The accuracy price of DP-SGD on the declared DP benchmark fleet: no DP vs epsilon 8 and 3, one invocation.

1. Public pretraining: ``fedseg-train experiment=dp_pretrain`` (the embedded synthetic scenes are
   public data; other towns than the fleet's), whose checkpoint is every run's initial global model.
2. ``fedseg-sim experiment=dp_bench model.init=<that checkpoint>`` (4 vehicles x 256 frames, other
   towns) with no DP and with DP-SGD at epsilon 8 and 3 (``privacy=dpsgd``: decoder-only training,
   its default, an expected batch of 128 of each vehicle's 256 frames per noised step and a 12x larger
   lr), same seed and data.

Prints final mIoU, epsilon and wall time side by side, with mIoU as a ratio to the no-DP run of the
same invocation. ``--ablation`` adds one epsilon-8 run per lever with that lever off (no pretraining,
8-frame steps, all parameters trained) and vehicle-level DP (``privacy=central``) on a fleet of 40
vehicles with 32 frames each, 10 sampled a round. Extra Hydra overrides go to every federated run.

    python scripts/bench/dp_accuracy.py --json                 # JSON on the last line
    python scripts/bench/dp_accuracy.py --ablation --json      # + the ablation rows
    python scripts/bench/dp_accuracy.py federation.rounds=2    # shorter, same shape
    python scripts/bench/dp_accuracy.py --pretrained outputs/bench_dp_accuracy/public_pretraining
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FLEET = ["experiment=dp_bench"]
# DP-SGD's levers: 128-frame expected batches (2 noised steps a round instead of 32: sampling rate 1/2)
# and a 12x larger lr (fewer steps, each averaging 16x more clipped gradients against noise that grows
# far less), decoder only (default). Chosen by epsilon-8 pilots on this fleet (docs/PERFORMANCE.md "DP-SGD").
DP = ["privacy=dpsgd", "privacy.expected_batch_size=128", "federation.lr=0.006"]
SETTINGS = {
    "no DP": [],
    "DP-SGD eps=8": [*DP, "privacy.target_epsilon=8"],
    "DP-SGD eps=3": [*DP, "privacy.target_epsilon=3"],
}
ABLATION = {  # epsilon 8 with one lever off; None: no pretrained start
    "eps=8, no pretraining": ([*DP, "privacy.target_epsilon=8"], None),
    "eps=8, 8-frame steps, lr as no DP": (["privacy=dpsgd", "privacy.target_epsilon=8"], True),
    "eps=8, all parameters": ([*DP, "privacy.target_epsilon=8", "privacy.trainable=all"], True),
    "central DP, 40 vehicles, 10 a round": (["privacy=central", "privacy.noise_multiplier=1.0",
                                             "federation.num_clients=40", "federation.fraction_fit=0.25",
                                             "federation.min_fit_clients=10", "data.frames_per_vehicle=32",
                                             "federation.local_epochs=2"], True),
}


def run(command: str, name: str, overrides: list[str], out: Path) -> dict:
    """One ``fedseg-sim``/``fedseg-train`` run; returns its summary's final row, the run dir and wall time."""
    run_dir = out / name.replace(" ", "_").replace("=", "").replace(",", "")
    exe = Path(sys.executable).with_name(command)
    print(f"{name}: {command} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), *overrides, f"hydra.run.dir={run_dir}", "run.progress=false"],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:  # reported in its row; the other rows still run
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        print(f"{name}: {command} failed: {error}", flush=True)
        return {"miou": None, "error": error, "run_dir": str(run_dir), "wall_s": time.perf_counter() - t0}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary["final"], "run_dir": str(run_dir), "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every federated run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dp_accuracy"))
    parser.add_argument("--ablation", action="store_true", help="also one run per lever turned off")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="a finished `fedseg-train experiment=dp_pretrain` run directory to reuse")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.pretrained is not None:
        final = json.loads((args.pretrained / "summary.json").read_text())["final"]
        pretrain = {**final, "run_dir": str(args.pretrained), "wall_s": 0.0}
    else:
        pretrain = run("fedseg-train", "public pretraining", ["experiment=dp_pretrain"], args.out)
    init = f"model.init={Path(pretrain['run_dir']).resolve() / 'checkpoints' / 'global.pt'}"
    fleet = [*FLEET, *args.overrides]
    rows = {name: run("fedseg-sim", name, [*fleet, init, *extra], args.out) for name, extra in SETTINGS.items()}
    if args.ablation:
        for name, (extra, pretrained) in ABLATION.items():
            rows[name] = run("fedseg-sim", name, [*fleet, *([init] if pretrained else []), *extra], args.out)
    if "error" in pretrain or "error" in rows["no DP"]:
        raise SystemExit("dp_accuracy: the public pretraining or the no-DP run failed; no ratio to report")
    base = rows["no DP"]["miou"]
    print(f"\nfleet: {' '.join(fleet)}; public pretraining alone: mIoU {pretrain['miou']:.3f} on its own "
          "held-out towns")
    print("| setting | final mIoU | x no-DP | epsilon | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | - | - | {r['wall_s']:.0f} |")
            continue
        print(f"| {name} | {r['miou']:.3f} | {r['miou'] / base:.2f} | {eps} | {r['wall_s']:.0f} |")
    if args.json:  # a failed row is null (strict JSON: no NaN) and named in "errors"
        def ratio(r: dict) -> float | None:
            return None if r["miou"] is None else r["miou"] / base

        eps8, eps3 = rows["DP-SGD eps=8"], rows["DP-SGD eps=3"]
        print(json.dumps({
            "fleet": fleet, "pretrain_miou": pretrain["miou"],
            "miou": {"no_dp": base, "eps8": eps8["miou"], "eps3": eps3["miou"]},
            "ratio": {"eps8": ratio(eps8), "eps3": ratio(eps3)},
            "epsilon": {name: r.get("epsilon") for name, r in rows.items()},
            "ablation": {name: {"miou": r["miou"], "ratio": ratio(r)} for name, r in rows.items() if name in ABLATION},
            "errors": {name: r["error"] for name, r in rows.items() if "error" in r},
            "wall_s": {"public pretraining": pretrain["wall_s"], **{n: r["wall_s"] for n, r in rows.items()},
                       "total": time.perf_counter() - t0}}))


if __name__ == "__main__":
    main()
