"""Local training and evaluation loops, shared by federated clients and the centralized baseline.

The loops only compose what they are given: a DP client passes an Opacus-wrapped model, optimizer and
loader and a per-sample criterion; FedProx is the ``proximal_mu`` argument. Nothing here knows about
Flower or Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fedseg.config import AUGMENTATIONS
from fedseg.labels import IGNORE_INDEX
from fedseg.metrics import confusion_matrix


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean per-sample task loss over the last epoch (NaN if it saw no example)
    num_examples: int  # examples seen in the last epoch
    steps: int  # optimizer steps over all epochs


@dataclass(frozen=True)
class RoundOutcome:
    """A vehicle's round: the training result (``None``: it did not train) and what to report."""

    result: TrainResult | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean per-sample loss (NaN if no example)
    num_examples: int
    confmat: np.ndarray  # (C, C) int64, rows = true class


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    # Momentum 0.9 as in Flower's and torchvision's references; plain SGD rarely trains a UNet well.
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A loader whose shuffling is reproducible from ``seed`` (no worker processes: tiny frames)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches a (``drop_last=False``) loader yields; Opacus samples at ``1 / steps_per_epoch``."""
    return math.ceil(num_examples / batch_size)


def scheduled_lr(lr: float, schedule: str, *, round_: int, rounds: int, final: float, dropped: int = 0) -> float:
    """The lr of round ``round_`` (1-based) of ``rounds``: ``constant``; ``cosine`` from ``lr`` (round 1)
    down to ``lr * final`` (the last round); ``step``: ``lr * final`` for the last third of the rounds;
    ``plateau``: ``lr * final`` once ``early_stop``'s rule has fired (``dropped`` times so far,
    :func:`fedseg.quality.plateaus`)."""
    if schedule == "plateau":
        return lr * final ** dropped
    if schedule == "constant" or rounds <= 1:
        return lr
    progress = (min(max(round_, 1), rounds) - 1) / (rounds - 1)  # 0 at round 1, 1 at the last
    if schedule == "cosine":
        return lr * (final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2)
    if schedule == "step":
        return lr * final if round_ > rounds - rounds // 3 else lr
    raise ValueError(f"federation.lr_schedule={schedule!r}; valid: ['constant', 'cosine', 'step', 'plateau']")


def epoch_round(epoch: int, *, epochs: int, rounds: int) -> int:
    """The federated round whose lr the centralized baseline's ``epoch`` (1-based) of ``epochs`` uses:
    with ``epochs = rounds x local_epochs``, epochs 1..local_epochs are round 1, and so on."""
    return math.ceil(epoch * rounds / epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's lr (Adam's moments are kept)."""
    for group in getattr(optimizer, "original_optimizer", optimizer).param_groups:
        group["lr"] = lr


def _hflip(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror image and mask together, half of the time (driving scenes are left-right symmetric)."""
    if float(torch.rand(())) < 0.5:
        return image.flip(-1), mask.flip(-1)
    return image, mask


def _scale(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom in by up to 1.25x and crop the frame's size back at a random place (mask: nearest)."""
    h, w = mask.shape[-2:]
    zoom = 1.0 + 0.25 * float(torch.rand(()))
    big_h, big_w = max(h, round(h * zoom)), max(w, round(w * zoom))
    image = F.interpolate(image[None], size=(big_h, big_w), mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=(big_h, big_w), mode="nearest")[0, 0].to(mask.dtype)
    top, left = int(torch.randint(0, big_h - h + 1, ())), int(torch.randint(0, big_w - w + 1, ()))
    return image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]


