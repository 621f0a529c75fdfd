"""Quantization-aware fine-tuning for the INT8 model a vehicle runs (``fedseg-export export.qat=...``).

Static INT8 (:func:`fedseg.export.quantize_int8`) rounds weights and activations the model never saw
rounded; when that costs more than a threshold, a few epochs with the rounding simulated in the forward
pass (fake quantization, straight-through gradients) let the weights move to where rounding hurts less.

Why not PyTorch's own QAT export: ``prepare_qat_fx`` traces smp's UNet, but neither its converted nor its
reference model exports to ONNX with torch 2.14's TorchScript exporter (``'torch.qscheme' object has no
attribute 'detach'``; ``zero_point must be between quant_min and quant_max``), and the dynamo exporter
needs ``onnxscript``. So the rounding ONNX Runtime will apply is simulated in eager PyTorch instead, on
the same UNet module tree (its state dict keys unchanged):

* **weights**: each convolution's weight, symmetric per output channel (ONNX Runtime's per-channel
  QInt8). BatchNorm folded into a convolution scales each output channel, which a per-channel scale
  absorbs, so rounding the unfolded weight is rounding the folded one.
* **activations**: each convolution's input, asymmetric per tensor, its range a moving average of the
  batches' min/max (``torch.ao.quantization.FakeQuantize``), as ONNX Runtime's QDQ quantizes them.

BatchNorm keeps its running statistics (eval mode) throughout: ONNX Runtime folds them into the
convolutions, so they must be the ones the weights adapted to. The loss is Hinton's distillation from
the fp32 model itself beside the labels (:func:`fedseg.distill.distillation_loss`), which keeps the
quantized model near the one it replaces. Afterwards the fake quantization is removed (float weights
kept: ONNX Runtime rounds them itself) and :func:`conv_input_ranges` names, per ONNX tensor, the
activation ranges QAT learned, for ``quantize_int8(..., activation_ranges=...)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedseg.distill import distillation_loss

QINT8_MIN, QINT8_MAX = -128, 127


class _SymmetricPerChannel(nn.Module):
    """Weight fake quantization: round to 255 symmetric levels per output channel, identity gradient."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) / 127
        rounded = (weight / scale).round().clamp(-127, 127) * scale
        return weight + (rounded - weight).detach()  # straight-through estimator


def _activation_fake_quant() -> nn.Module:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    with warnings.catch_warnings():  # torch.ao's notice that eager quantization moves to torchao
        warnings.simplefilter("ignore")
        return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=QINT8_MIN, quant_max=QINT8_MAX,
                            dtype=torch.qint8, qscheme=torch.per_tensor_affine)


@dataclass(frozen=True)
class QATResult:
    """The fine-tuned float model and what QAT learned about its activations."""

    model: nn.Module                              # fake quantization removed; export it, then quantize
    conv_ranges: list[tuple[tuple[int, ...], float, float]]  # (weight shape, rmin, rmax) per conv, run order
    epochs: int
    frames: int
    loss: float                                   # mean loss of the last epoch


class _FakeQuantized:
    """Fake quantization attached to every ``nn.Conv2d`` of a model, and removed again by :meth:`remove`."""

    def __init__(self, model: nn.Module) -> None:
        self.convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self.shapes = [tuple(conv.weight.shape) for conv in self.convs]
        self.activations = [_activation_fake_quant() for _ in self.convs]
        self._hooks = []
        for conv, quant in zip(self.convs, self.activations, strict=True):
            parametrize.register_parametrization(conv, "weight", _SymmetricPerChannel())
            self._hooks.append(conv.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:])))

    def run_order(self, model: nn.Module, x: torch.Tensor) -> list[int]:
        """Indices into ``self.convs`` in the order one forward pass calls them."""
        order: list[int] = []
        hooks = [conv.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i))
                 for i, conv in enumerate(self.convs)]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return order

    def ranges(self, order: list[int]) -> list[tuple[tuple[int, ...], float, float]]:
        out = []
        for i in order:
            observer: Any = self.activations[i].activation_post_process  # MovingAverageMinMaxObserver
            out.append((self.shapes[i], float(observer.min_val), float(observer.max_val)))
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for conv in self.convs:  # keep the float weights QAT trained; ONNX Runtime rounds them itself
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)


def _freeze_norms(model: nn.Module) -> None:
    """Training mode for the weights, eval mode (running statistics) for every normalisation layer."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def quantization_aware_finetune(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                                epochs: int, lr: float, seed: int, alpha: float = 0.5,
                                temperature: float = 2.0) -> QATResult:
    """Fine-tune a CPU copy of ``model`` (deployable form) with INT8 rounding simulated; see the module doc.

    ``batches``: (images, masks) batches of public frames, iterated once per epoch.
    """
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    student = copy.deepcopy(model).cpu()
    fake = _FakeQuantized(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    loss_sum, frames = 0.0, 0
    for _ in range(epochs):
        _freeze_norms(student)
        loss_sum, frames = 0.0, 0
        for images, masks in batches:
            with torch.no_grad():
                soft = teacher(images)
            loss = distillation_loss(student(images), soft, masks, alpha=alpha, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, frames = loss_sum + float(loss.detach()) * len(images), frames + len(images)
    student.eval()
    first = next(iter(batches))[0][:1]
    ranges = fake.ranges(fake.run_order(student, first))
    fake.remove()
    return QATResult(model=student.eval(), conv_ranges=ranges, epochs=epochs, frames=frames,
                     loss=loss_sum / frames if frames else float("nan"))


def conv_input_ranges(fp32_path: str | Path, conv_ranges: list[tuple[tuple[int, ...], float, float]]
                      ) -> dict[str, tuple[float, float]]:
    """The ONNX tensor feeding each convolution of ``fp32_path`` -> the (rmin, rmax) QAT learned for it.

    The exporter writes nodes in the order the model runs them, so the i-th ``Conv`` node is the i-th
    convolution called; each pair's weight shapes must agree, else ``ValueError`` (the caller then
    calibrates instead). A tensor feeding several convolutions gets the union of their ranges.
    """
    graph = onnx.load(str(fp32_path)).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if len(convs) != len(conv_ranges):
        raise ValueError(f"{fp32_path}: {len(convs)} Conv nodes but the model ran {len(conv_ranges)} convolutions")
    out: dict[str, tuple[float, float]] = {}
    for node, (shape, low, high) in zip(convs, conv_ranges, strict=True):
        if weights.get(node.input[1]) != shape:
            raise ValueError(f"{fp32_path}: Conv {node.name} has weight {weights.get(node.input[1])}, the model's "
                             f"convolution in its place {shape}")
        name = node.input[0]
        if name in out:
            low, high = min(low, out[name][0]), max(high, out[name][1])
        out[name] = (min(low, 0.0), max(high, 0.0))  # a quantized range always holds zero
    return out
