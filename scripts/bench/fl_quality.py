"""Federated against centralized quality, compared three ways, and the levers that give steps back; one invocation.

Every run is a real ``fedseg-sim`` or ``fedseg-train`` (the centralized baseline: every vehicle's frames
pooled), one at a time, the same seed and data. Federated over centralized held-out mIoU:

* ``equal_epochs``: the default experiment (UNet-ResNet34, 4 non-IID vehicles, 12 rounds x 2 local
  epochs) against ``fedseg-train`` at the same 24 epochs;
* ``equal_fleet_time``: the same federated run against the baseline after as many *sequential* steps
  as the fleet took with its vehicles in parallel (each round its busiest vehicle's steps, recorded
  per vehicle: 12 rounds x 2 epochs x 8 batches = 192; 6 epochs of the pooled 256 frames), read off
  the same baseline run's per-epoch rows (constant lr, so its epoch 6 is a 6-epoch run's end);
* ``converged``: both trained until held-out mIoU stops improving (``early_stop``: no gain above
  0.5 points in a window of the same fleet time, 5 of the baseline's epochs in sequential steps:
  5 x 32 = 160 steps, 10 of the default's 16-step rounds), on a backbone and size for which that fits
  in the bench's time (``CONVERGE``: UNet-ResNet18 at 64x96, the same fleet); caps 80 rounds and 100
  epochs. Two pairs: from random initialisation (``converged_random_init``) and from the public pretraining
  (``converged``: ``experiment=dp_pretrain``, 512 frames of towns the fleet never drives,
  with the fleet's model; the start segmentation models are trained from in practice, where smp's
  encoders default to ImageNet weights, which nothing here can download). The JSON's ``ratio.converged``
  is the pair from the public pretraining, ``ratio.converged_random_init`` the other;
  ``--no-public-start`` skips the first.

With ``--converged-levers equal_global_batch,plateau`` (of ``CONVERGED_LEVERS``), a lever is also run to
convergence the same way, with its own ``converged`` ratio: against the same baseline, or, for a lever
both runs follow (``plateau``: the lr drops where the rule first fires), against a baseline run with it.

Then each lever, a setting, federated on the ``CONVERGE`` setup for 6 rounds' worth of epochs (12),
each row's ratio at equal epochs and at equal fleet time against the ``converged`` baseline's curve
(interpolated between epochs where the sequential steps fall between). The ``default`` row is the
converged run's first 6 rounds (constant lr: what a 6-round run writes).

Writes ``<out>/plots/time_to_accuracy.png`` (the default experiment's pair) and
``time_to_accuracy_levers.png`` (the converged pair and every lever): mIoU against the fleet's
training seconds (vehicles in parallel) and against frames trained. Each federated run is also
started with ``compare=`` its baseline, so its own ``plots/time_to_accuracy.png`` holds both curves.
Wall time is per run; the machine's load average (1 min) is printed before each run.

    python scripts/bench/fl_quality.py --json                             # everything (~2 h alone on 2 cores)
    python scripts/bench/fl_quality.py --json --levers cyclic,fedexp      # some levers
    python scripts/bench/fl_quality.py --json --reuse                     # runs already under --out count
    python scripts/bench/fl_quality.py --json --reuse --converged-levers equal_global_batch   # + that lever converged
    python scripts/bench/fl_quality.py --smoke --json --out /tmp/flq      # minutes: a plumbing check
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

import numpy as np

from fedseg.plots import plot_time_to_accuracy
from fedseg.quality import Progress, converged_at, cumulative_steps, read_rows, run_progress, sequential_steps

WINDOW, MIN_DELTA = 5, 0.005  # convergence: no gain above half a point in 5 baseline epochs' sequential steps
DEFAULT: list[str] = []  # the default experiment as `fedseg-sim` runs it
CONVERGE = ["model=resnet18", "data.image_size=[64,96]"]
CAPS = {"rounds": 80, "epochs": 100}
LEVER_ROUNDS = 6  # 12 epochs: the lever screening proxy of earlier measurements
# Each lever: its federated overrides, and how many rounds make LEVER_ROUNDS rounds' epochs.
LEVERS: dict[str, tuple[list[str], int]] = {
    "default": ([], 1),  # the default experiment's aggregation (FedBN): the converged run's first rounds
    # One vehicle a round: 4 rounds see what one FedAvg round sees; BatchNorm travels with the model.
    "cyclic": (["strategy=cyclic", "federation.local_norm=none"], 4),
    "equal_global_batch": (["federation.equal_global_batch=true"], 1),  # vehicles at batch 8 / 4 = 2
    "fedexp": (["strategy=fedexp"], 1),
    # Server momentum at an effective rate eta / (1 - beta) of 1 (FedAvg's), and of 2.
    "fedavgm_eff1": (["strategy=fedavgm", "strategy.server_momentum=0.9", "strategy.server_learning_rate=0.1"], 1),
    "fedavgm_eff2": (["strategy=fedavgm", "strategy.server_momentum=0.5", "strategy.server_learning_rate=1.0"], 1),
}
RUN_BY_DEFAULT = [name for name in LEVERS if name != "fedavgm_eff2"]
# Levers also run to convergence (the converged comparison's caps and window), each its own ratio.
# Each: its overrides, and whether the baseline takes them too (a schedule both runs can follow), in which
# case the lever's ratio is against a baseline run of its own.
CONVERGED_LEVERS: dict[str, tuple[list[str], bool]] = {
    "equal_global_batch": (["federation.equal_global_batch=true"], False),
    # The lr drops tenfold where the rule first fires; the run stops where it fires again (both runs).
    "plateau": (["federation.lr_schedule=plateau"], True),
}
# The public pretraining the converged comparison's second pair starts from (conf/experiment/dp_pretrain.yaml:
# 512 frames of other towns than the fleet's, seed 1001, 8 epochs), with the fleet's model and normalization.
PUBLIC_PRETRAIN = ["experiment=dp_pretrain", "model.norm=auto"]
SMOKE_PRETRAIN = ["model=tiny", "data.image_size=[64,64]", "train.epochs=1", "data.frames_per_vehicle=8",
                  "federation.num_clients=2", "data.heldout_frames=8"]
SMOKE = ["experiment=smoke", "federation.num_clients=4", "federation.min_fit_clients=4", "federation.local_epochs=2"]


def run(exe: str, overrides: list[str], run_dir: Path, reuse: bool) -> dict[str, Any]:
    """One ``fedseg-sim``/``fedseg-train`` run into ``run_dir``: its rows, summary, wall time and load
    (``--reuse``: a finished run's own record, when it ran with the same overrides)."""
    record = run_dir / "bench.json"
    if not (reuse and record.exists() and json.loads(record.read_text())["overrides"] == overrides):
        load = os.getloadavg()[0]
        print(f"{exe} {' '.join(overrides)}  (load {load:.1f})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).with_name(exe)), *overrides, f"hydra.run.dir={run_dir}",
                               "run.progress=false"], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{exe} {' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
        record.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "load": load, "overrides": overrides}))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**json.loads(record.read_text()), "rows": read_rows(run_dir), "summary": summary}


