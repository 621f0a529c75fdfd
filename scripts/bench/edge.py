"""The model a vehicle runs, in one invocation: teacher -> search -> distil -> export, under ``hardware=edge_cpu_2core``.

Stages, each the real command in its own run directory under ``--out``, one at a time:

1. **teacher**: the fleet's UNet-ResNet34, ``fedseg-sim`` with the default experiment (``--teacher-rounds N``:
   a stated shorter budget; ``--teacher CKPT``: an existing checkpoint instead).
2. **search**: ``fedseg-search`` over backbones x decoder widths x encoder depths under the profile, its
   latency budget checked on INT8 ONNX p95 and set to the teacher's fp32 PyTorch p95 / ``--speedup-target``
   (the teacher is timed first, at the profile's input and threads).
3. **distil**: ``fedseg-distill`` into the searched student on the public towns (seed 1001), and the same
   student with ``distill.alpha=1`` (labels only: trained alone on the same frames and budget).
4. **export**: ``fedseg-export`` of the distilled student at its training size (held-out mIoU of INT8, QAT
   where static INT8 loses more than half a point) and for the profile's camera input with the network at
   the input size the search chose (``export.network_size``: the graph resizes the frame to it and the
   logits back), the files timed below.

Then, in this process with :mod:`fedseg.measurement`, batch-1 p95 latency at the profile's input and
threads: the teacher's fp32 PyTorch model and the student's fp32 PyTorch (with the same resizes), ONNX
fp32 and ONNX INT8 (a QAT model is the static one's graph with other numbers: same ops, same latency).
The teacher is also timed at the student's network input (``teacher_p95_ms_at_network_size``): the
speedup's share that running smaller gives. Prints the table student by
student (no distillation, distillation, + INT8, + QAT if it ran), then as its last line one JSON object:
``teacher_miou``, ``student_miou`` (the deployed format's), ``speedup`` (teacher fp32 PyTorch p95 / student
deployed p95), ``miou_drop_points``, wall seconds per stage and the 1-minute load average before each.
mIoU is each model's on the held-out frames at its training size (the teacher's and students' runs score
the same 1001-seed held-out frames: fedseg-distill's ``teacher.miou``). It also writes ``--out``/``report.md``,
one page: the table, ``front.png`` (where the teacher and each student sit on the latency/mIoU plane, with
the search's budget), the search's own front (``search/search.png``) and the output files.

    python scripts/bench/edge.py --json                              # the default teacher (~15 min) + all
    python scripts/bench/edge.py --json --teacher-rounds 4           # a shorter stated budget
    python scripts/bench/edge.py --json --teacher RUN/checkpoints/global.pt
    python scripts/bench/edge.py --smoke --json --out /tmp/edge      # minutes: a plumbing check, tiny models

``--smoke`` trains its tiny teacher with ``fedseg-train`` (no Ray on a shared box), searches the tiny
backbone's decoder widths and sets no latency budget: its speedup is about 1 and means nothing.
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

import torch
from omegaconf import OmegaConf

from fedseg.checkpoints import load_checkpoint
from fedseg.export import AtResolution, deployable
from fedseg.measurement import interleaved_latency, onnx_latency, torch_latency, torch_threads, usable_threads
from fedseg.plots import plot_vehicle_front
from fedseg.search.hardware import HARDWARE_PROFILES

PROFILE = "edge_cpu_2core"
SEARCH = ["search.backbones=[mobilenetv3_large,mobilenet_v2,mobileone_s0,tinynet_e,mnasnet_100,efficientnet_lite0]",
          "search.decoder_scales=[0.5,0.25]", "search.encoder_depths=[null,4]",
          "search.image_sizes=[[192,256],[144,192],[96,128]]", "search.precision=int8"]
SMOKE = {
    "teacher": ["experiment=smoke", "data.image_size=[32,32]", "data.frames_per_vehicle=4", "data.heldout_frames=4"],
    "search": ["search.backbones=[tiny]", "search.decoder_scales=[1.0,0.5]", "search.int8=false"],
    "export": ["export.repeats=3", "export.warmup=1", "export.calibration_frames=2"],
}


def stage(name: str, exe: str, overrides: list[str], run_dir: Path, record: dict[str, Any]) -> Path:
    """Run one fedseg command into ``run_dir``; its wall time and the load before it go into ``record``."""
    load = os.getloadavg()[0]
    print(f"[{name}] {exe} {' '.join(overrides)}  (load {load:.1f})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name(exe)), *overrides, f"hydra.run.dir={run_dir}",
                           "run.progress=false"], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"edge.py: stage {name} ({exe}) failed, exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    record["wall_s"][name] = round(time.perf_counter() - t0, 1)
    record["load"][name] = round(load, 2)
    return run_dir


def searched(search_dir: Path) -> tuple[str, list[int]]:
    """The chosen student's backbone and the profile's input size at its chosen resolution."""
    model = OmegaConf.load(search_dir / "selected" / "model" / "searched.yaml")
    hardware = OmegaConf.load(search_dir / "selected" / "hardware" / "searched.yaml")
    return str(model.name), [int(v) for v in hardware.image_size]


def teacher_p95(checkpoint: Path, size: list[int], threads: int, repeats: int) -> float:
    """The teacher's fp32 PyTorch batch-1 p95 at the profile's input and threads."""
    model, _ = load_checkpoint(checkpoint)
    with torch_threads(threads):
        return torch_latency(deployable(model), torch.randn(1, 3, *size), warmup=3, repeats=repeats).p95_ms


def final_p95(teacher: Path, student: Path, deployed: dict[str, Any], size: list[int], network: list[int],
              threads: int, repeats: int) -> dict[str, float]:
    """p95 at the profile's input ``size`` and threads: teacher and student fp32 PyTorch timed in alternation
    (load drift hits both alike; a student whose network runs at ``network`` resizes inside, as its export
    does), then the student's exported ONNX files, and the teacher at ``network`` (what the resolution's
    share of the speedup is)."""
    models = {name: deployable(load_checkpoint(path)[0]) for name, path in (("teacher", teacher), ("student", student))}
    if list(network) != list(size):
        models["student"] = AtResolution(models["student"], (network[0], network[1]))
    timed = interleaved_latency(models, size, threads=threads, repeats=repeats)
    out = {"teacher_fp32": timed["teacher"].p95_ms, "torch_fp32": timed["student"].p95_ms}
    for name in ("fp32", "int8"):
        if deployed["files"].get(name):
            out[f"onnx_{name}"] = onnx_latency(deployed["files"][name], size, threads=threads,
                                               repeats=repeats).p95_ms
    with torch_threads(threads):
        out["teacher_fp32_at_network"] = torch_latency(models["teacher"], torch.randn(1, 3, *network), warmup=3,
                                                       repeats=repeats).p95_ms
    return out


def assemble(*, teacher: dict[str, Any], rows: list[dict[str, Any]], wall_s: dict[str, float],
             load: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The bench's result: each row's speedup and mIoU drop against the teacher; the last row is deployed.

    ``teacher``: ``miou`` and ``p95_ms``; each row: ``name``, ``format``, ``miou``, ``p95_ms``.
    """
    if not rows:
        raise ValueError("assemble: no student rows")
    table = [{**row, "speedup": round(teacher["p95_ms"] / row["p95_ms"], 2),
              "miou_drop_points": round(100 * (teacher["miou"] - row["miou"]), 2)} for row in rows]
    deployed = table[-1]
    return {"teacher_miou": teacher["miou"], "student_miou": deployed["miou"], "speedup": deployed["speedup"],
            "miou_drop_points": deployed["miou_drop_points"], "teacher_p95_ms": teacher["p95_ms"],
            "student_p95_ms": deployed["p95_ms"], "deployed": deployed["name"], "rows": table,
            "wall_s": {**wall_s, "total": round(sum(wall_s.values()), 1)}, "load": load, **extra}


