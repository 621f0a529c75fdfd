"""``fedseg-search``: measure every backbone on this machine against a vehicle budget and pick one.

    fedseg-search                                    # all backbones, hardware=edge_cpu_2core
    fedseg-search experiment=smoke hydra.run.dir=OUT # quick subset (tiny, mobilenet_v2, resnet18)
    fedseg-search hardware=arm_4core search.backbones=[mobilenet_v2,mobileone_s0]
    fedseg-search search.decoder_scales=[1.0,0.5,0.25] search.encoder_depths=[null,4]  # whole network

Every candidate (backbone x decoder scale x encoder depth x input size) is measured; those within the
profile's limits are ranked by successive halving (``search.rungs``, ``search.eta``). Writes into the
run dir: ``search.md``, ``search.csv``, ``search.json``, ``search.png``,
``selected/model/searched.yaml`` and ``selected/hardware/searched.yaml`` (the profile at the chosen
input size); train the chosen network with ``fedseg-sim --config-dir OUT/selected model=searched``.
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
    SearchData,
    SearchSpec,
    measure_architecture,
    prepare_data,
    resolve_backbones,
    retime_interleaved,
    score_architecture,
    to_candidate,
)
from fedseg.search.rank import Ranking, halving_notes, rank_candidates
from fedseg.search.report import (
    plot_search,
    table_rows,
    write_csv,
    write_hardware_config,
    write_markdown,
    write_model_config,
)
from fedseg.search.select import Choice, pareto_front, select_backbone
from fedseg.search.space import Architecture, search_space
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
           dp: bool, skipped: list[str]) -> list[str]:
    data = raw["data"]
    sizes = spec.image_sizes or (budget.image_size,)
    return [
        f"Hardware profile `{budget.name}`: {budget.limits()}; {budget.description}",
        (f"Search space: backbones x decoder scales {list(spec.decoder_scales)} (of each backbone's "
        f"decoder_channels) x encoder depths {[d if d is not None else 'registry' for d in spec.encoder_depths]}"
        f" x inputs {['x'.join(str(v) for v in s) for s in sizes]}; precision checked: {spec.precision}."
        + (f" Left out: {'; '.join(skipped)}." if skipped else "")),
        (f"Latency: batch 1 at each candidate's input, {threads} thread(s), median and p95 of "
        f"{spec.repeats} runs after {spec.warmup} warm-up; the budget is checked against p95 of the "
        f"{spec.precision} measurement. PyTorch fp32 is timed with all candidates of one input size in "
        f"alternation (blocks of 5 runs) so that load drift hits them alike; `× {spec.reference}`: median "
        f"latency / {spec.reference}'s in this run."),
        (f"mIoU: every candidate trained from the same seed on the same {data['name']} frames at "
        f"{data['image_size'][0]}x{data['image_size'][1]} (scaled as its input is to the profile's; logits "
        f"resized back, so all are scored on the same full-size held-out masks; batch {spec.batch_size}, "
        f"{spec.optimizer} lr {spec.lr}{', DP-SGD' if dp else ''})."),
        ("Memory: weights + batch + peak live tensor storage (fedseg.measurement); train step: one "
        "Adam step at the training batch and size; DP step: the same under Opacus DP-SGD."),
        "INT8: ONNX Runtime static quantization (QDQ), calibrated on training frames; ONNX fp32 beside it.",
        "Ties: mIoU equal at 3 decimals -> lower median latency -> fewer parameters.",
    ]


def _measure(settings: RunSettings, spec: SearchSpec, budget: HardwareBudget, space: list[Architecture],
             threads: int) -> tuple[list[BackboneResult], SearchData]:
    """Every candidate's cost measured on this machine; fp32 latencies re-timed in alternation."""
    progress, out = settings.run.progress, Path(settings.output_dir)
    fleet = load_data(settings.data, num_clients=settings.federation.num_clients, seed=settings.seed,
                      progress=progress)
    data = prepare_data(fleet, spec, train_image_size=settings.data.image_size,
                        deploy_image_size=budget.image_size)
    print(f"fedseg-search: {len(space)} candidates on profile {budget.name} ({budget.limits()}), "
          f"{len(data.train)} training / {len(data.heldout)} held-out frames -> {out}", flush=True)
    results = []
    bar = tqdm(space, desc="fedseg-search", unit="candidate", disable=not progress)
    for arch in bar:
        bar.set_postfix_str(arch.name)
        results.append(measure_architecture(arch, data, spec, budget, seed=settings.seed, threads=threads))
    if len(results) > 1:  # same-run ratios: time the candidates in alternation (see interleaved_latency)
        bar.write("fedseg-search: timing all candidates in alternation for fair latency ratios")
        results = retime_interleaved(results, data.num_classes, budget, threads=threads, repeats=spec.repeats)
    return results, data


