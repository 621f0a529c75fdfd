"""ONNX export of the tiny UNet: fp32 parity with PyTorch, INT8 runs in ONNX Runtime with the right shape."""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.export import _quiet_root_logger, check_parity, export_onnx, quantize_int8
from fedseg.measurement import onnx_latency, onnx_session
from fedseg.models import build_model

SIZE = (32, 64)
CLASSES = 3
# Float rounding only: ONNX Runtime and PyTorch order the same fp32 sums differently.
FP32_TOLERANCE = 1e-3
# INT8 on the random-init tiny UNet (logits within about +-1), measured: max |logit diff| 0.065, 99.8 %
# of pixels keep their class, mIoU drop 0.105 against PyTorch's own masks (3 classes, small ones move
# most). The limits leave room for other CPUs' INT8 kernels, and still catch a broken quantizer.
INT8_LOGIT_TOLERANCE = 0.3
INT8_MIOU_DROP_LIMIT = 0.25


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("tiny", CLASSES).eval()
    frames = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, folder / "fp32.onnx", image_size=SIZE)
    int8 = folder / "int8.onnx"
    assert quantize_int8(fp32, int8, frames[:2]) in ("per-channel", "per-tensor")
    return model, fp32, int8, frames


def test_fp32_parity_and_int8_outputs(exported: tuple) -> None:
    # Prepare: the masks are PyTorch's own predictions, so PyTorch scores mIoU 1 and every point INT8
    # loses is a pixel whose class quantization changed.
    model, fp32, int8, frames = exported
    with torch.no_grad():
        masks = model(frames).argmax(1)
    # Execute
    parity = check_parity(model, fp32, frames, masks, int8_path=int8, threads=1)
    out = onnx_session(int8, threads=1).run(None, {"image": frames.numpy()})[0]  # dynamic batch of 4
    # Assert
    assert parity.frames == 4
    assert parity.fp32_max_abs_diff < FP32_TOLERANCE
    assert parity.miou_torch == 1.0 and parity.miou_fp32 == pytest.approx(1.0, abs=1e-6)
    assert parity.int8_max_abs_diff is not None and parity.miou_int8 is not None
    # Really quantized (logits move far more than fp32 rounding), yet the masks mostly survive.
    assert FP32_TOLERANCE < parity.int8_max_abs_diff < INT8_LOGIT_TOLERANCE
    assert parity.int8_miou_drop == pytest.approx(1.0 - parity.miou_int8)
    assert 0.0 <= parity.int8_miou_drop < INT8_MIOU_DROP_LIMIT
    assert out.shape == (4, CLASSES, *SIZE) and np.isfinite(out).all()
    assert int8.stat().st_size < fp32.stat().st_size


def test_onnx_latency_of_exported_model(exported: tuple) -> None:
    fp32 = exported[1]
    latency = onnx_latency(fp32, SIZE, threads=1, repeats=3, warmup=1)
    assert 0 < latency.median_ms <= latency.p95_ms


def test_missing_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        onnx_session(tmp_path / "nope.onnx", threads=1)


def test_load_checkpoint_round_trip_and_errors(exported: tuple, tmp_path: Path) -> None:
    from fedseg.checkpoints import load_checkpoint

    model = exported[0]
    path = tmp_path / "global.pt"
    torch.save({"model_state": model.state_dict(), "backbone": "tiny", "num_classes": CLASSES,
                "image_size": list(SIZE), "round": 2}, path)
    loaded, meta = load_checkpoint(path)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert meta["round"] == 2 and "model_state" not in meta
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"backbone": "tiny"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a fedseg checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_load_checkpoint_rejects_non_checkpoint_files_naming_them(tmp_path: Path) -> None:
    # Prepare: random bytes, a plain pickle of a list, and a torch file holding a list (loads, not a dict).
    from fedseg.checkpoints import load_checkpoint

    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(512))
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps([1, 2, 3]))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("random.pt", "pickled.pt", "list.pt"):
        path = tmp_path / name
        # Execute / Assert: one ValueError that names the file, never an unpickling traceback.
        with warnings.catch_warnings():  # torch notes the plain pickle's protocol; irrelevant here
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(ValueError, match=re.escape(f"{path} is not a fedseg checkpoint")):
                load_checkpoint(path)


def test_int8_per_tensor_fallbacks_are_one_line_not_one_per_weight(caplog: pytest.LogCaptureFixture) -> None:
    # ONNX Runtime warns once per 1-D weight and pass (InceptionNeXt's layer scales: dozens of lines);
    # fedseg says how many weights fell back to per-tensor scales, once, and lets other warnings through.
    with caplog.at_level(logging.WARNING), _quiet_root_logger():
        for name in ("stages_0.norm.weight", "stages_1.norm.weight", "stages_0.norm.weight"):
            logging.warning(f"Axis 1 is out-of-range for weight '{name}' with rank 1")  # noqa: LOG015 (as ORT)
        logging.warning("something else")  # noqa: LOG015

    messages = [record.getMessage() for record in caplog.records]
    assert not any(m.startswith("Axis ") for m in messages) and "something else" in messages
    assert [m for m in messages if m.startswith("INT8:")] == [
        ("INT8: 2 one-dimensional weight(s) have no channel axis and were quantized per-tensor "
         "(e.g. stages_0.norm.weight)")]
    assert not logging.getLogger().filters
