"""Quantization-aware fine-tuning (fedseg.qat) and fedseg-export's export.qat: tiny UNet, 32 px frames, seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from onnx import numpy_helper

from fedseg.export import check_parity, export_onnx, quantize_int8
from fedseg.measurement import onnx_session
from fedseg.models import build_model
from fedseg.qat import conv_input_ranges, quantization_aware_finetune
from fedseg.sim._cli import CONF_DIR
from fedseg.sim.export import ExportSpec, _qat_decision

SIZE = (32, 32)
CLASSES = 3


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, *SIZE, generator=generator)
    masks = torch.randint(0, CLASSES, (8, *SIZE), generator=generator)
    return [(images[:4], masks[:4]), (images[4:], masks[4:])]


def test_qat_exports_an_int8_onnx_that_runs_with_the_ranges_it_learned(tmp_path: Path) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("tiny", CLASSES).eval()
    batches = _batches()
    # Execute
    tuned = quantization_aware_finetune(model, batches, epochs=2, lr=1e-3, seed=0)
    fp32 = export_onnx(tuned.model, tmp_path / "qat_fp32.onnx", image_size=SIZE)
    ranges = conv_input_ranges(fp32, tuned.conv_ranges)
    int8 = tmp_path / "qat_int8.onnx"
    quantize_int8(fp32, int8, batches[0][0][:2], activation_ranges=ranges)
    images, masks = batches[1]
    parity = check_parity(model, fp32, images, masks, int8_path=int8, threads=1)
    # Assert: the weights moved, the state dict is the model's own (no fake-quant leftovers), every conv ran once.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(tuned.model.state_dict()) == set(model.state_dict())
    assert not torch.equal(tuned.model.state_dict()["segmentation_head.0.weight"],
                           model.state_dict()["segmentation_head.0.weight"])
    assert len(tuned.conv_ranges) == len(convs) and tuned.epochs == 2 and tuned.frames == 8
    assert all(low <= 0.0 <= high for low, high in ranges.values())
    # The network input feeds the first convolution: its INT8 scale is the learned range's, (rmax-rmin)/255.
    low, high = ranges["image"]
    scales = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    assert float(scales["image_scale"]) == pytest.approx((high - low) / 255, rel=1e-5)
    # Runs in ONNX Runtime, and its mIoU against the fp32 model's is reported.
    out = onnx_session(int8, threads=1).run(None, {"image": images.numpy()})[0]
    assert out.shape == (4, CLASSES, *SIZE) and np.isfinite(out).all()
    assert parity.miou_int8 is not None and parity.int8_miou_drop == pytest.approx(
        parity.miou_torch - parity.miou_int8)


def test_conv_ranges_that_do_not_match_the_graph_are_refused_naming_the_file(tmp_path: Path) -> None:
    fp32 = export_onnx(build_model("tiny", CLASSES), tmp_path / "m.onnx", image_size=SIZE)
    with pytest.raises(ValueError, match=r"m\.onnx: \d+ Conv nodes but the model ran 1 convolutions"):
        conv_input_ranges(fp32, [((8, 3, 3, 3), -1.0, 1.0)])


@pytest.mark.parametrize(("qat", "drop", "ran", "reason"), [
    ("auto", 0.004, False, "0.40 points <= export.qat_threshold_points=0.5"),  # within half a point: static INT8
    ("auto", 0.006, True, "0.60 points > export.qat_threshold_points=0.5"),
    (True, 0.0, True, "export.qat=true"),
    (False, 0.3, False, "export.qat=false"),
    ("auto", None, False, "export.int8=false"),
])
def test_qat_auto_runs_only_when_static_int8_loses_more_than_the_threshold(
        qat: Any, drop: float | None, ran: bool, reason: str) -> None:
    decided, why = _qat_decision(ExportSpec(qat=qat), drop)
    assert decided is ran and reason in why


def _export(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """fedseg-export in this process on a random tiny checkpoint (13 classes: the `driving` task)."""
    from fedseg.sim.export import run

    torch.manual_seed(0)
    checkpoint = tmp_path / "global.pt"
    torch.save({"model_state": build_model("tiny", 13).state_dict(), "backbone": "tiny", "num_classes": 13,
                "decoder_channels": None, "image_size": list(SIZE), "round": 0}, checkpoint)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", return_hydra_config=True, overrides=[
            "experiment=smoke", f"checkpoint={checkpoint}", f"data.root={tmp_path / 'data'}",
            f"data.image_size=[{SIZE[0]},{SIZE[1]}]", "data.frames_per_vehicle=4", "data.heldout_frames=4",
            "export.repeats=2", "export.warmup=1", "export.calibration_frames=2", *overrides])
    cfg.hydra.runtime.output_dir = str(tmp_path / "export")
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        return run(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_export_qat_true_writes_and_deploys_the_qat_model(tmp_path: Path) -> None:
    report = _export(tmp_path, "export.qat=true", "export.qat_epochs=1", "export.qat_batch_size=4")
    out = tmp_path / "export"
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(report))
    qat = report["qat"]
    assert qat["ran"] and qat["epochs"] == 1 and qat["frames"] == 12  # 3 vehicles x 4 public frames
    assert qat["activation_ranges"].endswith("convolution inputs learned by QAT")
    assert qat["int8_miou_drop_points"] == pytest.approx(100 * (report["parity"]["miou_torch"] - qat["miou_int8"]),
                                                         abs=0.01)
    assert report["deployed"] == "int8_qat" and (out / "model_int8_qat.onnx").is_file()
    assert report["latency_ms"]["onnx_int8_qat_p95"] > 0
    assert report["calibration"] == {"frames": 2, "source": "public synthetic towns, seed 1001"}


def test_export_qat_auto_keeps_static_int8_within_the_threshold(tmp_path: Path) -> None:
    report = _export(tmp_path, "export.qat_threshold_points=1000")
    assert not report["qat"]["ran"] and "<= export.qat_threshold_points=1000" in report["qat"]["reason"]
    assert report["deployed"] == "int8" and not (tmp_path / "export" / "model_int8_qat.onnx").exists()
    assert report["parity"]["int8_miou_drop_points"] == pytest.approx(100 * report["parity"]["int8_miou_drop"],
                                                                      abs=0.01)


def test_export_network_size_runs_the_network_smaller_inside_a_graph_that_takes_the_camera_frame(
        tmp_path: Path) -> None:
    # Prepare: the tiny checkpoint trained at 32x32, exported for a 64x64 camera with the network at 32x32.
    report = _export(tmp_path, "export.image_size=[64,64]", "export.network_size=[32,32]", "export.qat=false")
    model = build_model("tiny", 13)
    model.load_state_dict(torch.load(tmp_path / "global.pt", weights_only=True)["model_state"])
    model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    # Execute
    onnx_out = onnx_session(report["files"]["fp32"], threads=1).run(None, {"image": x.numpy()})[0]

    # Assert: 64x64 in and out, and what comes out is the 32x32 network's logits resized, by hand.
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        expected = torch.nn.functional.interpolate(model(small), size=(64, 64), mode="bilinear",
                                                   align_corners=False)
    assert report["image_size"] == [64, 64] and report["network_size"] == [32, 32]
    assert onnx_out.shape == (1, 13, 64, 64)
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4)
    assert report["qat"]["reason"] == "export.qat=false"


def test_export_qat_true_with_a_network_size_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"export.qat=true with export.network_size: .*set export.qat=false"):
        _qat_decision(ExportSpec(qat=True, network_size=(32, 32)), 0.02)
    assert _qat_decision(ExportSpec(qat="auto", network_size=(32, 32)), 0.02)[0] is False
