"""``fedseg-distill``: the fleet's model teaches the vehicle's model, on public frames only.

    fedseg-distill teacher=outputs/RUN/checkpoints/global.pt student=mobilenet_v2

The teacher is a ``fedseg-sim`` or ``fedseg-train`` checkpoint; the student a registry backbone, shaped
by the ``model`` block as any run's model (``model.decoder_channels=[...]``, ``model.init=...``). The
frames are the embedded synthetic towns of a seed other than the fleet's (conf/distill.yaml: 1001), pooled
as fedseg-train pools them, and the student trains with fedseg-train's own loop
(:func:`fedseg.sim.centralized.train_epochs`) under :class:`fedseg.distill.DistillationLoss`. The run
directory holds what fedseg-train's does (``metrics.jsonl`` per epoch, ``summary.json``,
``checkpoints/global.pt`` for ``fedseg-export`` and ``model.init=``); ``summary.json`` adds the teacher's
held-out mIoU on the same frames and the student's drop below it in points.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset

from fedseg.checkpoints import checkpoint_meta, load_checkpoint, load_initial_weights
from fedseg.config import parse_spec, resolve_device
from fedseg.data import load_data
from fedseg.distill import DistillationLoss, DistillSpec, WithTeacher, check_teacher
from fedseg.labels import build_label_map
from fedseg.metrics import scores
from fedseg.models import BACKBONES, build_run_model, count_parameters
from fedseg.reporting import RunReporter
from fedseg.settings import RunSettings, check_choices
from fedseg.sim._cli import CONF_DIR, check_start_file, resolve, user_errors
from fedseg.sim.centralized import train_epochs
from fedseg.training import augmented, evaluate

log = logging.getLogger("fedseg")


@user_errors("fedseg-distill")
def run(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "student"):
        raise ValueError(f"student is required (student=NAME, a registry backbone); valid: {sorted(BACKBONES)}")
    raw = resolve(cfg)
    if raw["model"]["name"] != raw["student"]:  # conf/distill.yaml sets model.name from student
        raise ValueError(f"student={raw['student']} and model.name={raw['model']['name']}: name the student once, "
                         "with student=")
    s = RunSettings.from_config(raw)
    check_choices(s)
    check_start_file(s)  # the student's own model.init, if any
    spec = parse_spec(DistillSpec, raw.get("distill"), key="distill")
    label_map = build_label_map(s.data.tagset, s.data.task)
    teacher_path = Path(str(raw["teacher"])).expanduser()
    teacher_meta = check_teacher(teacher_path, data=s.data, label_map=label_map, seed=s.seed)  # before any frame
    fed = s.federation
    epochs = s.train.epochs or fed.rounds * fed.local_epochs
    data = load_data(s.data, num_clients=fed.num_clients, seed=s.seed, progress=s.run.progress)
    pooled: ConcatDataset = ConcatDataset(data.clients)
    student = load_initial_weights(build_run_model(s.model, label_map.num_classes, seed=s.seed, dp=s.group_norm),
                                   s.model)
    teacher, _ = load_checkpoint(teacher_path)
    out, device = Path(s.output_dir), resolve_device(s.device)
    distilled = {"teacher": str(teacher_path), "teacher_backbone": teacher_meta["backbone"],
                 "alpha": spec.alpha, "temperature": spec.temperature}
    tracker = s.tracking.build(run_dir=out, config=raw, name=f"{s.experiment}-{s.model.name}-distilled")
    reporter = RunReporter(model=student, data=data, out_dir=out, tracker=tracker,
                           meta=checkpoint_meta(s.model, s.data, label_map, {"mode": "centralized", "config": raw,
                                                                            "distilled": distilled}),
                           total_rounds=epochs, batch_size=max(fed.batch_size, 8), device=device,
                           example_images=s.run.example_images, early_stop=s.early_stop, lr_drops=fed.lr_drops)
    teacher_scores = scores(evaluate(teacher, reporter.loader, num_classes=label_map.num_classes,
                                     device=device).confmat, label_map.class_names)
    log.info(f"fedseg-distill: {teacher_meta['backbone']} teacher (held-out mIoU {teacher_scores['miou']:.3f}) -> "
             f"{s.model.name} student, {len(pooled)} public frames (seed {s.seed}), {len(data.heldout)} held-out, "
             f"{epochs} epochs, alpha {spec.alpha}, T {spec.temperature} -> {out}")
    converged = train_epochs(WithTeacher(student, teacher), augmented(pooled, fed.augment), reporter, s,
                             epochs=epochs, device=device, prog="fedseg-distill",
                             criterion=DistillationLoss(label_map.num_classes, spec))
    final = reporter.log.rows[-1]["miou"]
    teacher_summary = {"checkpoint": str(teacher_path), "backbone": teacher_meta["backbone"],
                       "parameters": count_parameters(teacher), "miou": teacher_scores["miou"]}
    summary = reporter.finish({"experiment": s.experiment, "epochs": epochs, "privacy": None,
                               "converged_round": converged, "teacher": teacher_summary,
                               "miou_drop_points": round(100 * (teacher_scores["miou"] - final), 2)})
    log.info(f"fedseg-distill: student mIoU {final:.3f}, teacher {teacher_scores['miou']:.3f} on the same "
             f"held-out frames ({summary['miou_drop_points']:+.2f} points below) -> {out / 'checkpoints' / 'global.pt'}")
    return summary


@hydra.main(config_path=CONF_DIR, config_name="distill", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
