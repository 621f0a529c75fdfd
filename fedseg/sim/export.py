"""``fedseg-export``: a trained checkpoint -> ONNX fp32 + INT8 for an edge box, with parity and latency.

    fedseg-export checkpoint=outputs/RUN/checkpoints/global.pt hydra.run.dir=OUT

Writes ``model_fp32.onnx``, ``model_int8.onnx`` and ``export.json`` into the run dir and prints
parity (fp32: max |logit diff| vs PyTorch; INT8: mIoU drop on held-out frames) and batch-1 latency
of PyTorch, ONNX fp32 and ONNX INT8 measured in the same run. INT8 is calibrated on public frames
(the synthetic towns of ``export.calibration_seed``, 1001 as fedseg-distill's). Where it loses more
than ``export.qat_threshold_points`` of mIoU (``export.qat=auto``; ``true``/``false`` force it), a
quantization-aware fine-tuning on the same public frames (:mod:`fedseg.qat`) writes
``model_int8_qat.onnx``, which is then the deployed file (``export.json``: ``qat``, ``deployed``).
"""

from __future__ import annotations

# (OMP_WAIT_POLICY=PASSIVE is set by the sim package before torch loads: see fedseg/sim/__init__.py.)
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Dataset

from fedseg.checkpoints import load_checkpoint
from fedseg.config import DataSpec, bounded, parse_spec
from fedseg.data import FleetData, load_data
from fedseg.export import AtResolution, check_parity, deployable, export_onnx, quantize_int8
from fedseg.measurement import (
    MB,
    Latency,
    calibration_images,
    onnx_latency,
    state_dict_mb,
    torch_latency,
    torch_threads,
    usable_threads,
)
from fedseg.qat import conv_input_ranges, quantization_aware_finetune
from fedseg.sim._cli import CONF_DIR, resolve, user_errors
from fedseg.training import make_loader


@dataclass(frozen=True)
class ExportSpec:
    """The ``export`` block of ``conf/export.yaml``."""

    image_size: tuple[int, int] | None = None
    network_size: tuple[int, int] | None = None
    opset: int = 17
    int8: bool = True
    calibration_frames: int = 8
    calibration_seed: int | None = 1001
    parity_frames: int | None = 16
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    qat: Literal["auto"] | bool = "auto"
    qat_threshold_points: float = bounded(0.5, ge=0)
    qat_epochs: int = bounded(3, ge=1)
    qat_lr: float = bounded(1e-4, gt=0)
    qat_batch_size: int = bounded(8, ge=1)


