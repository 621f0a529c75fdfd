"""DP-SGD utility levers: virtual steps (expected batch size), decoder-only training, a pretrained start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseg._dp_compat import make_dp_compatible
from fedseg.checkpoints import check_start_checkpoint, checkpoint_meta, load_initial_weights, save_checkpoint
from fedseg.config import DataSpec, ModelSpec
from fedseg.dpsgd import ClientPrivacy, private_round
from fedseg.labels import build_label_map
from fedseg.models import build_model, build_run_model, set_trainable
from fedseg.privacy import DPSpec
from fedseg.settings import RunSettings

CLASSES = 3
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _frames(n: int, size: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=gen),
                         torch.randint(0, CLASSES, (n, size, size), generator=gen))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return make_dp_compatible(build_model("tiny", CLASSES))


class CountingAdam(torch.optim.Adam):
    """Adam that counts the updates it really applies (Opacus skips the virtual ones)."""

    applied = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        CountingAdam.applied += 1
        return super().step(closure)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_virtual_steps_apply_one_noised_update_per_logical_batch(mode: str) -> None:
    """32 frames, expected batch 16 in physical batches of 4: q = 1/2, 2 accounted steps an epoch,
    and the optimizer moves the weights once per logical batch, not once per physical one."""
    spec = DPSpec(noise_multiplier=1.0, expected_batch_size=16, grad_sample_mode=mode)
    privacy = ClientPrivacy(spec, num_examples=32, batch_size=4, planned_steps=4)
    assert (privacy.sample_rate, privacy.steps_per_epoch) == (0.5, 2)
    model = _model()
    CountingAdam.applied = 0
    optimizer = CountingAdam(model.parameters(), lr=1e-3)
    result = private_round(privacy, model, DataLoader(_frames(32), batch_size=4), optimizer, epochs=2, seed=0)
    assert result is not None and result.steps > 4  # physical batches: about 32 frames / 4 an epoch
    assert CountingAdam.applied == 4  # one update per logical batch: 2 epochs x 2
    assert privacy.state()["history"] == [[1.0, 0.5, 4]]
    reference = RDPAccountant()
    reference.history = [(1.0, 0.5, 4)]
    assert privacy.epsilon() == pytest.approx(reference.get_epsilon(privacy.delta))


def test_decoder_only_training_leaves_the_encoder_as_received() -> None:
    spec = DPSpec(noise_multiplier=0.5, trainable="decoder")
    privacy = ClientPrivacy(spec, num_examples=16, batch_size=8, planned_steps=2)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert private_round(privacy, model, DataLoader(_frames(16), batch_size=8), optimizer, epochs=1,
                         seed=0) is not None
    after = model.state_dict()
    encoder = [k for k in before if k.startswith("encoder.")]
    decoder = [k for k in before if not k.startswith("encoder.") and before[k].is_floating_point()]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


def test_set_trainable_counts_and_refuses_unknown_parts() -> None:
    model = build_model("tiny", CLASSES)
    total = sum(p.numel() for p in model.parameters())
    decoder = set_trainable(model, "decoder")
    assert 0 < decoder < total
    assert set_trainable(model, "all") == total
    assert 0 < set_trainable(model, "head") < set_trainable(model, "norm") < decoder
    with pytest.raises(ValueError, match=r"trainable='bias'; valid: \['all', 'decoder', 'norm', 'head'\]"):
        set_trainable(model, "bias")


def test_expected_batch_larger_than_a_vehicle_is_refused() -> None:
    spec = DPSpec(noise_multiplier=1.0, expected_batch_size=64)
    with pytest.raises(ValueError, match="privacy.expected_batch_size=64 exceeds the 40 frames"):
        spec.check_fleet([40, 80], batch_size=8, rounds=1, local_epochs=1)


def _checkpoint(tmp_path: Path, *, group_norm: bool) -> Path:
    spec, data = ModelSpec(name="tiny"), DataSpec()
    model = build_run_model(spec, CLASSES, seed=3, dp=group_norm)
    label_map = build_label_map(data.tagset, "driving")
    meta = checkpoint_meta(spec, data, label_map, {"mode": "centralized"}) | {"num_classes": CLASSES}
    return save_checkpoint(tmp_path / "global.pt", model, meta)


def test_model_init_replaces_the_random_initialisation(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, group_norm=True)
    saved = torch.load(path, weights_only=True)["model_state"]
    model = load_initial_weights(build_run_model(ModelSpec(name="tiny"), CLASSES, seed=0, dp=True),
                                 ModelSpec(name="tiny", init=str(path)))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_model_init_with_the_wrong_normalization_says_what_to_do(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, group_norm=False)
    model = build_run_model(ModelSpec(name="tiny"), CLASSES, seed=0, dp=True)
    with pytest.raises(ValueError, match=r"trained with BatchNorm, this run's model has GroupNorm: train it "
                                         r"with model.norm=group"):
        load_initial_weights(model, ModelSpec(name="tiny", init=str(path)))
    with pytest.raises(ValueError, match="a tiny model with 3 classes; this run builds tiny with 5"):
        load_initial_weights(build_run_model(ModelSpec(name="tiny"), 5, seed=0),
                             ModelSpec(name="tiny", init=str(path)))


def test_start_checkpoint_is_checked_from_its_metadata_naming_what_differs(tmp_path: Path) -> None:
    data = DataSpec(image_size=(64, 64))
    label_map = build_label_map(data.tagset, data.task)
    tiny = ModelSpec(name="tiny")
    model = build_run_model(tiny, label_map.num_classes, seed=0)  # BatchNorm
    path = save_checkpoint(tmp_path / "global.pt", model, checkpoint_meta(tiny, data, label_map, {}))

    def check(model: ModelSpec = tiny, data: DataSpec = data, group_norm: bool = False) -> dict:
        return check_start_checkpoint(path, key="model.init", model=model, data=data, label_map=label_map,
                                      group_norm=group_norm)

    assert check()["backbone"] == "tiny"  # fits: its contents, read once
    with pytest.raises(ValueError, match=r"model.init=.*global.pt does not fit this run: BatchNorm \(this run: "
                                         r"GroupNorm, model.norm=group\)$"):
        check(group_norm=True)
    with pytest.raises(ValueError, match=r"fit this run: backbone tiny \(this run: resnet18\); decoder_channels "
                                         r"None \(this run: \[32, 16\]\); image_size \[64, 64\] \(this run: \[96, 128\]\)$"):
        check(model=ModelSpec(name="resnet18", decoder_channels=(32, 16)), data=DataSpec())


def test_norm_follows_privacy_unless_set_and_batch_norm_is_refused_under_dp() -> None:
    assert not RunSettings.from_config({}).group_norm
    assert RunSettings.from_config({"model": {"norm": "group"}}).group_norm
    assert RunSettings.from_config({"privacy": {"name": "dpsgd", "target_epsilon": 8.0}}).group_norm
    with pytest.raises(ValueError, match="model.norm=batch cannot train under privacy=dpsgd"):
        RunSettings.from_config({"model": {"norm": "batch"},
                                 "privacy": {"name": "dpsgd", "target_epsilon": 8.0}})


@pytest.mark.parametrize("dp", [False, True])
def test_a_model_built_for_received_weights_equals_one_initialised_then_loaded(dp: bool) -> None:
    """The vehicle skips the random initialisation (meta device): same state, same outputs."""
    from fedseg.models import get_weights, model_with_weights, set_weights

    spec = ModelSpec(name="tiny")
    arrays = get_weights(build_run_model(spec, CLASSES, seed=5, dp=dp))
    reference = build_run_model(spec, CLASSES, seed=0, dp=dp)
    set_weights(reference, arrays)
    model = model_with_weights(spec, CLASSES, arrays, dp=dp)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                  strict=True))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), reference.eval()(x))


def test_models_for_two_vehicles_share_no_storage_or_modules() -> None:
    """A process builds the UNet once and copies it per vehicle: one vehicle's training never reaches
    another's model or the arrays the first one sent."""
    from fedseg.models import get_weights, model_with_weights

    spec = ModelSpec(name="tiny")
    arrays = get_weights(build_run_model(spec, CLASSES, seed=5))
    first = model_with_weights(spec, CLASSES, arrays)
    sent = get_weights(first)
    second = model_with_weights(spec, CLASSES, arrays)
    assert not set(map(id, first.modules())) & set(map(id, second.modules()))
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
        second.requires_grad_(False)
    assert all(np.array_equal(a, b) for a, b in zip(sent, arrays, strict=True))
    assert all(p.requires_grad for p in first.parameters())
