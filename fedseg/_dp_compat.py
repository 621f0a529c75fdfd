"""Rewrites that make smp/timm encoders trainable under Opacus' per-sample gradient hooks.

Opacus' ``hooks`` (and ``ghost``) modes put a full backward hook on every Conv2d/GroupNorm/Linear.
PyTorch then hands the next op a *view* of that layer's output, and modifying it in place fails
("Output 0 of BackwardHookFunction is a view and is being modified inplace"). ResNet blocks do
exactly that (``out += identity`` right after the last norm), and so does every ``inplace=True``
activation. The fixes here change no parameter or buffer, so state-dict keys stay as they were.

Also here: the per-frame loss ghost clipping needs, and unwrapping Opacus' model wrapper.
"""

from __future__ import annotations

import copy
import math

import timm.models.resnet as timm_resnet
import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from opacus.grad_sample import AbstractGradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedseg.labels import IGNORE_INDEX


class _TorchvisionBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock (smp ``resnet18/34``) with an out-of-place residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # was `out += identity`


class _TorchvisionBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck (smp ``resnet50+``) with an out-of-place residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _TimmBasicBlock(timm_resnet.BasicBlock):
    """timm's BasicBlock (``tu-resnet*``) with an out-of-place residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(  # type: ignore[misc]  # timm annotates aa as Optional
            self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(x + shortcut)


class _TimmBottleneck(timm_resnet.Bottleneck):
    """timm's Bottleneck (``tu-resnetrs50`` and friends) with an out-of-place residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(  # type: ignore[misc]  # timm annotates aa as Optional
            self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(x + shortcut)


# Exact class -> out-of-place subclass. Exact match on purpose: a subclass of these may have its
# own forward, which a swapped-in forward would silently replace.
_OUT_OF_PLACE_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    tv_resnet.BasicBlock: _TorchvisionBasicBlock,
    tv_resnet.Bottleneck: _TorchvisionBottleneck,
    timm_resnet.BasicBlock: _TimmBasicBlock,
    timm_resnet.Bottleneck: _TimmBottleneck,
}


def make_residuals_out_of_place(model: nn.Module) -> int:
    """Swap known residual blocks to out-of-place subclasses in place; return how many were swapped.

    Swapping ``__class__`` (rather than binding a new forward on each instance) keeps the module
    picklable and deep-copyable, and leaves its parameters, buffers and keys untouched.
    """
    swapped = 0
    for module in model.modules():
        replacement = _OUT_OF_PLACE_BLOCKS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            swapped += 1
    return swapped


def disable_inplace(model: nn.Module) -> int:
    """Set ``inplace=False`` on every module that has the flag (ReLU, ReLU6, SiLU, Hardswish, Dropout…)."""
    changed = 0
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]
            changed += 1
    return changed


def batchnorm_to_groupnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm (timm's ``BatchNormAct2d`` included) by GroupNorm, in place.

    DP-SGD needs per-sample gradients, which BatchNorm's batch statistics forbid. Opacus's
    ``ModuleValidator.fix`` only matches exact ``nn.BatchNorm*`` types, so it silently misses timm's
    ``BatchNormAct2d`` (the timm EfficientNet/MobileNetV3 families); this handles both. The group count
    is ``gcd(32, C)`` because ``min(32, C)`` does not divide channel counts such as 40 or 112.
    """
    from timm.layers import BatchNormAct2d  # local: only DP paths need it

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            norm = nn.GroupNorm(math.gcd(32, child.num_features), child.num_features, affine=child.affine)
            # Plain nn modules only, so every Opacus grad-sample mode recognises them.
            new = nn.Sequential(norm, child.drop, child.act) if isinstance(child, BatchNormAct2d) else norm
            setattr(parent, name, new)
    return model


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that every grad-sample mode can train; parameters keep their values.

    BatchNorm mixes the samples of a batch, so it becomes GroupNorm (:func:`batchnorm_to_groupnorm`,
    which unlike Opacus' fixer also catches timm's ``BatchNormAct2d`` subclass). Residual adds and
    ``inplace=True`` activations become out-of-place (module docstring says why). The result's
    state-dict keys differ from the BatchNorm model's (no running stats), so a DP run's server must
    build its global model with this function too.
    """
    was_training = model.training
    fixed = batchnorm_to_groupnorm(copy.deepcopy(model))  # the caller's model stays untouched
    make_residuals_out_of_place(fixed)
    disable_inplace(fixed)
    # Opacus validates exact types only, so a BatchNorm subclass would pass it and silently break
    # the per-frame guarantee: check by isinstance as well.
    left = [name for name, m in fixed.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    errors = ModuleValidator.validate(fixed.train(), strict=False)
    if left or errors:
        raise ValueError(f"model still not DP-compatible after fixing: batch norms {left[:5]}, {errors}")
    return fixed.train(was_training)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus wrapper, with Opacus' hooks and per-sample fields removed."""
    if isinstance(model, AbstractGradSampleModule):
        model._close()  # removes hooks and grad_sample attributes; training the wrapper stops working
        return model._module
    return model


def unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without Opacus' ``_module.`` prefix: the keys of the (DP-compatible) plain model."""
    return getattr(model, "_module", model).state_dict()


def per_sample_segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per frame, shape ``[B]``: each frame's mean over its own valid pixels.

    DP's unit is a frame, so a frame's loss must not depend on the other frames in its batch
    (the batch-wide pixel mean of ``engine.segmentation_loss`` would). A frame with no valid
    pixel contributes 0.
    """
    pixels = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).flatten(1).sum(dim=1).clamp(min=1)
    return pixels.flatten(1).sum(dim=1) / valid


class PerSampleSegmentationLoss(nn.Module):
    """Criterion object Opacus' ghost clipping needs: it flips ``reduction`` to "none" itself."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = per_sample_segmentation_loss(logits, target)
        if self.reduction == "none":
            return per_sample
        # An empty Poisson batch (a noise-only DP step) must give loss 0, not the NaN of mean([]).
        divisor = 1 if self.reduction == "sum" else max(len(per_sample), 1)
        return per_sample.sum() / divisor
