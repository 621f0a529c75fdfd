"""Search outputs: the table (Markdown, CSV), the mIoU-vs-latency plot, and the chosen-model config."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg.search.hardware import HardwareBudget
from fedseg.search.select import Candidate, Choice

# (column, header in search.md, format); CSV uses the column names and full precision.
COLUMNS: list[tuple[str, str, str]] = [
    ("backbone", "backbone", "{}"),
    ("family", "family", "{}"),
    ("decoder", "decoder channels", "{}"),
    ("depth", "depth", "{}"),
    ("input", "input", "{}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("gmacs", "GMACs", "{:.2f}"),
    ("size_mb", "fp32 MB", "{:.1f}"),
    ("latency_ms", "fp32 ms (median)", "{:.1f}"),
    ("latency_p95_ms", "fp32 ms (p95)", "{:.1f}"),
    ("latency_ratio", "× resnet34", "{:.2f}"),
    ("memory_mb", "infer. MB", "{:.0f}"),
    ("train_step_memory_mb", "train step MB", "{:.0f}"),
    ("dp_step_memory_mb", "DP step MB", "{:.0f}"),
    ("onnx_latency_ms", "ONNX fp32 ms", "{:.1f}"),
    ("int8_latency_ms", "INT8 ms (median)", "{:.1f}"),
    ("int8_size_mb", "INT8 MB", "{:.1f}"),
    ("miou", "mIoU", "{:.3f}"),
    ("epochs", "epochs", "{}"),
    ("fits", "fits", "{}"),
    ("pareto", "Pareto", "{}"),
]


def table_rows(results: Sequence[Any], candidates: Sequence[Candidate], choice: Choice | None,
               front: Sequence[Candidate], reference: str) -> list[dict[str, Any]]:
    """One row per candidate; ``results`` are :class:`fedseg.search.measure.BackboneResult`."""
    ref = next((r for r in results if r.name == reference), None)
    front_names = {c.name for c in front}
    rows = []
    for result, candidate in zip(results, candidates):
        p = result.profile
        rejected = choice.rejected.get(result.name) if choice else None
        arch = result.architecture
        rows.append({
            "backbone": result.name, "family": result.family,
            "decoder": "-".join(str(c) for c in arch.decoder_channels) if arch else None,
            "depth": arch.encoder_depth if arch else None,
            "input": f"{arch.image_size[0]}x{arch.image_size[1]}" if arch else None,
            "params_m": p.params / 1e6,
            "gmacs": p.macs / 1e9, "size_mb": p.size_mb, "latency_ms": p.latency_ms,
            "latency_p95_ms": p.latency_p95_ms,
            "latency_ratio": p.latency_ms / ref.profile.latency_ms if ref else None,
            "memory_mb": p.memory_mb, "train_step_memory_mb": p.train_step_memory_mb,
            "dp_step_memory_mb": p.dp_step_memory_mb, "onnx_latency_ms": p.onnx_latency_ms,
            "int8_latency_ms": p.int8_latency_ms, "int8_latency_p95_ms": p.int8_latency_p95_ms,
            "int8_size_mb": p.int8_size_mb, "miou": result.miou, "epochs": result.epochs,
            "pixel_acc": result.pixel_acc,
            "train_s": result.train_s, "fits": "yes" if choice and not rejected else "no",
            "pareto": "yes" if candidate.name in front_names else "",
            "selected": bool(choice and choice.selected.name == result.name),
            "why_not": "; ".join(rejected or []), "dp_note": p.dp_note, "int8_note": p.int8_note,
        })
    return rows


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, *, title: str, notes: Sequence[str],
                   reference: str = "resnet34") -> Path:
    """``search.md``: the measured table (selected backbone in bold), then the notes."""
    headers = [f"× {reference}" if key == "latency_ratio" else header for key, header, _ in COLUMNS]
    lines = [f"# {title}", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = [_cell(row[key], fmt) for key, _, fmt in COLUMNS]
        if row["selected"]:
            cells[0] = f"**{cells[0]}** (selected)"
        lines.append("| " + " | ".join(cells) + " |")
    misses = [f"- {row['backbone']}: {row['why_not']}" for row in rows if row["why_not"]]
    if misses:
        lines += ["", "Over budget:", *misses]
    lines += ["", *[f"- {note}" for note in notes]]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``search.csv``: every measured field, full precision, empty cells for missing values."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["backbone"])
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def plot_search(candidates: Sequence[Candidate], front: Sequence[Candidate], budget: HardwareBudget,
                choice: Choice | None, path: Path, *, latency_label: str) -> Path:
    """``search.png``: mIoU vs median latency (whisker to p95, the checked value), budget line, front.

    Red: selected; blue: fits the budget; grey cross: over budget.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: edge boxes and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    selected = choice.selected.name if choice else None
    fitting = {c.name for c in choice.ranked} if choice else set()
    shown = [c for c in candidates if c.miou is not None and c.latency_ms is not None]
    for c in shown:
        assert c.miou is not None and c.latency_ms is not None
        p95 = c.latency_p95_ms if c.latency_p95_ms is not None else c.latency_ms
        color = "tab:red" if c.name == selected else "tab:blue" if c.name in fitting else "tab:gray"
        ax.errorbar([c.latency_ms], [c.miou], xerr=[[0.0], [max(p95 - c.latency_ms, 0.0)]],
                    fmt="o" if c.name in fitting else "x", color=color, capsize=3)
        ax.annotate(c.name, (c.latency_ms, c.miou), textcoords="offset points", xytext=(5, 5), fontsize=8)
    # pareto_front only keeps candidates with both measurements; the filter says so to the type checker.
    line = [(c.latency_ms, c.miou) for c in front if c.latency_ms is not None and c.miou is not None]
    if line:
        ax.plot([x for x, _ in line], [y for _, y in line], "--", color="tab:green", label="Pareto front")
    if budget.latency_ms is not None:
        ax.axvline(budget.latency_ms, color="tab:red", linestyle=":",
                   label=f"budget {budget.latency_ms:g} ms (p95) — {budget.name}")
    ax.set_xlabel(f"{latency_label} latency, batch 1, {budget.threads} threads, "
                  f"{budget.image_size[0]}x{budget.image_size[1]} (ms; whisker: p95)")
    ax.set_ylabel("mIoU on held-out frames (equal training budget)")
    ax.set_title("Backbone search: accuracy vs measured latency" +
                 (f" — selected {selected}" if selected else " — none fits"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_model_config(backbone: str, decoder_channels: Sequence[int] | None, path: Path, *,
                       note: str, encoder_depth: int | None = None,
                       image_size: Sequence[int] | None = None) -> Path:
    """``selected/model/searched.yaml``: a ``model`` group option ``fedseg-sim`` accepts.

    ``image_size`` (the chosen input, H x W): recorded in a comment, and written as
    ``selected/hardware/searched.yaml`` by :func:`write_hardware_config`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = f"[{', '.join(str(c) for c in decoder_channels)}]" if decoder_channels else "null"
    size = f"# Input: {image_size[0]}x{image_size[1]} (hardware=searched sets it)\n" if image_size else ""
    depth = "null" if encoder_depth is None else str(int(encoder_depth))
    path.write_text(
        f"# Chosen by fedseg-search: {note}\n"
        f"# Use: fedseg-sim --config-dir {path.parent.parent} model=searched\n{size}"
        f"name: {backbone}\nencoder_weights: null\ndecoder_channels: {channels}\nencoder_depth: {depth}\n")
    return path


def write_hardware_config(budget: HardwareBudget, image_size: Sequence[int], path: Path) -> Path:
    """``selected/hardware/searched.yaml``: the searched profile at the chosen input size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {**dataclasses.asdict(budget), "name": "searched", "image_size": [int(v) for v in image_size]}
    lines = [f"# The {budget.name} profile at the input fedseg-search chose; fedseg-export hardware=searched"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in fields.items()]  # JSON values are YAML
    path.write_text("\n".join(lines) + "\n")
    return path
