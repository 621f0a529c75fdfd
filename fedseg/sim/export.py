"""``fedseg-export``: a trained checkpoint -> ONNX fp32 + INT8 for an edge box, with parity and latency.

    fedseg-export checkpoint=outputs/RUN/checkpoints/global.pt hydra.run.dir=OUT

Writes ``model_fp32.onnx``, ``model_int8.onnx`` and ``export.json`` into the run dir and prints
parity (fp32: max |logit diff| vs PyTorch; INT8: mIoU drop on held-out frames) and batch-1 latency
of PyTorch, ONNX fp32 and ONNX INT8 measured in the same run.
"""

from __future__ import annotations

# (OMP_WAIT_POLICY=PASSIVE is set by the sim package before torch loads: see fedseg/sim/__init__.py.)
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fedseg.checkpoints import load_checkpoint
from fedseg.config import DataSpec, parse_spec
from fedseg.data import load_data
from fedseg.export import check_parity, deployable, export_onnx, quantize_int8
from fedseg.measurement import (
    MB,
    calibration_images,
    onnx_latency,
    state_dict_mb,
    torch_latency,
    torch_threads,
    usable_threads,
)
from fedseg.sim._cli import CONF_DIR, resolve, user_errors


@dataclass(frozen=True)
class ExportSpec:
    """The ``export`` block of ``conf/export.yaml``."""

    image_size: tuple[int, int] | None = None
    opset: int = 17
    int8: bool = True
    calibration_frames: int = 8
    parity_frames: int | None = 16
    threads: int = 2
    warmup: int = 3
    repeats: int = 20


def _frames(meta: dict[str, Any], raw: dict[str, Any], spec: ExportSpec, size: tuple[int, int]) -> dict:
    """Calibration images (vehicles' frames) and parity images + masks (held-out), at ``size``."""
    run_cfg = meta.get("config") or raw  # the training run's own data and split, when it was saved
    data_block = dict(run_cfg["data"])
    if not meta.get("config"):  # at least read frames the way the model was trained on them
        data_block.update({k: meta[k] for k in ("tagset", "task", "input", "image_size") if k in meta})
    data_spec = parse_spec(DataSpec, data_block, key="data")
    fleet = load_data(data_spec, num_clients=int(run_cfg["federation"]["num_clients"]),
                      seed=int(run_cfg.get("seed", 0)), progress=False)
    if fleet.label_map.num_classes != int(meta["num_classes"]):
        raise ValueError(f"checkpoint predicts {meta['num_classes']} classes but its data config gives "
                         f"{fleet.label_map.num_classes} (task {data_spec.task!r})")
    count = len(fleet.heldout) if spec.parity_frames is None else min(spec.parity_frames, len(fleet.heldout))
    held = [fleet.heldout[i] for i in range(count)]
    images, masks = torch.stack([h[0] for h in held]), torch.stack([torch.as_tensor(h[1]) for h in held])
    if tuple(images.shape[-2:]) != size:  # exporting at another size than trained: resize the frames
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
    calibration = calibration_images(fleet.clients, spec.calibration_frames, size)
    return {"calibration": calibration, "images": images, "masks": masks}


def _torch_latency(model: torch.nn.Module, size: tuple[int, int], spec: ExportSpec, threads: int) -> float:
    """Median batch-1 latency of the deployable PyTorch model, the baseline the ONNX files are compared to."""
    with torch_threads(threads):
        x = torch.randn(1, 3, *size)
        return torch_latency(deployable(model), x, warmup=spec.warmup, repeats=spec.repeats).median_ms


@user_errors("fedseg-export")
def run(cfg: DictConfig) -> dict[str, Any]:
    raw = resolve(cfg)
    if not raw.get("checkpoint"):
        raise ValueError("fedseg-export needs checkpoint=PATH (a <run_dir>/checkpoints/global.pt)")
    spec = parse_spec(ExportSpec, raw["export"], key="export")
    model, meta = load_checkpoint(raw["checkpoint"])
    size_src = spec.image_size or meta.get("image_size") or raw["data"]["image_size"]
    size = (int(size_src[0]), int(size_src[1]))
    threads, out = usable_threads(spec.threads), Path(raw["output_dir"])
    frames = _frames(meta, raw, spec, size)
    fp32 = export_onnx(model, out / "model_fp32.onnx", image_size=size, opset=spec.opset)
    int8, granularity = None, None
    if spec.int8:
        int8 = out / "model_int8.onnx"
        granularity = quantize_int8(fp32, int8, frames["calibration"])
    parity = check_parity(model, fp32, frames["images"], frames["masks"], int8_path=int8, threads=threads)
    latency = {"torch_fp32": _torch_latency(model, size, spec, threads)}
    for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8)):
        if path is not None:
            measured = onnx_latency(path, size, threads=threads, repeats=spec.repeats, warmup=spec.warmup)
            latency[name], latency[f"{name}_p95"] = measured.median_ms, measured.p95_ms
    report = {
        "checkpoint": str(raw["checkpoint"]), "backbone": meta["backbone"], "round": meta.get("round"),
        "image_size": list(size), "threads": threads, "opset": spec.opset,
        "files": {"fp32": str(fp32), "int8": str(int8) if int8 else None},
        "size_mb": {"torch": state_dict_mb(deployable(model)), "fp32": fp32.stat().st_size / MB,
                    "int8": int8.stat().st_size / MB if int8 else None},
        "int8_weights": granularity,
        "parity": {**dataclasses.asdict(parity), "int8_miou_drop": parity.int8_miou_drop},
        "latency_ms": latency,
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)
    return report


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _print_report(r: dict[str, Any]) -> None:
    p, lat, mb = r["parity"], r["latency_ms"], r["size_mb"]
    h, w = r["image_size"]
    print(f"fedseg-export: {r['backbone']} at {h}x{w}, {r['threads']} threads, {p['frames']} held-out frames")
    print("| model | file MB | latency ms (median) | × torch | max |logit diff| | mIoU |")
    print("|---|---|---|---|---|---|")
    rows = [("PyTorch fp32", mb["torch"], lat["torch_fp32"], 0.0, p["miou_torch"]),
            ("ONNX fp32", mb["fp32"], lat.get("onnx_fp32"), p["fp32_max_abs_diff"], p["miou_fp32"]),
            ("ONNX INT8", mb["int8"], lat.get("onnx_int8"), p["int8_max_abs_diff"], p["miou_int8"])]
    for name, size, ms, diff, miou in rows:
        ratio = ms / lat["torch_fp32"] if ms is not None else None
        print(f"| {name} | {_fmt(size, '{:.1f}')} | {_fmt(ms, '{:.1f}')} | {_fmt(ratio, '{:.2f}')} | "
              f"{_fmt(diff, '{:.2e}')} | {_fmt(miou, '{:.3f}')} |")
    print(f"fedseg-export: INT8 mIoU drop {_fmt(p['int8_miou_drop'], '{:+.4f}')}; files: "
          f"{r['files']['fp32']}, {r['files']['int8']}; report: export.json")


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
