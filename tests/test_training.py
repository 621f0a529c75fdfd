"""Local train/evaluate loops on the tiny backbone and a learnable synthetic task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedseg.labels import IGNORE_INDEX
from fedseg.models import build_model
from fedseg.training import (
    EvalResult,
    TrainResult,
    evaluate,
    make_optimizer,
    predict,
    segmentation_loss,
    train,
)


def _pattern_data(n: int = 8, size: int = 64, seed: int = 0) -> TensorDataset:
    """Images whose mask is (red channel > 0): learnable from the pixels alone."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = (images[:, 0] > 0).long()
    masks[:, :2, :] = IGNORE_INDEX  # a band of ignored pixels, as dropped tags would be
    return TensorDataset(images, masks)


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny", num_classes=2)


def _distance(model: torch.nn.Module, start: list[torch.Tensor]) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(params, start, strict=True)))


def test_train_reduces_loss():
    # Prepare
    model = _tiny()
    loader = DataLoader(_pattern_data(), batch_size=4, shuffle=False)
    optimizer = make_optimizer(model, name="adam", lr=1e-2)
    # Execute: one epoch at a time so each epoch's loss is visible
    losses = [train(model, loader, optimizer, epochs=1).loss for _ in range(5)]
    # Assert
    assert losses[-1] < losses[0]
    assert model.training


def test_train_result_counts():
    model = _tiny()
    loader = DataLoader(_pattern_data(n=6), batch_size=4)  # batches of 4 and 2
    result = train(model, loader, make_optimizer(model, lr=1e-3), epochs=2)
    assert isinstance(result, TrainResult)
    assert (result.num_examples, result.steps) == (6, 4)
    assert np.isfinite(result.loss)


def test_empty_batch_is_skipped_without_a_step():
    # Prepare: Opacus Poisson sampling can yield a batch of size 0
    model = _tiny()
    images, masks = _pattern_data(n=4)[:]
    batches = [(images[:0], masks[:0]), (images, masks), (images[:0], masks[:0])]
    # Execute
    result = train(model, batches, make_optimizer(model, lr=1e-3), epochs=1)
    # Assert
    assert (result.num_examples, result.steps) == (4, 1)


def test_only_empty_batches_give_nan_loss_and_no_step():
    model = _tiny()
    images, masks = _pattern_data(n=1)[:]
    start = [p.detach().clone() for p in model.parameters()]
    result = train(model, [(images[:0], masks[:0])], make_optimizer(model, lr=1.0), epochs=1)
    assert result.steps == 0 and result.num_examples == 0 and np.isnan(result.loss)
    assert _distance(model, start) == 0.0


def test_proximal_term_keeps_weights_closer_to_start():
    # Prepare: same seed, data order and optimizer; only mu differs
    loader = DataLoader(_pattern_data(), batch_size=4, shuffle=False)
    distances = {}
    for mu in (0.0, 1.0):
        model = _tiny(seed=0)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        # Execute
        train(model, loader, optimizer, epochs=2, proximal_mu=mu)
        distances[mu] = _distance(model, start)
        # Assert: the hook does not outlive the call
        assert not optimizer._optimizer_step_pre_hooks
    assert 0 < distances[1.0] < distances[0.0]


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_proximal_term_survives_opacus_dp_optimizer():
    """Under DP-SGD the proximal gradient is added after clipping and noise, not dropped."""
    from opacus import PrivacyEngine

    from fedseg._dp_compat import batchnorm_to_groupnorm

    distances = {}
    for mu in (0.0, 5.0):
        model = batchnorm_to_groupnorm(_tiny(seed=0))
        start = [p.detach().clone() for p in model.parameters()]
        private_model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=DataLoader(_pattern_data(), batch_size=4), noise_multiplier=0.0,
            max_grad_norm=1.0, grad_sample_mode="ew", poisson_sampling=False,  # deterministic batches
        )
        train(private_model, loader, optimizer, epochs=1, proximal_mu=mu)
        distances[mu] = _distance(model, start)
    assert 0 < distances[5.0] < distances[0.0]


def test_per_sample_criterion_is_averaged():
    model = _tiny()
    loader = DataLoader(_pattern_data(n=4), batch_size=4)

    def per_sample(logits, target):
        losses = [segmentation_loss(logits[i : i + 1], target[i : i + 1]) for i in range(len(target))]
        return torch.stack(losses)

    result = train(model, loader, make_optimizer(model, lr=1e-3), epochs=1, criterion=per_sample)
    assert np.isfinite(result.loss) and result.steps == 1


def test_evaluate_confmat_counts_non_ignored_pixels():
    # Prepare
    model = _tiny()
    data = _pattern_data(n=5)
    loader = DataLoader(data, batch_size=2)
    model.train()
    # Execute
    result = evaluate(model, loader, num_classes=2)
    # Assert
    assert isinstance(result, EvalResult)
    assert result.confmat.dtype == np.int64 and result.confmat.shape == (2, 2)
    assert result.confmat.sum() == int((data.tensors[1] != IGNORE_INDEX).sum())
    assert result.num_examples == 5 and np.isfinite(result.loss)
    assert model.training  # mode restored


def test_predict_returns_class_map_in_eval_mode():
    model = _tiny()
    images = _pattern_data(n=2).tensors[0]
    out = predict(model, images)
    assert out.shape == (2, 64, 64) and out.dtype == torch.int64
    assert int(out.max()) <= 1 and model.training


def test_segmentation_loss_ignores_pixels_and_never_nans():
    logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 4.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, IGNORE_INDEX]]])
    expected = torch.nn.functional.cross_entropy(logits[..., :1], target[..., :1])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)
    all_ignored = torch.full((1, 1, 2), IGNORE_INDEX)
    assert segmentation_loss(logits, all_ignored).item() == 0.0


def test_make_optimizer_registry():
    model = _tiny()
    assert isinstance(make_optimizer(model, name="sgd", lr=0.1), torch.optim.SGD)
    assert isinstance(make_optimizer(model, name="adamw", lr=0.1, weight_decay=1e-4), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*adam"):
        make_optimizer(model, name="lion", lr=0.1)
