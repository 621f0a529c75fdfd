"""``fedseg-search``: measure every backbone on this machine against a vehicle budget and pick one.

    fedseg-search                                    # all backbones, hardware=edge_cpu_2core
    fedseg-search experiment=smoke hydra.run.dir=OUT # quick subset (tiny, mobilenet_v2, resnet18)
    fedseg-search hardware=arm_4core search.backbones=[mobilenet_v2,mobileone_s0]

Writes into the run dir: ``search.md``, ``search.csv``, ``search.json``, ``search.png`` and
``selected/model/searched.yaml``; train the chosen backbone with
``fedseg-sim --config-dir OUT/selected model=searched``.
"""

from __future__ import annotations

# (OMP_WAIT_POLICY=PASSIVE is set by the sim package before torch loads: see fedseg/sim/__init__.py.)
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from fedseg.config import parse_spec, resolve_device
from fedseg.data import load_data
from fedseg.errors import NoBackboneFits
from fedseg.measurement import usable_threads
from fedseg.privacy import DPSpec
from fedseg.search.hardware import HardwareBudget
from fedseg.search.measure import (
    BackboneResult,
    SearchSpec,
    measure_backbone,
    prepare_data,
    resolve_backbones,
    retime_interleaved,
    to_candidate,
)
from fedseg.search.report import plot_search, table_rows, write_csv, write_markdown, write_model_config
from fedseg.search.select import Choice, pareto_front, select_backbone
from fedseg.settings import RunSettings
from fedseg.sim._cli import CONF_DIR, resolve, user_errors


def _threads(budget: HardwareBudget) -> int:
    """The profile's thread count, capped at this machine's cores (more would only oversubscribe)."""
    threads = usable_threads(budget.threads)
    if threads < budget.threads:
        print(f"fedseg-search: warning: hardware.threads={budget.threads} but this machine has {threads} "
              f"cores; measuring with {threads} (run the search on the target box for its own numbers)",
              file=sys.stderr)
    return threads


def _notes(raw: dict[str, Any], spec: SearchSpec, budget: HardwareBudget, threads: int,
           dp: bool) -> list[str]:
    data = raw["data"]
    return [
        f"Hardware profile `{budget.name}`: {budget.limits()}; {budget.description}",
        (f"Latency: batch 1 at {budget.image_size[0]}x{budget.image_size[1]}, {threads} thread(s), median "
        f"and p95 of {spec.repeats} runs after {spec.warmup} warm-up; the budget is checked against p95 "
        f"of the {spec.precision} measurement. PyTorch fp32 is timed with all backbones in alternation "
        f"(blocks of 5 runs) so that load drift hits them alike; `× {spec.reference}`: median latency / "
        f"{spec.reference}'s in this run."),
        (f"mIoU: each backbone trained from the same seed for {spec.train_epochs} epoch(s) on the same "
        f"{data['name']} frames at {data['image_size'][0]}x{data['image_size'][1]} (batch "
        f"{spec.batch_size}, {spec.optimizer} lr {spec.lr}{', DP-SGD' if dp else ''}), evaluated on the "
        "held-out frames."),
        ("Memory: weights + batch + peak live tensor storage (fedseg.measurement); train step: one "
        "Adam step at the training batch and size; DP step: the same under Opacus DP-SGD."),
        "INT8: ONNX Runtime static quantization (QDQ), calibrated on training frames; ONNX fp32 beside it.",
        "Ties: mIoU equal at 3 decimals -> lower median latency -> fewer parameters.",
    ]


def _measure(settings: RunSettings, spec: SearchSpec, budget: HardwareBudget, names: list[str],
             threads: int) -> list[BackboneResult]:
    """Every candidate measured on the same frames; fp32 latencies re-timed in alternation."""
    # Under privacy=dpsgd the candidates train under DP-SGD, as the run's vehicles would.
    dp = settings.privacy if isinstance(settings.privacy, DPSpec) else None
    progress, out = settings.run.progress, Path(settings.output_dir)
    fleet = load_data(settings.data, num_clients=settings.federation.num_clients, seed=settings.seed,
                      progress=progress)
    data = prepare_data(fleet, spec, train_image_size=settings.data.image_size,
                        deploy_image_size=budget.image_size)
    print(f"fedseg-search: {len(names)} backbones on profile {budget.name} ({budget.limits()}), "
          f"{len(data.train)} training / {len(data.heldout)} held-out frames -> {out}", flush=True)
    results = []
    bar = tqdm(names, desc="fedseg-search", unit="backbone", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        results.append(measure_backbone(name, data, spec, budget, seed=settings.seed, threads=threads,
                                        dp=dp, device=resolve_device(settings.device)))
    if len(results) > 1:  # same-run ratios: time the candidates in alternation (see interleaved_latency)
        bar.write("fedseg-search: timing all backbones in alternation for fair latency ratios")
        results = retime_interleaved(results, data.num_classes, budget, threads=threads, repeats=spec.repeats)
    return results


@user_errors("fedseg-search")
def run(cfg: DictConfig) -> dict[str, Any]:
    raw = resolve(cfg)
    settings = RunSettings.from_config(raw)
    budget = parse_spec(HardwareBudget, raw["hardware"], key="hardware")
    spec = parse_spec(SearchSpec, raw["search"], key="search")
    names = resolve_backbones(spec.backbones)
    dp = isinstance(settings.privacy, DPSpec)
    threads, out = _threads(budget), Path(settings.output_dir)
    results = _measure(settings, spec, budget, names, threads)
    candidates = [to_candidate(r, precision=spec.precision, dp=dp) for r in results]
    front = pareto_front(candidates)
    choice: Choice | None = None
    failure: NoBackboneFits | None = None
    try:
        choice = select_backbone(candidates, budget)
    except NoBackboneFits as err:
        failure = err
    rows = table_rows(results, candidates, choice, front, spec.reference)
    write_markdown(rows, out / "search.md", title=f"Backbone search on `{budget.name}`",
                   reference=spec.reference, notes=_notes(raw, spec, budget, threads, dp))
    write_csv(rows, out / "search.csv")
    plot_search(candidates, front, budget, choice, out / "search.png",
                latency_label="INT8 (ONNX Runtime)" if spec.precision == "int8" else "fp32 (PyTorch)")
    report = {"hardware": dataclasses.asdict(budget), "search": dataclasses.asdict(spec), "threads": threads,
              "dp": dp, "selected": choice.selected.name if choice else None, "rows": rows}
    (out / "search.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print((out / "search.md").read_text())
    if failure is not None:
        raise failure  # outputs are written; user_errors prints the message and exits 2
    assert choice is not None
    path = write_model_config(choice.selected.name, None, out / "selected" / "model" / "searched.yaml",
                              note=f"profile {budget.name}, mIoU {choice.selected.miou:.3f}")
    print(f"fedseg-search: selected {choice.selected.name}; train it with: "
          f"fedseg-sim --config-dir {path.parent.parent} model=searched")
    return report


@hydra.main(config_path=CONF_DIR, config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
