"""DP-SGD: accounting against Opacus, per-frame clipping, noise, budget, state that survives, models."""

from __future__ import annotations

import copy
import math

import pytest
import timm.models.resnet as timm_resnet
import torch
import torchvision.models.resnet as tv_resnet
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseg import dpsgd, models
from fedseg._dp_compat import (
    make_dp_compatible,
    make_residuals_out_of_place,
    per_sample_segmentation_loss,
    unwrap_model,
    unwrap_state_dict,
)
from fedseg.dpsgd import ClientPrivacy, calibrate_noise, epsilon_of
from fedseg.models import BACKBONES, build_model
from fedseg.privacy import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    DPSpec,
    default_delta,
    parse_privacy,
)
from fedseg.training import train

CLASSES = 3
# These tests check clipping and noise on every parameter: they train the whole model (the default,
# decoder-only training, is tested in tests/test_dp_levers.py).
# Opacus hooks the first conv, whose input (the image) needs no grad; PyTorch warns on each backward.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return make_dp_compatible(build_model("tiny", CLASSES))


def _frames(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen),
                         torch.randint(0, CLASSES, (n, size, size), generator=gen))


def _dp_round(privacy: ClientPrivacy, model: nn.Module, data: TensorDataset, *, batch: int, steps: int,
              seed: int = 0, commit: bool = True) -> nn.Module:
    """Attach, take ``steps`` steps on the first ``batch`` frames (a fixed batch), optionally commit."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, optimizer, _, criterion = privacy.attach(model, optimizer, DataLoader(data, batch_size=batch),
                                                      seed=seed)
    x, y = data.tensors[0][:batch], data.tensors[1][:batch]
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(wrapped(x), y).backward()
        optimizer.step()
    if commit:
        privacy.commit()
    return wrapped


# ---------------------------------------------------------------- accounting


def test_epsilon_equals_opacus_rdp_recomputed_from_history():
    # Prepare: 10 frames, batch 4 -> ceil(10/4) = 3 batches per epoch -> sample rate 1/3
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.1), num_examples=10, batch_size=4, planned_steps=6)
    model = _tiny_unet()
    # Execute: two rounds of 3 steps
    _dp_round(privacy, model, _frames(10), batch=4, steps=3)
    _dp_round(privacy, model, _frames(10), batch=4, steps=3)
    # Assert
    reference = RDPAccountant()
    reference.history = [(1.1, 1 / 3, 6)]
    assert privacy.state()["history"] == [[1.1, 1 / 3, 6]]
    assert privacy.delta == 1e-5
    assert privacy.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)


def test_epsilon_golden_value_and_zero_before_training():
    # Opacus 1.6 RDP: sigma 1.0, q 1/3, 3 steps, delta 1e-5 (pinned to catch accountant changes)
    assert epsilon_of([(1.0, 1 / 3, 3)], 1e-5) == pytest.approx(5.2047, abs=1e-3)
    assert epsilon_of([], 1e-5) == 0.0


def test_calibrated_noise_meets_target_epsilon_within_tolerance():
    sigma = calibrate_noise(3.0, 1e-5, sample_rate=0.1, steps=50)
    eps = epsilon_of([(sigma, 0.1, 50)], 1e-5)
    assert 2.98 <= eps <= 3.0  # Opacus' search stops within 0.01 below the target
    privacy = ClientPrivacy(DPSpec(trainable="all", target_epsilon=3.0), num_examples=100, batch_size=10, planned_steps=50)
    assert privacy.noise_multiplier == sigma


def test_target_below_the_rdp_floor_is_refused_without_searching():
    # Opacus' RDP epsilon never falls below ~0.1029 at delta 1e-5 (its largest order is 63), however much
    # noise: its own search would double sigma to 1e6 (a minute) before giving up.
    with pytest.raises(ValueError, match=r"cannot reach epsilon below 0\.103 at delta 1e-05"):
        calibrate_noise(0.1, 1e-5, sample_rate=0.5, steps=4)
    assert calibrate_noise(0.2, 1e-5, sample_rate=0.5, steps=4) > 10  # just above it: a (large) answer


def test_default_delta_is_below_one_over_n():
    assert default_delta(200) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert all(default_delta(n) < 1 / n for n in (1, 10, 1000, 10**7))


def test_budget_stops_a_vehicle_before_it_passes_max_epsilon():
    # Prepare: one round of 3 steps already spent (5.20); a second would reach 6.84
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0, max_epsilon=6.0), num_examples=10, batch_size=4,
                            planned_steps=6)
    assert privacy.can_train(3) == (True, pytest.approx(5.2047, abs=1e-3))
    privacy.load_state({"history": [[1.0, 1 / 3, 3]], "pending": None})
    # Execute
    ok, after = privacy.can_train(3)
    # Assert
    assert not ok
    assert after == pytest.approx(epsilon_of([(1.0, 1 / 3, 6)], 1e-5))


# ---------------------------------------------------------------- clipping and noise


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each frame's flattened gradient of its own loss, by brute force."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        per_sample_segmentation_loss(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return grads


def _clipped_update(model: nn.Module, data: TensorDataset, clip: float, mode: str) -> tuple[torch.Tensor, ...]:
    """(DP update without noise, brute-force per-frame gradients): the DP update is read from p.grad."""
    per_sample = _per_sample_grads(copy.deepcopy(model), *data.tensors)
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode),
                            num_examples=len(data), batch_size=len(data), planned_steps=1)
    wrapped = _dp_round(privacy, model, data, batch=len(data), steps=1)
    return torch.cat([p.grad.flatten() for p in wrapped.parameters()]), *per_sample


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_per_sample_clipping_bounds_the_frame_with_a_huge_gradient(mode):
    # Prepare: a conv net without normalisation, so frame 0 scaled x1000 has a ~300x larger gradient
    clip, data = 1.0, _frames(3, size=8)
    data.tensors[0][0] *= 1000.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, CLASSES, 1))
    # Execute
    dp_grad, *per_sample = _clipped_update(model, data, clip, mode)
    # Assert: frame 0 is scaled down to norm C, the others pass unchanged; Opacus averages over 3
    norms = [g.norm().item() for g in per_sample]
    assert norms[0] > 100 * clip and max(norms[1:]) < clip  # hand-built: exactly one frame clipped
    summed = per_sample[0] * (clip / norms[0]) + per_sample[1] + per_sample[2]
    assert summed.norm() <= 3 * clip
    assert torch.allclose(dp_grad, summed / 3, atol=1e-6, rtol=1e-3)
    assert (dp_grad - torch.stack(per_sample).mean(0)).norm() > 50 * clip  # clipping changed it


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_per_sample_clipping_on_the_unet_code_path(mode):
    # The tiny smp UNet (GroupNorm, rewritten residual blocks) with every frame above C = 0.5
    clip, data = 0.5, _frames(3)
    dp_grad, *per_sample = _clipped_update(_tiny_unet(), data, clip, mode)
    assert min(g.norm().item() for g in per_sample) > clip
    expected = sum(g * (clip / g.norm().item()) for g in per_sample) / 3
    assert torch.allclose(dp_grad, expected, atol=1e-6, rtol=1e-3)
    assert dp_grad.norm() <= clip + 1e-6


def test_noise_has_the_promised_scale_and_follows_the_seed():
    # Prepare: sigma 1, C 1, batch 2 -> each coordinate of the update gets N(0, (1 * 1 / 2)^2)
    def step(seed: int) -> torch.Tensor:
        privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=2, batch_size=2, planned_steps=1)
        wrapped = _dp_round(privacy, _tiny_unet(), _frames(2), batch=2, steps=1, seed=seed)
        return torch.cat([p.grad.flatten() for p in wrapped.parameters()])

    # Execute
    a, b, c = step(0), step(0), step(1)
    # Assert: the clipped signal (norm <= 1 over ~1e5 coordinates) is negligible next to the noise
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.numel() > 10_000
    assert a.std().item() == pytest.approx(0.5, rel=0.05)


def test_the_same_seed_in_the_next_round_still_draws_fresh_noise():
    # Prepare: one vehicle, two rounds, the caller passes seed 0 both times
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=2, batch_size=2, planned_steps=2)
    model = _tiny_unet()
    # Execute
    first = torch.cat([p.grad.flatten() for p in _dp_round(privacy, model, _frames(2), batch=2, steps=1)
                       .parameters()])
    second = torch.cat([p.grad.flatten() for p in _dp_round(privacy, model, _frames(2), batch=2, steps=1)
                        .parameters()])
    # Assert: repeated noise would cancel in the difference of two updates and expose the gradients
    assert (first - second).std().item() == pytest.approx(0.5 * math.sqrt(2), rel=0.05)


def test_engine_train_composes_with_attach_and_counts_every_step():
    # Prepare: 8 frames, batch 4 -> q = 1/2; a 2-epoch round on the Poisson loader
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=8, batch_size=4, planned_steps=4)
    model = _tiny_unet()
    wrapped, optimizer, loader, criterion = privacy.attach(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_frames(8), batch_size=4),
        seed=0, epochs=2)
    # Execute
    result = train(wrapped, loader, optimizer, epochs=2, criterion=criterion)
    spent = privacy.commit()
    # Assert: the accountant saw exactly the steps the loop took, and nothing more is pending
    assert result.steps > 0 and math.isfinite(result.loss)
    assert privacy.state()["history"] == [[1.0, 0.5, result.steps]] and privacy.state()["pending"] is None
    assert spent == pytest.approx(epsilon_of([(1.0, 0.5, result.steps)], 1e-5))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_batch_that_sampled_no_frame_is_a_noised_step_the_accountant_counts(mode):
    # Prepare: an empty batch, as Poisson sampling draws one now and then, then a real one
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0, grad_sample_mode=mode), num_examples=8,
                            batch_size=2, planned_steps=2)
    model = _tiny_unet()
    wrapped, optimizer, _, criterion = privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                      DataLoader(_frames(8), batch_size=2), seed=0)
    x, y = _frames(2).tensors
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Execute
    first = train(wrapped, [(x[:0], y[:0])], optimizer, epochs=1, criterion=criterion,
                  on_empty=privacy.noise_only_step)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    second = train(wrapped, [(x, y)], optimizer, epochs=1, criterion=criterion, on_empty=privacy.noise_only_step)
    spent = privacy.commit()
    # Assert: the empty batch was a step of noise alone (lr * sigma * C / expected batch per coordinate),
    # and the accountant counted both steps, as it would have had the batch held frames
    assert first.steps == 1 and first.num_examples == 0 and second.steps == 1
    assert moved.std().item() == pytest.approx(0.1 * 1.0 * 1.0 / 2, rel=0.1)
    assert privacy.state()["history"] == [[1.0, 0.25, 2]]
    assert spent == pytest.approx(epsilon_of([(1.0, 0.25, 2)], privacy.delta))


def test_a_dp_round_takes_its_planned_steps_whatever_poisson_sampling_draws(monkeypatch):
    # Prepare: 3 frames, one per expected batch (q = 1/3): a step draws no frame with probability 8/27
    empties = []
    noise_only_step = ClientPrivacy.noise_only_step
    monkeypatch.setattr(ClientPrivacy, "noise_only_step",
                        lambda self: (empties.append(1), noise_only_step(self))[1])
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=3, batch_size=1,
                            planned_steps=12)
    model = _tiny_unet()
    # Execute: two rounds of two epochs
    results = [dpsgd.private_round(privacy, model, DataLoader(_frames(3), batch_size=1),
                                   torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, seed=seed)
               for seed in (0, 1)]
    # Assert: some step sampled nothing (this seed), and every round still took and counted all 6 steps
    assert empties
    assert [r.steps for r in results if r is not None] == [6, 6]
    assert privacy.state()["history"] == [[1.0, 1 / 3, 12]]


# ---------------------------------------------------------------- state that survives


def test_state_continues_from_disk_and_from_context_blob(tmp_path):
    # Prepare
    path, spec, data = tmp_path / "privacy" / "client_0.json", DPSpec(trainable="all", noise_multiplier=1.0), _frames(10)
    first = ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6, state_path=path)
    _dp_round(first, _tiny_unet(), data, batch=4, steps=3)
    spent = first.epsilon()
    # Execute: a restarted process (disk) and a Flower context.state copy (bytes)
    from_disk = ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6, state_path=path)
    from_blob = ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6)
    from_blob.load_state(first.to_bytes())
    # Assert
    assert spent > 0
    assert from_disk.epsilon() == spent and from_blob.epsilon() == spent
    _dp_round(from_disk, _tiny_unet(), data, batch=4, steps=3)
    assert from_disk.epsilon() > spent
    from_disk.load_state(first.state())  # an older copy never rolls the spent budget back
    assert from_disk.epsilon() == pytest.approx(epsilon_of([(1.0, 1 / 3, 6)], 1e-5))
    assert ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6,
                         state_path=path).epsilon() == from_disk.epsilon()


def test_calibrated_noise_is_searched_once_per_run_not_once_per_process(tmp_path, monkeypatch):
    # Prepare: a vehicle's first process calibrates target epsilon 3 and saves its state (as attach does)
    path, spec = tmp_path / "vehicle_0.json", DPSpec(trainable="all", target_epsilon=3.0)
    first = ClientPrivacy(spec, num_examples=100, batch_size=10, planned_steps=50, state_path=path)
    first.save()
    searches: list[float] = []
    real = dpsgd.get_noise_multiplier
    monkeypatch.setattr(dpsgd, "get_noise_multiplier", lambda **kw: searches.append(kw["target_epsilon"]) or real(**kw))
    calibrate_noise.cache_clear()  # as in a fresh process (Flower's Deployment Engine: one per round)
    # Execute: the next round's process, then one whose run plans more steps
    again = ClientPrivacy(spec, num_examples=100, batch_size=10, planned_steps=50, state_path=path)
    longer = ClientPrivacy(spec, num_examples=100, batch_size=10, planned_steps=80, state_path=path)
    # Assert: the same noise without a search; a different plan searches again, for more noise
    assert again.noise_multiplier == first.noise_multiplier and searches == [3.0]
    assert longer.noise_multiplier > first.noise_multiplier


def test_a_round_killed_before_commit_counts_its_planned_steps(tmp_path):
    # Prepare: 10 frames, batch 4 -> a 2-epoch round plans 6 steps; only 1 is taken, then a crash
    path, spec = tmp_path / "c.json", DPSpec(trainable="all", noise_multiplier=1.0)
    privacy = ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6, state_path=path)
    optimizer = torch.optim.SGD((model := _tiny_unet()).parameters(), lr=0.1)
    privacy.attach(model, optimizer, DataLoader(_frames(10), batch_size=4), seed=0, epochs=2)
    # Execute
    restarted = ClientPrivacy(spec, num_examples=10, batch_size=4, planned_steps=6, state_path=path)
    # Assert
    assert restarted.epsilon() == pytest.approx(epsilon_of([(1.0, 1 / 3, 6)], 1e-5))


def test_attach_rejects_a_loader_that_does_not_match_the_sampling_rate():
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=10, batch_size=4, planned_steps=3)
    model = _tiny_unet()
    with pytest.raises(ValueError, match="drop_last"):
        privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       DataLoader(_frames(10), batch_size=4, drop_last=True), seed=0)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_state_dict_under_dp_has_the_plain_models_keys(mode):
    plain = _tiny_unet()
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0, grad_sample_mode=mode), num_examples=2,
                            batch_size=2, planned_steps=1)
    wrapped = _dp_round(privacy, copy.deepcopy(plain), _frames(2), batch=2, steps=1)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())  # Opacus' wrapper prefix
    assert list(unwrap_state_dict(wrapped)) == list(plain.state_dict())
    assert list(unwrap_model(wrapped).state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("block", [
    lambda: tv_resnet.BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))),
    lambda: tv_resnet.Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))),
    lambda: timm_resnet.BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))),
    lambda: timm_resnet.Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))),
], ids=["tv-basic", "tv-bottleneck", "timm-basic", "timm-bottleneck"])
def test_out_of_place_residual_blocks_compute_the_same_function(block):
    torch.manual_seed(0)
    original = block().eval()
    rewritten = copy.deepcopy(original)
    x = torch.randn(2, 8, 8, 8)
    assert make_residuals_out_of_place(rewritten) == 1
    assert type(rewritten) is not type(original)
    assert torch.equal(original(x), rewritten(x))


def test_make_dp_compatible_copies_and_replaces_every_batchnorm():
    model = build_model("resnet18", CLASSES)
    fixed = make_dp_compatible(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # caller's model untouched
    assert torch.equal(fixed.encoder.conv1.weight, model.encoder.conv1.weight)


@pytest.mark.e2e
def test_default_backbone_takes_a_dp_step_in_the_default_mode():
    # UNet-ResNet34 (24 M parameters) at 64 px, batch 2: several seconds on 2 cores
    torch.manual_seed(0)
    model = make_dp_compatible(build_model(models.DEFAULT_BACKBONE, CLASSES))
    before = [p.detach().clone() for p in model.parameters()]
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=2, batch_size=2, planned_steps=1)
    assert privacy.spec.grad_sample_mode == DEFAULT_GRAD_SAMPLE_MODE
    _dp_round(privacy, model, _frames(2, size=64), batch=2, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert 0 < privacy.epsilon() < math.inf


@pytest.mark.e2e
# A negative control (nasnetalarge, ~100 M parameters: a minute per DP step on 2 cores) is only built,
# in tests/test_models.py; its DP step was checked by hand when it was registered.
@pytest.mark.parametrize("backbone", [pytest.param(name, marks=pytest.mark.skip(
    reason="negative control: built only, too slow for a DP step in CI") if spec.negative_control else ())
    for name, spec in sorted(BACKBONES.items())])
def test_every_backbone_takes_a_dp_step(backbone):
    torch.manual_seed(0)
    model = make_dp_compatible(build_model(backbone, CLASSES))
    privacy = ClientPrivacy(DPSpec(trainable="all", noise_multiplier=1.0), num_examples=2, batch_size=2, planned_steps=1)
    wrapped = _dp_round(privacy, model, _frames(2, size=32), batch=2, steps=1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in wrapped.parameters())


def test_dp_spec_rejects_ambiguous_or_unknown_settings():
    with pytest.raises(ValueError, match="exactly one"):
        DPSpec(noise_multiplier=1.0, target_epsilon=3.0)
    # Field values are checked once, where a block is parsed (fedseg.config.parse_spec), not by the spec.
    with pytest.raises(ValueError, match=r"privacy.grad_sample_mode='fast': expected 'ghost' \| 'hooks'"):
        parse_privacy({"name": "dpsgd", "noise_multiplier": 1.0, "grad_sample_mode": "fast"})
    with pytest.raises(ValueError, match=r"privacy.max_grad_norm=0.0 is out of range: must be > 0"):
        parse_privacy({"name": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 0})
    with pytest.raises(ValueError, match="unknown privacy keys"):
        parse_privacy({"name": "dpsgd", "noise_multiplier": 1.0, "noise": 2})
    block = {"name": "dpsgd", "noise_multiplier": None, "target_epsilon": 8.0, "state_dir": None}
    assert parse_privacy(block) == DPSpec(target_epsilon=8.0)
