"""ONNX export of the tiny UNet: fp32 parity with PyTorch, INT8 runs in ONNX Runtime with the right shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.export import check_parity, export_onnx, onnx_session, quantize_int8
from fedseg.models import build_model

SIZE = (32, 64)
CLASSES = 3
# Float rounding only: ONNX Runtime and PyTorch order the same fp32 sums differently.
FP32_TOLERANCE = 1e-3


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
    model, fp32, int8, frames = exported
    masks = torch.randint(0, CLASSES, (4, *SIZE), generator=torch.Generator().manual_seed(2))
    parity = check_parity(model, fp32, frames, masks, int8_path=int8, threads=1)
    assert parity.frames == 4
    assert parity.fp32_max_abs_diff < FP32_TOLERANCE
    assert parity.miou_fp32 == pytest.approx(parity.miou_torch, abs=1e-6)
    assert parity.int8_max_abs_diff is not None and parity.int8_miou_drop is not None
    out = onnx_session(int8, threads=1).run(None, {"image": frames.numpy()})[0]  # dynamic batch of 4
    assert out.shape == (4, CLASSES, *SIZE) and np.isfinite(out).all()
    assert int8.stat().st_size < fp32.stat().st_size


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
