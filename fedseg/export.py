"""Export a trained UNet for an edge box: ONNX fp32, INT8 (ONNX Runtime static quantization), parity.

The exported files are what a vehicle runs for inference, so parity is checked against the PyTorch
model on real held-out frames: fp32 by the largest absolute logit difference (should be float
rounding only), INT8 by the mIoU it loses (its logits legitimately move; what matters is the masks).

Uses the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs ``onnxscript``,
which fedseg does not depend on, and the TorchScript path exports smp's UNet with every encoder
in the registry at opset 17. Timing the exported files (and the PyTorch model beside them) is
:mod:`fedseg.measurement`'s job, shared with ``fedseg-search``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from fedseg.measurement import onnx_session
from fedseg.metrics import confusion_matrix, scores

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class Parity:
    """How far the exported models are from the PyTorch model on the same frames."""

    frames: int
    fp32_max_abs_diff: float  # largest |logit_onnx - logit_torch| over all frames, pixels, classes
    int8_max_abs_diff: float | None
    miou_torch: float | None  # None when no masks were given
    miou_fp32: float | None
    miou_int8: float | None

    @property
    def int8_miou_drop(self) -> float | None:
        """mIoU lost by INT8 against PyTorch (positive: INT8 is worse)."""
        if self.miou_torch is None or self.miou_int8 is None:
            return None
        return self.miou_torch - self.miou_int8


class AtResolution(nn.Module):
    """``model`` fed its input resized to ``size`` (H, W), its logits resized back to the input's.

    A network that runs below the camera's resolution, as one module: the search scores candidates at
    other input sizes through it (every candidate's mIoU on the same held-out masks), and
    ``fedseg-export export.network_size=`` exports it, so the deployed graph takes the camera's frame.
    """

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.size = model, (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))
        return F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy in inference form: re-parameterisable blocks (MobileOne) fused.

    MobileOne trains several parallel branches and folds them into one convolution for inference;
    the folded form is what a vehicle should run, so exports and latency measurements use it. A
    block that cannot be folded (e.g. BatchNorm already replaced by GroupNorm for DP) stays as is.
    """
    copied = copy.deepcopy(model).to("cpu").eval()
    for module in list(copied.modules()):
        reparameterize = getattr(module, "reparameterize", None)
        if callable(reparameterize) and module is not copied:
            try:
                reparameterize()
            except (AttributeError, TypeError, RuntimeError):  # unfused blocks are still correct
                pass
    return copied


def export_onnx(model: nn.Module, path: str | Path, *, image_size: Sequence[int], opset: int = 17) -> Path:
    """Write ``model`` (in eval mode, on CPU) to ``path`` as ONNX with a dynamic batch axis.

    The caller's model is left untouched: its :func:`deployable` copy is exported.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = deployable(model)
    height, width = int(image_size[0]), int(image_size[1])
    dummy = torch.zeros(1, 3, height, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice: module docstring
        # Strided slices (timm's "same" padding) stay unfolded: harmless, and parity checks the result.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            cpu_model, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


class _PerTensorFallbacks(logging.Filter):
    """Holds back ONNX Runtime's warning for each weight per-channel quantization has no channel axis for
    (a 1-D layer scale, as InceptionNeXt's: one line per weight and calibration pass); such a weight is
    quantized per-tensor. :func:`_quiet_root_logger` says how many in one line instead."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Axis ") and " is out-of-range for weight '" in message:
            self.weights.add(message.split("'")[1])
            return False
        return True


@contextlib.contextmanager
def _quiet_root_logger(level: int = logging.WARNING) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    fallbacks = _PerTensorFallbacks()
    root.addFilter(fallbacks)
    try:
        yield
    finally:
        root.removeFilter(fallbacks)
        root.setLevel(previous)
    if fallbacks.weights:
        logging.getLogger("fedseg").warning(
            f"INT8: {len(fallbacks.weights)} one-dimensional weight(s) have no channel axis and were quantized "
            f"per-tensor (e.g. {min(fallbacks.weights)})")


class _FrameReader(CalibrationDataReader):
    """ONNX Runtime CalibrationDataReader over a few frames, one batch-1 feed at a time."""

    def __init__(self, images: np.ndarray) -> None:
        self._feeds = iter([{INPUT_NAME: image[None].astype(np.float32)} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the reader protocol; calibration reads the frames once
        pass


def quantize_int8(fp32_path: str | Path, int8_path: str | Path,
                  calibration_images: np.ndarray | torch.Tensor, *, per_channel: bool = True,
                  activation_ranges: Mapping[str, tuple[float, float]] | None = None) -> str:
    """Statically quantize an fp32 ONNX model to INT8 (QDQ, signed 8-bit weights and activations).

    Activation ranges come from ``calibration_images`` (N,3,H,W, normalised like training inputs);
    a handful of real frames is enough for MinMax calibration. Per-channel weight scales keep
    depthwise convolutions accurate; if ONNX Runtime rejects them for some graph, the model is
    quantized per-tensor instead. Returns the weight granularity used ("per-channel"/"per-tensor").
    ``activation_ranges``: ONNX tensor name -> (rmin, rmax) replacing calibration for those tensors
    (the ranges quantization-aware fine-tuning learned: :func:`fedseg.qat.conv_input_ranges`).
    """
    images = calibration_images.detach().cpu().numpy() if isinstance(calibration_images, torch.Tensor) \
        else np.asarray(calibration_images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration_images must be a non-empty (N,3,H,W) array, got shape {images.shape}")
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference + graph cleanup first, as ONNX Runtime recommends before quantizing.
        # Symbolic shape inference is skipped: the batch axis is the only symbol and it costs seconds.
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        overrides = _range_overrides(prepped, activation_ranges or {})
        granularities = ("per-channel", "per-tensor") if per_channel else ("per-tensor",)
        for granularity in granularities:
            try:
                with _quiet_root_logger():  # ORT logs one INFO line per copied bias to the root logger
                    quantize_static(str(prepped), str(int8_path), _FrameReader(images),
                                    quant_format=QuantFormat.QDQ, per_channel=granularity == "per-channel",
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    extra_options={"TensorQuantOverrides": overrides} if overrides else None)
                return granularity
            except Exception:
                if granularity == granularities[-1]:
                    raise
    raise AssertionError("unreachable")


def _range_overrides(model_path: Path, ranges: Mapping[str, tuple[float, float]]) -> dict[str, list[dict]]:
    """ONNX Runtime's ``TensorQuantOverrides`` for the named ranges the graph still has.

    Graph cleanup may rename a tensor (an op fused into its producer); such a tensor keeps its
    calibrated range, and a warning says how many did.
    """
    if not ranges:
        return {}
    graph = onnx.load(str(model_path)).graph
    names = {name for node in graph.node for name in node.input}
    kept = {name: r for name, r in ranges.items() if name in names}
    if len(kept) < len(ranges):
        logging.getLogger("fedseg").warning(
            f"INT8: {len(ranges) - len(kept)} of {len(ranges)} learned activation ranges name tensors the "
            "cleaned graph no longer has; those keep their calibrated ranges")
    return {name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in kept.items()}


def _miou(preds: list[np.ndarray], masks: np.ndarray, num_classes: int) -> float:
    """mIoU from one confusion matrix summed over all frames (fedseg.metrics' definition)."""
    confmat = confusion_matrix(torch.as_tensor(np.concatenate(preds)), torch.as_tensor(masks), num_classes)
    return float(scores(confmat, [str(c) for c in range(num_classes)])["miou"])


def check_parity(model: nn.Module, fp32_path: str | Path, images: np.ndarray | torch.Tensor,
                 masks: np.ndarray | torch.Tensor | None = None, *, int8_path: str | Path | None = None,
                 threads: int = 2, batch_size: int = 4) -> Parity:
    """Compare ONNX fp32 (and INT8) with the PyTorch ``model`` on the same frames.

    ``images``: (N,3,H,W) normalised frames; ``masks``: (N,H,W) labels for mIoU (optional).
    Confusion matrices are summed over all frames before IoU is taken.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    sessions = {"fp32": onnx_session(fp32_path, threads=threads)}
    if int8_path is not None:
        sessions["int8"] = onnx_session(int8_path, threads=threads)
    diffs = dict.fromkeys(sessions, 0.0)
    preds: dict[str, list[np.ndarray]] = {name: [] for name in ("torch", *sessions)}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        with torch.inference_mode():
            reference = cpu_model(batch).numpy()
        preds["torch"].append(reference.argmax(1))
        for name, session in sessions.items():
            logits = session.run(None, {INPUT_NAME: batch.numpy()})[0]
            diffs[name] = max(diffs[name], float(np.abs(logits - reference).max()))
            preds[name].append(logits.argmax(1))
    mious: dict[str, float | None] = dict.fromkeys(preds)
    if masks is not None:
        labels = np.asarray(masks)
        num_classes = int(reference.shape[1])
        for name, chunks in preds.items():
            mious[name] = _miou(chunks, labels, num_classes)
    return Parity(frames=len(x), fp32_max_abs_diff=diffs["fp32"], int8_max_abs_diff=diffs.get("int8"),
                  miou_torch=mious["torch"], miou_fp32=mious["fp32"], miou_int8=mious.get("int8"))
