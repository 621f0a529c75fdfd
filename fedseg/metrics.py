"""Segmentation metrics from confusion matrices.

Clients send confusion matrices (counts), the server sums them, and every score is computed from the
summed counts: averaging per-client mIoUs would weight a client with ten pixels like one with a
million, and a class absent from one client would drag that client's mean around.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedseg.labels import IGNORE_INDEX


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class.

    ``pred`` holds class indices with the shape of ``target``, or logits with one extra class
    dimension at position 1 (argmaxed here). Pixels whose target is ``ignore_index`` are skipped.
    """
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds ids outside 0..{num_classes - 1} (other than ignore {ignore_index})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred holds ids outside 0..{num_classes - 1}")
    # One bincount over (true, pred) pair ids: fast on CPU and GPU alike.
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.int64)


def scores(confmat: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """Pixel accuracy, mIoU, mean Dice and per-class IoU from one (summed) confusion matrix.

    IoU_c = TP / (TP + FP + FN) and Dice_c = 2TP / (2TP + FP + FN). A class with TP + FP + FN == 0
    (never present, never predicted) has no IoU: it is ``None`` in ``per_class_iou`` and left out of
    both means. Raises ``ValueError`` on an empty matrix (no labelled pixel was evaluated).
    """
    cm = confmat.detach().cpu().numpy() if isinstance(confmat, torch.Tensor) else np.asarray(confmat)
    cm = cm.astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not fit {len(class_names)} class names")
    total = cm.sum()
    if total == 0:
        raise ValueError("confusion matrix is empty: no labelled pixel was evaluated")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp  # predicted as c, truly another class
    fn = cm.sum(axis=1) - tp  # truly c, predicted as another class
    union = tp + fp + fn
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    dice = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=present)
    return {
        "pixel_acc": float(tp.sum() / total),
        "miou": float(iou[present].mean()),
        "dice": float(dice[present].mean()),
        "per_class_iou": {
            name: (float(iou[i]) if present[i] else None) for i, name in enumerate(class_names)
        },
    }