def run_config(result: dict[str, Any]) -> dict[str, Any]:
    return result["summary"].get("config") or {}


def curve(result: dict[str, Any], label: str | None = None) -> Progress:
    """The run's mIoU against fleet seconds, frames and sequential steps (:func:`fedseg.quality.run_progress`)."""
    return run_progress(result["rows"], result["summary"], label)


def central_at(central: dict[str, Any], steps: float) -> float:
    """The baseline's held-out mIoU after ``steps`` sequential steps, interpolated between its epochs
    (flat past its last epoch)."""
    c = curve(central)
    return float(np.interp(steps, c.steps, c.miou))


def central_at_epoch(central: dict[str, Any], epoch: int) -> float:
    return float(np.interp(epoch, [r["round"] for r in central["rows"]], [r["miou"] for r in central["rows"]]))


def converged_miou(result: dict[str, Any], window_steps: int) -> tuple[int, float, bool]:
    """(round or epoch, mIoU, whether it converged) where ``result`` converged by the bench's rule (no gain
    above ``MIN_DELTA`` in ``window_steps`` sequential steps), else its last row (it hit the cap)."""
    miou = [r["miou"] for r in result["rows"]]
    at = converged_at(miou, window=window_steps, min_delta=MIN_DELTA, steps=cumulative_steps(result["rows"]))
    done, at = at is not None, len(miou) - 1 if at is None else at
    return int(result["rows"][at]["round"]), float(miou[at]), done


