"""Plots a person would rather look at than read: curves over rounds and an example sheet."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and edge boxes without a display
import matplotlib.pyplot as plt
import numpy as np

from fedseg.data.normalize import denormalize
from fedseg.quality import Progress


def plot_curves(rows: Sequence[dict[str, Any]], out_dir: Path, *, title: str = "") -> list[Path]:
    """``loss.png``, ``miou.png`` and ``per_class_iou.png`` from metrics rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in rows]
    paths = []
    for key, label in (("loss", "held-out loss"), ("miou", "mIoU")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, _series(rows, key), "o-", label=label)
        if key == "miou":
            ax.plot(rounds, _series(rows, "pixel_acc"), "s--", label="pixel accuracy")
            ax.plot(rounds, _series(rows, "dice"), "^:", label="Dice")
        if key == "loss" and any(r.get("train_loss") is not None for r in rows):
            ax.plot(rounds, _series(rows, "train_loss"), "s--", label="train loss (clients)")
        ax.set_xlabel("round")
        ax.set_title(f"{title} {label}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / f"{key}.png"))
    paths.append(_plot_per_class(rows, out_dir / "per_class_iou.png", title))
    if any(r.get("epsilon") is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, _series(rows, "epsilon"), "o-")
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon (max over vehicles)")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "epsilon.png"))
    return paths


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    """``key`` of every row as floats; a missing value is NaN, so the curve shows a gap there."""
    return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def _plot_per_class(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    names = list((rows[-1].get("per_class_iou") or {}).keys()) if rows else []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [r["round"] for r in rows]
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        values = [(r.get("per_class_iou") or {}).get(name) for r in rows]
        ax.plot(rounds, [v if v is not None else np.nan for v in values], "-", color=cmap(i % 20), label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("IoU")
    ax.set_title(f"{title} per-class IoU".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_examples(
    images: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_colors: np.ndarray, path: Path
) -> Path:
    """A sheet of input / label / prediction rows; ``class_colors`` is (C,3) uint8, ignored pixels black."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n), squeeze=False)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(class_colors)] = class_colors
    for i in range(n):
        for ax, img, name in zip(
            axes[i], (denormalize(images[i]), lut[labels[i]], lut[preds[i]]), ("input", "label", "prediction")
        ):
            ax.imshow(img)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def plot_time_to_accuracy(curves: Sequence[Progress], path: Path, *, title: str = "") -> Path:
    """``time_to_accuracy.png``: held-out mIoU against the fleet's training seconds (vehicles in parallel:
    as measured, so threads and load show), against sequential optimizer steps (the same, independent of
    the hardware) and against frames trained, one line per run (:func:`fedseg.quality.progress`)."""
    fig, (by_time, by_steps, by_frames) = plt.subplots(1, 3, figsize=(15, 4))
    for curve in curves:
        by_time.plot(curve.seconds, curve.miou, "o-", markersize=3, label=curve.label)
        by_steps.plot(curve.steps, curve.miou, "o-", markersize=3, label=curve.label)
        by_frames.plot(curve.frames, curve.miou, "o-", markersize=3, label=curve.label)
    by_time.set_xlabel("fleet training time, s (vehicles in parallel)")
    by_steps.set_xlabel("sequential optimizer steps (vehicles in parallel)")
    by_frames.set_xlabel("frames trained (all vehicles)")
    for ax in (by_time, by_steps, by_frames):
        ax.set_ylabel("held-out mIoU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def plot_vehicle_front(reference: tuple[str, float, float], points: Sequence[tuple[str, float, float]], path: Path,
                       *, budget_ms: float | None = None, title: str = "") -> Path:
    """``front.png`` of the vehicle-model pipeline: held-out mIoU against p95 latency (log scale) of the
    ``reference`` (the fleet's model: label, ms, mIoU) and each of ``points`` (the students, in the order
    their levers were applied, joined by a line), each labelled with its speedup over the reference;
    ``budget_ms``: the latency the search was held to."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    name, ref_ms, ref_miou = reference
    ax.plot([ref_ms], [ref_miou], "*", color="tab:red", markersize=14, label=f"{name} (1.0x)")
    if points:
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="tab:blue", alpha=0.6)
    for label, ms, miou in points:
        ax.annotate(f"{label} ({ref_ms / ms:.1f}x)", (ms, miou), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    if budget_ms is not None:
        ax.axvline(budget_ms, color="tab:gray", linestyle=":", label=f"search budget {budget_ms:.1f} ms (p95)")
    ax.axhline(ref_miou - 0.02, color="tab:red", linestyle=":", alpha=0.5, label="2 points below the reference")
    ax.set_xscale("log")
    ax.set_xlabel("p95 latency, batch 1, ms (log)")
    ax.set_ylabel("held-out mIoU")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