def student_rows(alone: dict[str, Any], distilled: dict[str, Any], export: dict[str, Any],
                 p95: dict[str, float]) -> list[dict[str, Any]]:
    """Student by student: alone, distilled, + INT8, + QAT if it ran (mIoU at the training size)."""
    rows = [{"name": "no distillation", "format": "fp32 PyTorch", "miou": alone["final"]["miou"],
             "p95_ms": p95["torch_fp32"]},
            {"name": "distillation", "format": "fp32 PyTorch", "miou": distilled["final"]["miou"],
             "p95_ms": p95["torch_fp32"]}]
    if "onnx_int8" in p95:
        rows.append({"name": "distillation + INT8", "format": "INT8 ONNX Runtime",
                     "miou": export["parity"]["miou_int8"], "p95_ms": p95["onnx_int8"]})
        if export["qat"]["ran"]:
            rows.append({"name": "distillation + INT8 + QAT", "format": "INT8 ONNX Runtime",
                         "miou": export["qat"]["miou_int8"], "p95_ms": p95["onnx_int8"]})
    return rows


def table_lines(result: dict[str, Any]) -> list[str]:
    """The student-by-student table (markdown), the teacher first."""
    lines = ["| model | format | held-out mIoU | drop (points) | p95 ms | speedup |", "|---|---|---|---|---|---|",
             f"| teacher | fp32 PyTorch | {result['teacher_miou']:.3f} | 0.00 | {result['teacher_p95_ms']:.1f} | 1.00 |"]
    lines += [f"| {r['name']} | {r['format']} | {r['miou']:.3f} | {r['miou_drop_points']:+.2f} | {r['p95_ms']:.1f} | "
              f"{r['speedup']:.2f} |" for r in result["rows"]]
    return lines


