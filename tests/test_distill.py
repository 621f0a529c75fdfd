"""Distillation (fedseg.distill, fedseg-distill): the loss by hand, the teacher's pull on the student, the
refusals, and the command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset

from fedseg.checkpoints import checkpoint_meta, load_checkpoint, load_initial_weights, save_checkpoint
from fedseg.config import DataSpec, ModelSpec
from fedseg.data import load_data
from fedseg.distill import DistillationLoss, DistillSpec, WithTeacher, check_teacher, distillation_loss
from fedseg.labels import build_label_map
from fedseg.metrics import scores
from fedseg.models import build_run_model
from fedseg.training import evaluate, make_loader, make_optimizer, predict, segmentation_loss, train

LABELS = build_label_map("carla29", "driving")
C = LABELS.num_classes


def _teacher_file(path: Path, *, image_size: tuple[int, int] = (32, 32), task: str = "driving",
                  seed: int = 0) -> Path:
    """A fedseg-train checkpoint of a random tiny UNet, trained (as its config says) at ``seed``."""
    data = DataSpec(image_size=image_size, task=task)
    labels = build_label_map(data.tagset, task)
    model = build_run_model(ModelSpec(name="tiny"), labels.num_classes, seed=0)
    meta = checkpoint_meta(ModelSpec(name="tiny"), data, labels,
                           {"mode": "centralized", "config": {"seed": seed, "data": {"name": "synthetic"}}})
    return save_checkpoint(path, model, meta)


def test_kd_term_matches_the_kl_worked_by_hand() -> None:
    # One pixel, two classes, T = 2. Teacher logits (2 ln 3, 0) soften to (ln 3, 0): p_t = (3/4, 1/4);
    # student logits (0, 0): p_s = (1/2, 1/2). KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2), times T^2 = 4.
    teacher = torch.tensor([2 * math.log(3), 0.0]).view(1, 2, 1, 1)
    student = torch.zeros(1, 2, 1, 1)
    label = torch.tensor([[[0]]])

    kd = distillation_loss(student, teacher, label, alpha=0.0, temperature=2.0)
    mixed = distillation_loss(student, teacher, label, alpha=0.25, temperature=2.0)

    expected_kd = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(kd) == pytest.approx(expected_kd, rel=1e-6)
    assert float(mixed) == pytest.approx(0.25 * math.log(2) + 0.75 * expected_kd, rel=1e-6)  # CE of (0,0): ln 2


def test_alpha_one_is_cross_entropy_and_a_matching_student_owes_the_teacher_nothing() -> None:
    torch.manual_seed(0)
    logits, other, labels = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4), torch.randint(0, C, (2, 4, 4))
    criterion = DistillationLoss(C, DistillSpec(alpha=1.0, temperature=3.0))

    assert float(criterion(torch.cat([logits, other], 1), labels)) == pytest.approx(
        float(segmentation_loss(logits, labels)))
    assert float(distillation_loss(logits, logits, labels, alpha=0.0, temperature=3.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(logits, other, labels, alpha=0.0, temperature=3.0)) > 0.1


def test_with_teacher_steps_only_the_student_and_keeps_the_teacher_in_eval_mode() -> None:
    student = build_run_model(ModelSpec(name="tiny"), C, seed=1)
    teacher = build_run_model(ModelSpec(name="tiny"), C, seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pair = WithTeacher(student, teacher)
    batch = [(torch.randn(2, 3, 32, 32), torch.randint(0, C, (2, 32, 32)))]

    train(pair, batch, make_optimizer(pair, lr=1e-2), epochs=2,
          criterion=DistillationLoss(C, DistillSpec(alpha=0.5, temperature=2.0)))

    assert pair(batch[0][0]).shape == (2, 2 * C, 32, 32)
    assert not teacher.training and student.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BatchNorm stats too


def test_pure_distillation_pulls_the_student_toward_the_teacher(tmp_path: Path) -> None:
    # The teacher trains on the fleet's towns (seed 0); both students on the same public frames (seed 1001)
    # for the same steps, one on the labels, one on the teacher's soft labels only (alpha 0). Held out, the
    # distilled student must predict what the teacher predicts more often than the one trained alone.
    # (Its mIoU on the public towns is no better than the labels': see the next test for where it wins.)
    spec = DataSpec(root=str(tmp_path / "data"), image_size=(32, 32), frames_per_vehicle=6, heldout_frames=4)
    fleet, public = (load_data(spec, num_clients=2, seed=seed, progress=False) for seed in (0, 1001))
    teacher = build_run_model(ModelSpec(name="tiny"), C, seed=0)
    _fit(teacher, ConcatDataset(fleet.clients), epochs=4)
    heldout = torch.stack([public.heldout[i][0] for i in range(len(public.heldout))])
    said = predict(teacher, heldout)

    agreement = {}
    for alpha in (1.0, 0.0):  # 1: labels alone (plain cross-entropy); 0: the teacher alone
        student = build_run_model(ModelSpec(name="tiny"), C, seed=1)
        _fit(WithTeacher(student, teacher), ConcatDataset(public.clients), epochs=3,
             criterion=DistillationLoss(C, DistillSpec(alpha=alpha, temperature=1.0)))
        agreement[alpha] = float((predict(student, heldout) == said).float().mean())

    assert agreement[0.0] > agreement[1.0] + 0.03, agreement


def test_distillation_beats_the_student_trained_alone_on_the_fleets_streets(tmp_path: Path) -> None:
    # What a vehicle's model is for: the fleet's own towns. A tiny teacher trained on 8 vehicles' towns (seed 0,
    # 256 frames) knows them (held out: about 0.41 mIoU); students see only 8 public frames (seed 1001) for the
    # same 60 epochs, one on their labels alone, one distilled (alpha 0.5, T 2). On the fleet's held-out frames
    # the distilled student wins (+0.9 to +1.6 points for student seeds 1-3), because the teacher's soft labels
    # carry what the fleet learned; on the public towns' own held-out frames the two are level.
    root = str(tmp_path / "data")
    fleet = load_data(DataSpec(root=root, image_size=(32, 32), frames_per_vehicle=32, heldout_frames=24),
                      num_clients=8, seed=0, progress=False)
    public = load_data(DataSpec(root=root, image_size=(32, 32), frames_per_vehicle=8, heldout_frames=4),
                       num_clients=1, seed=1001, progress=False)
    teacher = build_run_model(ModelSpec(name="tiny"), C, seed=0)
    _fit(teacher, ConcatDataset(fleet.clients), epochs=20, lr=1e-2, batch_size=8)
    streets = make_loader(fleet.heldout, batch_size=24, shuffle=False, seed=0)

    gained = []
    for seed in (1, 2):
        miou = {}
        for alpha in (1.0, 0.5):  # 1: the labels alone (plain cross-entropy); 0.5: Hinton's mix
            student = build_run_model(ModelSpec(name="tiny"), C, seed=seed)
            _fit(WithTeacher(student, teacher), ConcatDataset(public.clients), epochs=60,
                 criterion=DistillationLoss(C, DistillSpec(alpha=alpha, temperature=2.0)))
            miou[alpha] = _miou(student, streets)
        gained.append(miou[0.5] - miou[1.0])

    teacher_miou = _miou(teacher, streets)
    assert teacher_miou > 0.3, teacher_miou  # far better than either student (0.13-0.15)
    assert sum(gained) / len(gained) > 0.005, gained


def _miou(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    return float(scores(evaluate(model, loader, num_classes=C).confmat, LABELS.class_names)["miou"])


def _fit(model: torch.nn.Module, frames: ConcatDataset, *, epochs: int, criterion: DistillationLoss | None = None,
         lr: float = 3e-3, batch_size: int = 4) -> None:
    optimizer = make_optimizer(model, lr=lr)
    for epoch in range(epochs):
        train(model, make_loader(frames, batch_size=batch_size, shuffle=True, seed=epoch), optimizer, epochs=1,
              criterion=criterion)


@pytest.mark.parametrize(("teacher", "data", "seed", "message"), [
    ({"task": "lane_object"}, {}, 1001, r"does not fit this run: 5 classes \(this run: 13"),
    ({"image_size": (64, 64)}, {}, 1001, r"image_size \[64, 64\] \(this run: \[32, 32\]; set data.image_size=\[64,64\]\)"),
    ({}, {"input": "seg"}, 1001, r"input rgb \(this run: seg"),
    ({"seed": 7}, {}, 7, r"trained on the synthetic towns of seed=7, its fleet's frames"),
])
def test_a_teacher_of_another_setup_or_the_fleets_own_frames_is_refused_in_one_line(
        tmp_path: Path, teacher: dict, data: dict, seed: int, message: str) -> None:
    path = _teacher_file(tmp_path / "global.pt", **teacher)
    spec = DataSpec(image_size=(32, 32), **data)

    with pytest.raises(ValueError, match=message) as err:
        check_teacher(path, data=spec, label_map=LABELS, seed=seed)

    assert str(err.value).startswith(f"teacher={path}") and "\n" not in str(err.value)


def test_fedseg_distill_writes_the_run_contract_and_a_loadable_student(tmp_path: Path) -> None:
    teacher, out = _teacher_file(tmp_path / "teacher" / "global.pt"), tmp_path / "distilled"
    exe = Path(sys.executable).with_name("fedseg-distill")
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}

    proc = subprocess.run(
        [str(exe), f"teacher={teacher}", "student=tiny", "model.decoder_channels=[16,8,8]", "experiment=smoke",
         "data.image_size=[32,32]", "data.frames_per_vehicle=4", "data.heldout_frames=4",
         f"data.root={tmp_path / 'data'}", "train.epochs=1", "run.progress=false", f"hydra.run.dir={out}"],
        check=False, capture_output=True, text=True, env=env, timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and all("miou" in r and "per_class_iou" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "tiny" and summary["teacher"]["backbone"] == "tiny"
    assert summary["miou_drop_points"] == pytest.approx(100 * (summary["teacher"]["miou"] - rows[-1]["miou"]),
                                                        abs=0.01)
    _, meta = load_checkpoint(out / "checkpoints" / "global.pt")  # what fedseg-export reads
    init = ModelSpec(name="tiny", decoder_channels=(16, 8, 8), init=str(out / "checkpoints" / "global.pt"))
    load_initial_weights(build_run_model(init, C, seed=0), init)  # and what model.init= starts a run from
    assert meta["decoder_channels"] == [16, 8, 8] and meta["config"]["seed"] == 1001
    assert meta["distilled"] == {"teacher": str(teacher), "teacher_backbone": "tiny", "alpha": 0.5, "temperature": 2.0}