def _rank(settings: RunSettings, spec: SearchSpec, budget: HardwareBudget, results: list[BackboneResult],
          data: SearchData) -> Ranking:
    """Successive halving over the candidates within budget (under privacy=dpsgd: trained under DP-SGD)."""
    dp = settings.privacy if isinstance(settings.privacy, DPSpec) else None
    archs = {r.name: r.architecture for r in results}
    device = resolve_device(settings.device)

    def score(name: str, epochs: int, seed: int) -> tuple[float, float, float, float]:
        arch = archs[name]
        assert arch is not None  # every result here was measured from an Architecture
        print(f"fedseg-search: training {name} for {epochs} epoch(s), seed {seed}", flush=True)
        return score_architecture(arch, data, spec, budget, seed=seed, epochs=epochs, dp=dp, device=device)

    return rank_candidates(results, budget, score, precision=spec.precision, dp=dp is not None,
                           seed=settings.seed, epochs=spec.train_epochs, rungs=spec.rungs, eta=spec.eta,
                           stability_seeds=spec.stability_seeds)


@user_errors("fedseg-search")
def run(cfg: DictConfig) -> dict[str, Any]:
    raw = resolve(cfg)
    settings = RunSettings.from_config(raw)
    budget = parse_spec(HardwareBudget, raw["hardware"], key="hardware")
    spec = parse_spec(SearchSpec, raw["search"], key="search")
    names = resolve_backbones(spec.backbones)
    space, skipped = search_space(names, decoder_scales=spec.decoder_scales, encoder_depths=spec.encoder_depths,
                                  image_sizes=spec.image_sizes or (budget.image_size,))
    if not space:
        raise ValueError(f"search: no candidate left to measure ({'; '.join(skipped)}); check "
                         "search.encoder_depths and search.image_sizes")
    dp = isinstance(settings.privacy, DPSpec)
    threads, out = _threads(budget), Path(settings.output_dir)
    results, data = _measure(settings, spec, budget, space, threads)
    ranking = _rank(settings, spec, budget, results, data)
    results = ranking.results
    candidates = [to_candidate(r, precision=spec.precision, dp=dp) for r in results]
    # Only the last rung's entrants are comparable (same budget): they alone form the front and are chosen.
    finalists = [c for c in candidates if c.name in ranking.finalists]
    front = pareto_front(finalists)
    choice: Choice | None = None
    failure: NoBackboneFits | None = None
    try:
        over = [c for c in candidates if c.miou is None]  # never trained: over budget
        choice = select_backbone(finalists + over, budget)
    except NoBackboneFits as err:
        failure = err
    rows = table_rows(results, candidates, choice, front, spec.reference)
    notes = _notes(raw, spec, budget, threads, dp, skipped) + halving_notes(
        ranking, frames=len(data.train), seed=settings.seed)
    write_markdown(rows, out / "search.md", title=f"Backbone search on `{budget.name}`",
                   reference=spec.reference, notes=notes)
    write_csv(rows, out / "search.csv")
    plot_search(candidates, front, budget, choice, out / "search.png",
                latency_label="INT8 (ONNX Runtime)" if spec.precision == "int8" else "fp32 (PyTorch)")
    report = {"hardware": dataclasses.asdict(budget), "search": dataclasses.asdict(spec), "threads": threads,
              "dp": dp, "selected": choice.selected.name if choice else None, "rows": rows,
              "halving": {"rungs": [dataclasses.asdict(r) for r in ranking.rungs],
                          "planned_epochs": ranking.planned_epochs, "train_s": ranking.train_s,
                          "stability": {str(k): dataclasses.asdict(v) for k, v in ranking.stability.items()}}}
    (out / "search.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print((out / "search.md").read_text())
    if failure is not None:
        raise failure  # outputs are written; user_errors prints the message and exits 2
    assert choice is not None
    return {**report, "config": str(_write_selected(choice, results, budget, out))}


def _write_selected(choice: Choice, results: list[BackboneResult], budget: HardwareBudget, out: Path) -> Path:
    """``selected/model/searched.yaml`` and ``selected/hardware/searched.yaml`` for the chosen candidate."""
    arch = next(r.architecture for r in results if r.name == choice.selected.name)
    assert arch is not None
    default = arch.is_registry_default()
    path = write_model_config(
        arch.backbone, None if default else arch.decoder_channels, out / "selected" / "model" / "searched.yaml",
        note=f"{arch.name}, profile {budget.name}, mIoU {choice.selected.miou:.3f}",
        encoder_depth=None if default else arch.encoder_depth, image_size=arch.image_size)
    write_hardware_config(budget, arch.image_size, out / "selected" / "hardware" / "searched.yaml")
    print(f"fedseg-search: selected {arch.name}; train it with: "
          f"fedseg-sim --config-dir {path.parent.parent} model=searched")
    return path


@hydra.main(config_path=CONF_DIR, config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