def write_report(result: dict[str, Any], out: Path) -> Path:
    """``out/report.md``, one page: the headline against the goals, the table, where the teacher sits on the
    latency/mIoU front (``out/front.png``), the search's own front (``search/search.png``), the outputs."""
    size = "x".join(str(v) for v in result.get("image_size", []))
    network = "x".join(str(v) for v in result.get("network_size", []))
    plot_vehicle_front(("teacher", result["teacher_p95_ms"], result["teacher_miou"]),
                       [(r["name"], r["p95_ms"], r["miou"]) for r in result["rows"]], out / "front.png",
                       budget_ms=result.get("search_latency_budget_ms"),
                       title=f"{result.get('profile', '')}: p95 at {size}, {result.get('threads', '?')} threads")
    goals = f"speedup {result['speedup']:.2f} (goal >= 10), mIoU drop {result['miou_drop_points']:+.2f} points (goal <= 2)"
    files = result.get("deployed_files") or {}
    lines = [f"# The vehicle's model on `{result.get('profile', '')}`", "",
             (f"Deployed: **{result.get('student', '?')}**, {result['deployed']}, network input {network or '?'} inside "
             f"a graph that takes the camera's {size}: {goals}."), "",
             *table_lines(result), "",
             ("mIoU: every model on the same public held-out frames at the training size; p95: batch 1 at the "
             "profile's input and threads, teacher and students timed in this run on this machine."), "",
             "## Where the teacher sits", "", "![held-out mIoU against p95 latency](front.png)", "",
             "## The search", "",
             "Candidates, the Pareto front and the latency budget, from `search/search.md`:", "",
             "![the search's mIoU against latency](search/search.png)", "",
             "## Outputs", "",
             f"- student checkpoint: `{result.get('student_checkpoint', '?')}`",
             *(f"- ONNX {name}: `{path}`" for name, path in files.items() if path),
             f"- stages' wall seconds: {result['wall_s']}; 1-minute load before each: {result['load']}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in turn (see the module doc); returns :func:`assemble`'s result."""
    out, smoke = args.out.resolve(), args.smoke
    record: dict[str, Any] = {"wall_s": {}, "load": {}}
    profile, repeats = [f"hardware={PROFILE}"], 5 if smoke else 50
    base = SMOKE["teacher"] if smoke else []
    budget = [f"federation.rounds={args.teacher_rounds}"] if args.teacher_rounds else []
    if args.teacher:
        checkpoint = Path(args.teacher).resolve()
    else:  # smoke: fedseg-train's tiny UNet (no Ray); else the fleet's, as fedseg-sim trains it
        exe, model = ("fedseg-train", ["model=tiny"]) if smoke else ("fedseg-sim", [])
        checkpoint = stage("teacher", exe, [*profile, *base, *model, *budget], out / "teacher", record) \
            / "checkpoints" / "global.pt"
    hardware = HARDWARE_PROFILES[PROFILE]
    threads = usable_threads(hardware.threads)  # the profile's threads, capped at this machine's cores
    size = [32, 32] if smoke else list(hardware.image_size)  # the profile's input (smoke: its frames')
    t_p95 = teacher_p95(checkpoint, size, threads, repeats)  # for the search's budget; re-timed at the end
    limit = [] if smoke or not args.speedup_target else [f"hardware.latency_ms={t_p95 / args.speedup_target:.1f}"]
    search_args = (["experiment=smoke", *SMOKE["search"], *base[1:]] if smoke else SEARCH) + args.search_args
    search = stage("search", "fedseg-search", [*profile, *search_args, *limit], out / "search", record)
    backbone, deploy_size = searched(search)
    size = deploy_size if smoke else size  # smoke: its frames are not the camera's; time what the search chose
    student = ["--config-dir", str(search / "selected"), "model=searched", f"student={backbone}",
               f"teacher={checkpoint}", *profile, *base, *budget]
    stage("alone", "fedseg-distill", [*student, "distill.alpha=1.0"], out / "alone", record)
    distilled = stage("distil", "fedseg-distill", student, out / "distilled", record)
    ckpt = distilled / "checkpoints" / "global.pt"
    export_args = [f"checkpoint={ckpt}", *profile, *(SMOKE["export"] if smoke else []), "export.parity_frames=null"]
    stage("export", "fedseg-export", export_args, out / "export", record)
    camera, network = ",".join(str(v) for v in size), ",".join(str(v) for v in deploy_size)
    stage("export_profile", "fedseg-export", [*export_args, f"export.image_size=[{camera}]",
                                              f"export.network_size=[{network}]", "export.qat=false"],
          out / "export_profile", record)
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in ("alone", "distilled")}
    exports = {name: json.loads((out / name / "export.json").read_text()) for name in ("export", "export_profile")}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p95 = final_p95(checkpoint, ckpt, exports["export_profile"], size, deploy_size, threads, repeats)
    record["wall_s"]["latency"], record["load"]["latency"] = round(time.perf_counter() - t0, 1), round(load, 2)
    rows = student_rows(summaries["alone"], summaries["distilled"], exports["export"], p95)
    teacher = {"miou": summaries["distilled"]["teacher"]["miou"], "p95_ms": p95["teacher_fp32"]}
    return assemble(teacher=teacher, rows=rows, wall_s=record["wall_s"], load=record["load"], smoke=smoke,
                    profile=PROFILE, threads=threads, image_size=size, network_size=deploy_size,
                    teacher_p95_ms_at_network_size=p95["teacher_fp32_at_network"], teacher_checkpoint=str(checkpoint),
                    teacher_rounds=args.teacher_rounds, student=backbone, qat=exports["export"]["qat"],
                    search_latency_budget_ms=float(limit[0].split("=")[1]) if limit else None,
                    cores=os.cpu_count(), student_checkpoint=str(ckpt),
                    deployed_files=exports["export_profile"]["files"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_edge"), help="run directories go here")
    parser.add_argument("--teacher", help="an existing fedseg-sim checkpoint instead of training one")
    parser.add_argument("--teacher-rounds", type=int, help="a shorter federation.rounds for the teacher and students")
    parser.add_argument("--speedup-target", type=float, default=10.0,
                        help="search latency budget = teacher p95 / this (0: the profile's own)")
    parser.add_argument("--search-args", nargs="*", default=[], help="extra fedseg-search overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny models and frames: a plumbing check in minutes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args()
    result = run_pipeline(args)
    result["report"] = str(write_report(result, args.out.resolve()))
    print("\n".join(table_lines(result)))
    print(f"one-page report: {result['report']}")
    print(f"wall s per stage: {result['wall_s']}; load (1 min) before each: {result['load']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
