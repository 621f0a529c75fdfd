"""Seconds per local step and peak memory: plain training vs DP-SGD in each Opacus grad-sample mode.

One run measures every mode on the same machine and prints ratios to plain (numbers from different
runs or machines are not comparable): median wall seconds per step, and median CPU seconds per step
(all threads of the process), which other jobs on a shared machine disturb far less than wall time.
Each mode runs in its own subprocess so that its peak memory is its own: peak RSS on CPU (minus the
RSS before the first step), ``max_memory_allocated`` on CUDA.

    python scripts/bench/dp_step.py                       # UNet-ResNet34, 96x128, batch 8
    python scripts/bench/dp_step.py --size 64 --batch 4 --steps 3

Every mode trains on the same DP-compatible model (GroupNorm, out-of-place residuals) and the same
fixed batch. A mode ``<grad-sample mode>/decoder`` trains only the decoder and head (the encoder
frozen: ``privacy.trainable=decoder``); ``plain`` (all parameters, no DP) is the baseline of every
ratio, so ``hooks/decoder`` over ``plain`` is what a vehicle of the default ``privacy=dpsgd`` pays per
step against one without DP. ``--json`` prints, last, every mode's ratios plus ``default_mode``
(the grad-sample mode and trainable part of ``conf/privacy/dpsgd.yaml``) and ``default_time_ratio``.

    python scripts/bench/dp_step.py --json
    python scripts/bench/dp_step.py --modes plain,ghost/decoder --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

# A mode is "<grad-sample mode>[/<trainable part>]": what is trained (fedseg.models.TRAINABLE_PARTS,
# default all) and how; "plain" is no DP. The baseline of every ratio is "plain" (all parameters).
MODES = ("plain", "plain/decoder", "ghost", "hooks", "functorch", "ew", "ghost/decoder", "hooks/decoder")


def _rss_mb() -> float:
    """Current resident set size of this process, MB (Linux)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Time ``args.steps`` steps after ``args.warmup`` warm-up steps for one mode, in this process."""
    from torch.utils.data import DataLoader, TensorDataset

    from fedseg._dp_compat import PerSampleSegmentationLoss, make_dp_compatible
    from fedseg.dpsgd import ClientPrivacy
    from fedseg.models import build_model, set_trainable
    from fedseg.privacy import DPSpec

    grad_mode, _, part = mode.partition("/")
    part = part or "all"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    height, width = args.size
    x = torch.randn(args.batch, 3, height, width, device=args.device)
    y = torch.randint(0, args.classes, (args.batch, height, width), device=args.device)
    model = make_dp_compatible(build_model(args.backbone, args.classes)).to(args.device).train()
    set_trainable(model, part)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criterion = PerSampleSegmentationLoss()
    if grad_mode != "plain":
        data = TensorDataset(x.cpu(), y.cpu())  # only sizes the sampler: the steps use the fixed batch
        spec = DPSpec(noise_multiplier=1.0, grad_sample_mode=grad_mode, trainable=part)  # type: ignore[arg-type]
        privacy = ClientPrivacy(spec,
                                num_examples=args.batch, batch_size=args.batch, planned_steps=args.steps)
        model, optimizer, _, criterion = privacy.attach(model, optimizer, DataLoader(data, batch_size=args.batch),
                                                        seed=0, epochs=args.warmup + args.steps)
    wall: list[float] = []
    cpu: list[float] = []
    rss_before = _rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KB on Linux and covers the whole process: subtract what was there before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"s_per_step": statistics.median(wall[args.warmup:]),
            "cpu_s": statistics.median(cpu[args.warmup:]), "peak_mb": peak}


def run_all(args: argparse.Namespace) -> None:
    """Run each mode in a fresh subprocess and print a table of absolute numbers and ratios to plain."""
    results: dict[str, dict[str, float] | str] = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--only", mode, *sys.argv[1:]]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        results[mode] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
        print(f"  measured {mode}", file=sys.stderr, flush=True)
    plain = results.get("plain")
    print(f"{args.backbone} {args.size[0]}x{args.size[1]} batch {args.batch}, {args.steps} steps after "
          f"{args.warmup} warm-up, {args.threads} threads, {args.device}")
    header = ("mode", "s/step", "x plain", "CPU s", "x plain", "peak MB", "x plain")
    print(f"{header[0]:10s} " + " ".join(f"{h:>8s}" for h in header[1:]))
    for mode, res in results.items():
        if isinstance(res, str):
            print(f"{mode:10s} FAILED: {res}")
            continue
        ratio = {k: res[k] / plain[k] if isinstance(plain, dict) else float("nan") for k in res}
        print(f"{mode:10s} {res['s_per_step']:8.3f} {ratio['s_per_step']:8.2f} {res['cpu_s']:8.3f} "
              f"{ratio['cpu_s']:8.2f} {res['peak_mb']:8.0f} {ratio['peak_mb']:8.2f}")
    if args.json:
        print(json.dumps(summary_json(results, args)))


def summary_json(results: dict[str, dict[str, float] | str], args: argparse.Namespace) -> dict:
    """The table as one JSON object: each mode's numbers and ratios to plain, and the default mode's."""
    from fedseg.privacy import DEFAULT_GRAD_SAMPLE_MODE, DPSpec

    trainable = DPSpec(noise_multiplier=1.0).trainable  # conf/privacy/dpsgd.yaml's default too
    default_mode = DEFAULT_GRAD_SAMPLE_MODE + ("" if trainable == "all" else f"/{trainable}")
    plain = results.get("plain")
    modes: dict[str, dict] = {}
    for mode, res in results.items():
        if isinstance(res, str) or not isinstance(plain, dict):
            modes[mode] = {"error": res if isinstance(res, str) else "plain failed"}
            continue
        modes[mode] = {**res, "time_ratio": res["s_per_step"] / plain["s_per_step"],
                       "cpu_ratio": res["cpu_s"] / plain["cpu_s"], "memory_ratio": res["peak_mb"] / plain["peak_mb"]}
    default = modes.get(default_mode, {})
    return {"backbone": args.backbone, "size": list(args.size), "batch": args.batch, "threads": args.threads,
            "modes": modes, "default_mode": default_mode,
            "default_time_ratio": default.get("time_ratio"), "default_memory_ratio": default.get("memory_ratio")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--size`` is ``H,W`` or one number for a square image."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--size", default="96,128", help="H,W (conf/data default 96,128) or one number")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list from {','.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on the last line")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = parser.parse_args(argv)
    parts = [int(v) for v in str(args.size).replace("x", ",").split(",")]
    args.size = (parts[0], parts[-1])
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; valid: {list(MODES)}")
    return args


def main() -> None:
    args = parse_args()
    if args.only is not None:
        print(json.dumps(measure(args.only, args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
