"""Confusion matrices and scores, against numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.labels import IGNORE_INDEX
from fedseg.metrics import confusion_matrix, scores


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    # Prepare: pairs (true, pred) = (0,0) (1,2) [ignored] (2,2) (1,1) (0,1)
    target = torch.tensor([[0, 1, IGNORE_INDEX], [2, 1, 0]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 1]])
    # Execute
    cm = confusion_matrix(pred, target, num_classes=3)
    # Assert
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert cm.sum() == 5  # the non-ignored pixels


def test_confusion_matrix_accepts_logits():
    target = torch.tensor([[[0, 1]]])  # (N=1, H=1, W=2)
    logits = torch.tensor([[[[5.0, 0.0]], [[1.0, 3.0]]]])  # (N=1, C=2, H=1, W=2): argmax -> [0, 1]
    assert torch.equal(confusion_matrix(logits, target, num_classes=2), torch.tensor([[1, 0], [0, 1]]))


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="target holds ids outside 0..1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=2)
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), num_classes=2)


def test_scores_golden_numbers():
    # Prepare: rows = true, cols = predicted; class "d" never occurs and is never predicted.
    cm = np.array(
        [
            [3, 1, 0, 0],
            [1, 2, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    # By hand: a: TP3 FP1 FN1 -> IoU 3/5, Dice 6/8
    #          b: TP2 FP2 FN1 -> IoU 2/5, Dice 4/7
    #          c: TP0 FP0 FN1 -> IoU 0,   Dice 0
    #          d: nothing     -> None, excluded from the means
    # Execute
    result = scores(cm, ["a", "b", "c", "d"])
    # Assert
    assert result["pixel_acc"] == pytest.approx(5 / 8)
    assert result["miou"] == pytest.approx((3 / 5 + 2 / 5 + 0) / 3)
    assert result["dice"] == pytest.approx((3 / 4 + 4 / 7 + 0) / 3)
    assert result["per_class_iou"] == pytest.approx({"a": 3 / 5, "b": 2 / 5, "c": 0.0, "d": None})


def test_scores_accepts_torch_tensor():
    result = scores(torch.tensor([[2, 0], [0, 2]]), ["x", "y"])
    assert result == {"pixel_acc": 1.0, "miou": 1.0, "dice": 1.0, "per_class_iou": {"x": 1.0, "y": 1.0}}


def test_summed_matrices_differ_from_averaged_miou():
    # Prepare: two clients that see different classes.
    client_a = np.array([[8, 0], [0, 0]])  # road only, all right: mIoU 1.0 (class 1 absent)
    client_b = np.array([[0, 0], [2, 2]])  # class 0: TP0 FP2 -> 0; class 1: TP2 FN2 -> 1/2; mIoU 1/4
    names = ["road", "car"]
    # Execute
    averaged = (scores(client_a, names)["miou"] + scores(client_b, names)["miou"]) / 2
    summed = scores(client_a + client_b, names)["miou"]
    # Assert: summed counts [[8,0],[2,2]]: road 8/10, car 2/4 -> (0.8 + 0.5) / 2
    assert averaged == pytest.approx(0.625)
    assert summed == pytest.approx(0.65)


def test_scores_errors_are_actionable():
    with pytest.raises(ValueError, match="empty"):
        scores(np.zeros((2, 2), dtype=np.int64), ["a", "b"])
    with pytest.raises(ValueError, match="does not fit 3 class names"):
        scores(np.eye(2), ["a", "b", "c"])