def converged_pair(central: dict[str, Any], fed: dict[str, Any], window_steps: int) -> dict[str, Any]:
    """A converged comparison: each run where it converged (or its cap), and federated over centralized."""
    (c_epoch, c_miou, c_done), (f_round, f_miou, f_done) = (converged_miou(central, window_steps),
                                                             converged_miou(fed, window_steps))
    return {"start_miou": fed["rows"][0]["miou"], "federated": f_miou, "centralized": c_miou, "ratio": f_miou / c_miou,
            "rounds": f_round, "epochs": c_epoch, "federated_converged": f_done, "centralized_converged": c_done,
            "wall_s": {"central": central["wall_s"], "federated": fed["wall_s"]}}


def truncated(result: dict[str, Any], rounds: int) -> dict[str, Any]:
    """``result`` as if it had stopped after ``rounds`` rounds (constant lr: the same rows a shorter run writes)."""
    return {**result, "rows": [r for r in result["rows"] if r["round"] <= rounds]}


def lever_row(fed: dict[str, Any], central: dict[str, Any], epochs: int) -> dict[str, Any]:
    steps, miou = curve(fed).steps[-1], fed["rows"][-1]["miou"]
    return {"miou": miou, "rounds": fed["rows"][-1]["round"], "sequential_steps": steps,
            "ratio_equal_epochs": miou / central_at_epoch(central, epochs),
            "ratio_equal_fleet_time": miou / central_at(central, steps),
            "wall_s": fed["wall_s"], "load": fed["load"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--levers", default=",".join(RUN_BY_DEFAULT), help=f"levers to run, of {list(LEVERS)}")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_fl_quality"))
    parser.add_argument("--converged-levers", default="",
                        help=f"levers also run to convergence (about 40 min each on 2 cores), of {list(CONVERGED_LEVERS)}")
    parser.add_argument("--public-start", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare at convergence from the public pretraining (cached with --reuse)")
    parser.add_argument("--reuse", action="store_true", help="reuse runs already finished under --out")
    parser.add_argument("--smoke", action="store_true", help="tiny runs (experiment=smoke): checks the plumbing")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    levers = [n for n in args.levers.split(",") if n]
    if unknown := [n for n in levers if n not in LEVERS]:
        raise SystemExit(f"--levers: unknown {unknown}; valid: {list(LEVERS)}")
    converged_names = [n for n in args.converged_levers.split(",") if n]
    if unknown := [n for n in converged_names if n not in CONVERGED_LEVERS]:
        raise SystemExit(f"--converged-levers: unknown {unknown}; valid: {list(CONVERGED_LEVERS)}")
    base = [*(SMOKE if args.smoke else []), *args.overrides]
    rounds, lever_rounds = (4, 2) if args.smoke else (None, LEVER_ROUNDS)
    caps = {"rounds": 8, "epochs": 12} if args.smoke else CAPS
    span = 2 if args.smoke else WINDOW
    window = [f"early_stop.window={span}", f"early_stop.min_delta={MIN_DELTA}"]  # the baseline's, in epochs
    out, plots = args.out, args.out / "plots"

    # (a), (b): the default experiment and its baseline at the same epochs.
    sized = [*base, *([f"federation.rounds={rounds}"] if rounds else [])]
    central = run("fedseg-train", sized, out / "central", args.reuse)
    fed = run("fedseg-sim", [*sized, f"compare={out / 'central'}"], out / "federated", args.reuse)
    epochs = run_config(fed)["federation"]["rounds"] * run_config(fed)["federation"]["local_epochs"]
    fed_miou = fed["rows"][-1]["miou"]
    # (c): both until they stop improving, on the converging setup, from random initialisation and from
    # the public pretraining.
    converge = [*base, *([] if args.smoke else CONVERGE)]

    def to_baseline(overrides: list[str], run_dir: Path) -> dict[str, Any]:
        """A centralized run on the converging setup, up to the epoch cap, stopped by the window in epochs."""
        return run("fedseg-train", [*converge, *overrides, f"train.epochs={caps['epochs']}", *window], run_dir,
                   args.reuse)

    central_c = to_baseline([], out / "central_converged")
    # The same window in fleet time for every federated run: the baseline's `span` epochs in sequential steps.
    window_steps = span * sequential_steps(central_c["rows"][1])

    def to_convergence(overrides: list[str], run_dir: Path, baseline: Path) -> dict[str, Any]:
        """A federated run on the converging setup, up to the round cap, against its converged ``baseline``."""
        return run("fedseg-sim", [*converge, *overrides, f"federation.rounds={caps['rounds']}",
                                  "early_stop.unit=step", f"early_stop.window={window_steps}",
                                  f"early_stop.min_delta={MIN_DELTA}", f"compare={baseline}"], run_dir, args.reuse)

    fed_c = to_convergence([], out / "federated_converged", out / "central_converged")
    random_init = converged_pair(central_c, fed_c, window_steps)
    c_miou, c_epoch, c_done = random_init["centralized"], random_init["epochs"], random_init["centralized_converged"]
    # The headline `converged` is from the public pretraining: segmentation models start pretrained in practice.
    pairs: dict[str, dict[str, Any]] = {}
    if args.public_start:
        # The fleet's model and frame size, which the checkpoint must fit.
        model = [o for o in args.overrides
                 if o.split("=")[0].split(".")[0] == "model" or o.startswith("data.image_size=")]
        pre_dir = out / "public_pretraining"
        pretraining = run("fedseg-train", [*PUBLIC_PRETRAIN, *(SMOKE_PRETRAIN if args.smoke else CONVERGE), *model],
                          pre_dir, args.reuse)
        init = [f"model.init={(pre_dir / 'checkpoints' / 'global.pt').resolve()}"]
        central_p = to_baseline(init, out / "central_converged_public")
        fed_p = to_convergence(init, out / "federated_converged_public", out / "central_converged_public")
        pairs["converged"] = converged_pair(central_p, fed_p, window_steps)
        pairs["converged"]["wall_s"]["public_pretraining"] = pretraining["wall_s"]
        plot_time_to_accuracy([curve(central_p, "centralized"), curve(fed_p, "federated (default)")],
                              plots / "time_to_accuracy_public_start.png",
                              title=f"{' '.join(converge) or 'converged'}, from the public pretraining")

    pairs["converged_random_init"] = random_init
    converged_levers: dict[str, dict[str, Any]] = {}
    converged_curves = []
    for name in converged_names:
        overrides, both = CONVERGED_LEVERS[name]
        baseline, base_miou, base_epoch, base_done = out / "central_converged", c_miou, c_epoch, c_done
        if both:
            baseline = out / f"central_converged_{name}"
            base_epoch, base_miou, base_done = converged_miou(to_baseline(overrides, baseline), window_steps)
        lever = to_convergence(overrides, out / f"converged_{name}", baseline)
        at, miou, done = converged_miou(lever, window_steps)
        converged_levers[name] = {"miou": miou, "rounds": at, "converged": done, "ratio": miou / base_miou,
                                  "centralized": base_miou, "epochs": base_epoch, "centralized_converged": base_done,
                                  "sequential_steps": curve(lever).steps[-1], "wall_s": lever["wall_s"],
                                  "load": lever["load"]}
        converged_curves.append(curve(lever, f"{name}, to convergence"))

    rows: dict[str, dict[str, Any]] = {}
    lever_epochs = lever_rounds * run_config(fed_c)["federation"]["local_epochs"]
    curves = [curve(central_c, "centralized"), curve(fed_c, "federated (default)"), *converged_curves]
    for name in levers:
        overrides, per_round = LEVERS[name]
        if not overrides and fed_c["rows"][-1]["round"] >= lever_rounds:  # the converged run's first rounds
            result = {**truncated(fed_c, lever_rounds), "wall_s": None, "load": fed_c["load"]}
        else:
            result = run("fedseg-sim", [*converge, *overrides, f"federation.rounds={lever_rounds * per_round}",
                                        f"compare={out / 'central_converged'}"], out / f"lever_{name}", args.reuse)
            curves.append(curve(result, name))
        rows[name] = lever_row(result, central_c, lever_epochs)
    plot_time_to_accuracy([curve(central, "centralized"), curve(fed, "federated")], plots / "time_to_accuracy.png",
                          title="default experiment")
    plot_time_to_accuracy(curves, plots / "time_to_accuracy_levers.png", title=" ".join(converge) or "converged")
    fed_steps = curve(fed).steps[-1]
    central_steps = fed_steps / (curve(central).steps[-1] / max(len(central["rows"]) - 1, 1))  # in epochs

    ratio = {"equal_epochs": fed_miou / central_at_epoch(central, epochs),
             "equal_fleet_time": fed_miou / central_at(central, fed_steps),
             **{name: pair["ratio"] for name, pair in pairs.items()}}
    print(f"\noverrides: {' '.join(base) or '(none)'}; converged on: {' '.join(converge)}")
    print("| comparison | federated mIoU | centralized mIoU | x centralized | federated took | centralized took |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| equal epochs | {fed_miou:.3f} | {central_at_epoch(central, epochs):.3f} | {ratio['equal_epochs']:.2f} | "
          f"{len(fed['rows']) - 1} rounds | {epochs} epochs |")
    print(f"| equal fleet time | {fed_miou:.3f} | {central_at(central, fed_steps):.3f} | "
          f"{ratio['equal_fleet_time']:.2f} | {fed_steps} sequential steps | {central_steps:g} epochs |")
    for name, p in pairs.items():
        start = "the public pretraining" if name == "converged" else "random initialisation"
        print(f"| converged from {start} ({p['start_miou']:.3f}) | {p['federated']:.3f} | {p['centralized']:.3f} | "
              f"{p['ratio']:.3f} | {p['rounds']} rounds{'' if p['federated_converged'] else ' (cap)'} | "
              f"{p['epochs']} epochs{'' if p['centralized_converged'] else ' (cap)'} |")
    for name, r in converged_levers.items():
        print(f"| converged, {name} | {r['miou']:.3f} | {r['centralized']:.3f} | {r['ratio']:.2f} | "
              f"{r['rounds']} rounds{'' if r['converged'] else ' (cap)'} | "
              f"{r['epochs']} epochs{'' if r['centralized_converged'] else ' (cap)'} |")
    print("\n| lever | mIoU | rounds | sequential steps | x centralized, equal epochs | x centralized, equal fleet time "
          "| wall s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        print(f"| {name} | {r['miou']:.3f} | {r['rounds']} | {r['sequential_steps']} | {r['ratio_equal_epochs']:.2f} | "
              f"{r['ratio_equal_fleet_time']:.2f} | {wall} | {r['load']:.1f} |")
    if args.json:
        print(json.dumps({
            "overrides": base, "converge_overrides": converge,
            "ratio": ratio,
            "miou": {"federated": fed_miou, "centralized_equal_epochs": central_at_epoch(central, epochs),
                     "centralized_equal_fleet_time": central_at(central, fed_steps)},
            "took": {"equal_epochs": {"rounds": len(fed["rows"]) - 1, "epochs": epochs},
                     "equal_fleet_time": {"sequential_steps": fed_steps, "epochs": central_steps},
                     **{name: {"rounds": p["rounds"], "epochs": p["epochs"]} for name, p in pairs.items()}},
            "convergence_rule": {"window_steps": window_steps, "window_epochs": span, "min_delta": MIN_DELTA,
                                 "caps": caps},
            **pairs,  # each converged pair: both runs' mIoU, where each converged, wall times
            "levers": rows,
            "converged_levers": converged_levers,
            "wall_s": {"central": central["wall_s"], "federated": fed["wall_s"]},
            "load": {"central": central["load"], "federated": fed["load"]},
            "plots": [str(plots / name) for name in ("time_to_accuracy.png", "time_to_accuracy_levers.png",
                                                     "time_to_accuracy_public_start.png") if (plots / name).exists()],
        }))


if __name__ == "__main__":
    main()