def _color(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast (x0.8-1.2) and a per-channel brightness shift (sd 0.1) of the normalized image."""
    contrast = 0.8 + 0.4 * torch.rand(())
    shift = 0.1 * torch.randn(image.shape[0], 1, 1)
    return image * contrast + shift, mask


# Per-frame training augmentations, applied in this order; names mirror fedseg.config.AUGMENTATIONS.
AUGMENT_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "hflip": _hflip, "scale": _scale, "color": _color,
}
assert tuple(AUGMENT_OPS) == AUGMENTATIONS


class AugmentedDataset(Dataset):
    """``dataset``'s (image, mask) frames through ``ops`` (random draws from torch's global RNG, which
    the vehicle seeds per round): the same code on vehicles and in the centralized baseline, and it
    works under any loader (Opacus' Poisson sampling too)."""

    def __init__(self, dataset: Dataset, ops: Sequence[str]) -> None:
        self.dataset = dataset
        self.ops = [AUGMENT_OPS[name] for name in AUGMENT_OPS if name in ops]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[index]
        for op in self.ops:
            image, mask = op(image, mask)
        return image, mask


def augmented(dataset: Dataset, ops: Sequence[str]) -> Dataset:
    """``dataset`` itself without ``ops``, else an :class:`AugmentedDataset` around it."""
    return AugmentedDataset(dataset, ops) if ops else dataset


def norm_state_keys(model: nn.Module, *, affine: bool) -> list[str]:
    """State-dict keys of the model's BatchNorm layers: running statistics and counters, plus the
    weight and bias if ``affine`` (what FedBN/SiloBN keep on the vehicle). GroupNorm has none."""
    state = model.state_dict()
    fields = ("running_mean", "running_var", "num_batches_tracked") + (("weight", "bias") if affine else ())
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys += [k for k in (f"{name}.{f}" if name else f for f in fields) if k in state]
    return keys


def statistics_mask(model: nn.Module) -> list[str]:
    """Per state-dict entry (:func:`fedseg.models.get_weights` order): "" for a trained parameter, else
    what the buffer is (``running_mean``, ``running_var``, or ``buffer``: counters and the like), which
    the server combines as statistics (``fedseg.server.statistics_mean.StatisticsMean``) and no server
    optimizer steps."""
    params = {name for name, _ in model.named_parameters()}
    kinds = []
    for key in model.state_dict():
        leaf = key.rsplit(".", 1)[-1]
        kinds.append("" if key in params else leaf if leaf in ("running_mean", "running_var") else "buffer")
    return kinds


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from (run seed, round, vehicle, ...), independent of hash randomisation."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def make_optimizer(
    model: nn.Module, *, name: str = "adam", lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """An optimizer from ``OPTIMIZERS`` over the model's trainable parameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[name](params, lr, weight_decay)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy averaged over non-ignored pixels (0, not NaN, when there are none)."""
    total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    valid = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / valid


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    criterion: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    proximal_mu: float = 0.0,
    device: str | torch.device = "cpu",
    progress: str | None = None,
    on_empty: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` passes over ``loader`` of (images, masks) batches.

    ``criterion(logits, masks)`` returns a scalar, a per-sample vector (averaged here), or an object
    with ``backward()`` and ``item()`` (Opacus ghost clipping's loss); default
    :func:`segmentation_loss`. ``proximal_mu > 0`` adds FedProx's ``(mu/2)||w - w_global||^2`` with
    ``w_global`` the trainable parameters at entry. A batch of no frames (Opacus' Poisson sampling
    draws one now and then) is ``on_empty()``'s: DP-SGD passes its noise-only step
    (:meth:`fedseg.dpsgd.ClientPrivacy.noise_only_step`), which counts as a step; without it the batch is
    skipped.
    """
    criterion = criterion or segmentation_loss
    model.to(device)
    model.train()
    remove_hook = _attach_proximal_term(model, optimizer, proximal_mu)
    steps, epoch_loss, epoch_examples = 0, 0.0, 0
    try:
        for epoch in range(epochs):
            epoch_loss, epoch_examples = 0.0, 0
            for images, masks in _progress(loader, progress, f" {epoch + 1}/{epochs}"):
                batch = images.shape[0]
                if batch == 0:
                    if on_empty is not None:
                        on_empty()
                        steps += 1
                    continue
                images, masks = images.to(device), masks.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), masks)
                if isinstance(loss, torch.Tensor) and loss.dim() > 0:
                    loss = loss.mean()
                loss.backward()
                optimizer.step()
                steps += 1
                epoch_loss += float(loss.item()) * batch  # weighted: the last batch may be short
                epoch_examples += batch
    finally:
        remove_hook()
    mean = epoch_loss / epoch_examples if epoch_examples else float("nan")
    return TrainResult(loss=mean, num_examples=epoch_examples, steps=steps)


def _attach_proximal_term(
    model: nn.Module, optimizer: torch.optim.Optimizer, mu: float
) -> Callable[[], None]:
    """Add FedProx's gradient ``mu * (w - w_global)`` right before each parameter update.

    Adding the gradient, instead of the term to the loss, is the same for a plain optimizer, keeps
    the reported loss the task loss, and composes with DP: hooked on Opacus's inner optimizer it runs
    after clipping and noising (the term is data-independent, so it costs no privacy), where a loss
    term would be dropped because DP-SGD rebuilds ``p.grad`` from per-sample gradients.
    Returns a function that removes the hook.
    """
    if mu <= 0:
        return lambda: None
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    def add_proximal_gradient(*_: Any) -> None:
        with torch.no_grad():
            for param, anchor in zip(params, anchors, strict=True):
                if param.grad is not None:
                    param.grad.add_(param - anchor, alpha=mu)

    inner = getattr(optimizer, "original_optimizer", optimizer)  # Opacus DPOptimizer wraps one
    handle = inner.register_step_pre_hook(add_proximal_gradient)
    return handle.remove


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    progress: str | None = None,
) -> EvalResult:
    """Loss and summed confusion matrix of ``model`` over ``loader`` (eval mode, no gradients)."""
    was_training = model.training
    model.to(device)
    model.eval()
    total_loss, examples = 0.0, 0
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks in _progress(loader, progress, ""):
        batch = images.shape[0]
        if batch == 0:
            continue
        images, masks = images.to(device), masks.to(device)
        logits = model(images)
        total_loss += float(segmentation_loss(logits, masks)) * batch
        examples += batch
        confmat += confusion_matrix(logits.argmax(dim=1), masks, num_classes)
    model.train(was_training)
    mean = total_loss / examples if examples else float("nan")
    return EvalResult(loss=mean, num_examples=examples, confmat=confmat.cpu().numpy())


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class index per pixel, (N, H, W), computed in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        return model(images).argmax(dim=1)
    finally:
        model.train(was_training)


def _progress(loader: Iterable, description: str | None, suffix: str) -> Iterable:
    """``loader`` itself, or wrapped in a tqdm bar when a description is given."""
    if description is None:
        return loader
    return tqdm(loader, desc=f"{description}{suffix}", leave=False)