def _resized(images: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames and masks at ``size`` (exporting at another size than trained)."""
    if tuple(images.shape[-2:]) == size:
        return images, masks
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images, F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _public_data(spec: ExportSpec, raw: dict[str, Any], data_block: dict[str, Any], num_clients: int
                 ) -> tuple[FleetData | None, str]:
    """The frames that calibrate INT8 and fine-tune QAT: public synthetic towns of ``calibration_seed``,
    read as the checkpoint's (tagset, task, input, size); None with ``calibration_seed=null``."""
    if spec.calibration_seed is None:
        return None, "the checkpoint's training frames (its vehicles')"
    block = dict(data_block) if data_block.get("name") == "synthetic" else {
        **raw["data"], **{k: data_block[k] for k in ("tagset", "task", "input", "image_size") if k in data_block}}
    if block.get("name") != "synthetic":
        raise ValueError(f"export.calibration_seed={spec.calibration_seed} calibrates on public synthetic towns, "
                         f"but data={block.get('name')}: set data=synthetic, or export.calibration_seed=null "
                         "for the checkpoint's own training frames")
    public = load_data(parse_spec(DataSpec, block, key="data"), num_clients=num_clients,
                       seed=spec.calibration_seed, progress=False)
    return public, f"public synthetic towns, seed {spec.calibration_seed}"


def _frames(meta: dict[str, Any], raw: dict[str, Any], spec: ExportSpec, size: tuple[int, int]) -> dict:
    """Calibration images and QAT frames (public, or the vehicles'), parity images + masks (held-out), at ``size``."""
    run_cfg = meta.get("config") or raw  # the training run's own data and split, when it was saved
    data_block = dict(run_cfg["data"])
    if not meta.get("config"):  # at least read frames the way the model was trained on them
        data_block.update({k: meta[k] for k in ("tagset", "task", "input", "image_size") if k in meta})
    data_spec = parse_spec(DataSpec, data_block, key="data")
    num_clients, seed = int(run_cfg["federation"]["num_clients"]), int(run_cfg.get("seed", 0))
    fleet = load_data(data_spec, num_clients=num_clients, seed=seed, progress=False)
    if fleet.label_map.num_classes != int(meta["num_classes"]):
        raise ValueError(f"checkpoint predicts {meta['num_classes']} classes but its data config gives "
                         f"{fleet.label_map.num_classes} (task {data_spec.task!r})")
    count = len(fleet.heldout) if spec.parity_frames is None else min(spec.parity_frames, len(fleet.heldout))
    held = [fleet.heldout[i] for i in range(count)]
    images, masks = _resized(torch.stack([h[0] for h in held]), torch.stack([torch.as_tensor(h[1]) for h in held]),
                             size)
    same = data_block.get("name") == "synthetic" and spec.calibration_seed == seed  # e.g. a distilled student
    public, source = (fleet, f"public synthetic towns, seed {seed}") if same else \
        _public_data(spec, raw, data_block, num_clients)
    tuning = (public or fleet).clients
    return {"calibration": calibration_images(tuning, spec.calibration_frames, size), "source": source,
            "tuning": ConcatDataset(tuning), "images": images, "masks": masks}


def _torch_latency(model: torch.nn.Module, size: tuple[int, int], spec: ExportSpec, threads: int) -> Latency:
    """Batch-1 latency of the deployable PyTorch model, the baseline the ONNX files are compared to."""
    with torch_threads(threads):
        x = torch.randn(1, 3, *size)
        return torch_latency(deployable(model), x, warmup=spec.warmup, repeats=spec.repeats)


def _qat_decision(spec: ExportSpec, drop: float | None) -> tuple[bool, str]:
    """Whether quantization-aware fine-tuning runs, and why (``export.qat``: auto, true, false)."""
    if spec.qat is False:
        return False, "export.qat=false"
    if spec.network_size is not None:
        if spec.qat is True:
            raise ValueError("export.qat=true with export.network_size: QAT fine-tunes the network at its own "
                             "input; export it without network_size for QAT, or set export.qat=false")
        return False, "export.network_size: QAT runs on the network at its own input (export without it)"
    if drop is None:
        return False, "no static INT8 model to improve (export.int8=false)"
    points = 100 * drop
    if spec.qat is True:
        return True, f"export.qat=true (static INT8 loses {points:.2f} points)"
    if points > spec.qat_threshold_points:
        return True, f"static INT8 loses {points:.2f} points > export.qat_threshold_points={spec.qat_threshold_points:g}"
    return False, f"static INT8 loses {points:.2f} points <= export.qat_threshold_points={spec.qat_threshold_points:g}"


class _Batches:
    """(images, masks) batches of ``frames`` at ``size``, shuffled from ``seed``; re-iterable (one pass an epoch)."""

    def __init__(self, frames: Dataset, size: tuple[int, int], *, batch_size: int, seed: int) -> None:
        self._loader, self._size = make_loader(frames, batch_size=batch_size, shuffle=True, seed=seed), size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (_resized(images, masks, self._size) for images, masks in self._loader)


def _quantization_aware(model: torch.nn.Module, frames: dict, spec: ExportSpec, size: tuple[int, int],
                        out: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """QAT on the public frames, then ``model_int8_qat.onnx`` quantized with the activation ranges it learned."""
    batches = _Batches(frames["tuning"], size, batch_size=spec.qat_batch_size, seed=seed)
    tuned = quantization_aware_finetune(deployable(model), batches, epochs=spec.qat_epochs, lr=spec.qat_lr,
                                        seed=seed)
    path = out / "model_int8_qat.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(tuned.model, Path(tmp) / "qat_fp32.onnx", image_size=size, opset=spec.opset)
        try:
            ranges, how = conv_input_ranges(fp32, tuned.conv_ranges), "learned by QAT"
        except ValueError as err:  # the graph's convolutions could not be matched: calibrate them instead
            ranges, how = {}, f"calibrated ({err})"
        quantize_int8(fp32, path, frames["calibration"], activation_ranges=ranges)
    return path, {"epochs": tuned.epochs, "lr": spec.qat_lr, "frames": tuned.frames, "loss": tuned.loss,
                  "activation_ranges": f"{len(ranges)} convolution inputs {how}" if ranges else how}


@user_errors("fedseg-export")
def run(cfg: DictConfig) -> dict[str, Any]:
    raw = resolve(cfg)
    if not raw.get("checkpoint"):
        raise ValueError("fedseg-export needs checkpoint=PATH (a <run_dir>/checkpoints/global.pt)")
    spec = parse_spec(ExportSpec, raw["export"], key="export")
    model, meta = load_checkpoint(raw["checkpoint"])
    size_src = spec.image_size or meta.get("image_size") or raw["data"]["image_size"]
    size = (int(size_src[0]), int(size_src[1]))
    network = size if spec.network_size is None else (int(spec.network_size[0]), int(spec.network_size[1]))
    if network != size:  # the camera's frame in, resized to the network's input inside the graph
        model = AtResolution(model, network)
    threads, out = usable_threads(spec.threads), Path(raw["output_dir"])
    frames = _frames(meta, raw, spec, size)
    fp32 = export_onnx(model, out / "model_fp32.onnx", image_size=size, opset=spec.opset)
    int8, granularity = None, None
    if spec.int8:
        int8 = out / "model_int8.onnx"
        granularity = quantize_int8(fp32, int8, frames["calibration"])
    parity = check_parity(model, fp32, frames["images"], frames["masks"], int8_path=int8, threads=threads)
    ran, why = _qat_decision(spec, parity.int8_miou_drop)
    qat: dict[str, Any] = {"mode": spec.qat, "ran": ran, "reason": why}
    files = {"fp32": fp32, "int8": int8}
    if ran:
        files["int8_qat"], done = _quantization_aware(model, frames, spec, size, out, seed=int(raw.get("seed", 0)))
        tuned = check_parity(model, fp32, frames["images"], frames["masks"], int8_path=files["int8_qat"],
                             threads=threads)
        qat.update(done, miou_int8=tuned.miou_int8, int8_max_abs_diff=tuned.int8_max_abs_diff,
                   int8_miou_drop_points=_points(tuned.int8_miou_drop))
    torch_ms = _torch_latency(model, size, spec, threads)
    latency = {"torch_fp32": torch_ms.median_ms, "torch_fp32_p95": torch_ms.p95_ms}
    for name, path in files.items():
        if path is not None:
            measured = onnx_latency(path, size, threads=threads, repeats=spec.repeats, warmup=spec.warmup)
            latency[f"onnx_{name}"], latency[f"onnx_{name}_p95"] = measured.median_ms, measured.p95_ms
    deployed = "int8_qat" if ran else "int8" if int8 else "fp32"
    report = {
        "checkpoint": str(raw["checkpoint"]), "backbone": meta["backbone"], "round": meta.get("round"),
        "image_size": list(size), "network_size": list(network), "threads": threads, "opset": spec.opset,
        "files": {name: str(path) if path else None for name, path in files.items()},
        "size_mb": {"torch": state_dict_mb(deployable(model)),
                    **{name: path.stat().st_size / MB if path else None for name, path in files.items()}},
        "int8_weights": granularity,
        "calibration": {"frames": len(frames["calibration"]), "source": frames["source"]},
        "parity": {**dataclasses.asdict(parity), "int8_miou_drop": parity.int8_miou_drop,
                   "int8_miou_drop_points": _points(parity.int8_miou_drop)},
        "qat": qat, "deployed": deployed,
        "latency_ms": latency,
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)
    return report


def _points(drop: float | None) -> float | None:
    return None if drop is None else round(100 * drop, 2)


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _print_report(r: dict[str, Any]) -> None:
    p, lat, mb = r["parity"], r["latency_ms"], r["size_mb"]
    h, w = r["image_size"]
    inside = "" if r["network_size"] == r["image_size"] else " (network at {}x{} inside)".format(*r["network_size"])
    print(f"fedseg-export: {r['backbone']} at {h}x{w}{inside}, {r['threads']} threads, {p['frames']} held-out frames")
    print("| model | file MB | latency ms (median) | × torch | max |logit diff| | mIoU |")
    print("|---|---|---|---|---|---|")
    rows = [("PyTorch fp32", mb["torch"], lat["torch_fp32"], 0.0, p["miou_torch"]),
            ("ONNX fp32", mb["fp32"], lat.get("onnx_fp32"), p["fp32_max_abs_diff"], p["miou_fp32"]),
            ("ONNX INT8", mb["int8"], lat.get("onnx_int8"), p["int8_max_abs_diff"], p["miou_int8"])]
    q = r["qat"]
    if q["ran"]:
        rows.append(("ONNX INT8 + QAT", mb["int8_qat"], lat.get("onnx_int8_qat"), q["int8_max_abs_diff"],
                     q["miou_int8"]))
    for name, size, ms, diff, miou in rows:
        ratio = ms / lat["torch_fp32"] if ms is not None else None
        print(f"| {name} | {_fmt(size, '{:.1f}')} | {_fmt(ms, '{:.1f}')} | {_fmt(ratio, '{:.2f}')} | "
              f"{_fmt(diff, '{:.2e}')} | {_fmt(miou, '{:.3f}')} |")
    qat_drop = f", after QAT {q['int8_miou_drop_points']:+.2f}" if q["ran"] else ""
    print(f"fedseg-export: INT8 calibrated on {r['calibration']['frames']} frames of {r['calibration']['source']}; "
          f"mIoU drop {_fmt(p['int8_miou_drop_points'], '{:+.2f}')} points{qat_drop}; QAT: "
          f"{'ran' if q['ran'] else 'skipped'} ({q['reason']}); deployed: {r['files'][r['deployed']]}; "
          "report: export.json")


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
