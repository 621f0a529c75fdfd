"""``fedseg-train``: the centralized baseline, what federated training is measured against.

Pools every vehicle's frames (what a fleet operator would do without privacy constraints) and trains
the same model with the same optimizer for, by default, the same total number of local epochs as the
federated run (``federation.rounds x federation.local_epochs``), evaluating on the same held-out set.
What the vehicles' training does to frames it does too: the same augmentation
(``federation.augment``) and the same lr schedule, epoch by epoch as the federated run's rounds
(``federation.lr_schedule``; epoch e of E uses round ceil(e x rounds / E)'s lr).
Each epoch is one row of ``metrics.jsonl`` (``round`` = epoch; round 0 = the initial model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from fedseg.checkpoints import checkpoint_meta, load_initial_weights
from fedseg.config import resolve_device
from fedseg.data import load_data
from fedseg.models import build_run_model
from fedseg.quality import Converged, check_compare
from fedseg.reporting import RunReporter
from fedseg.runlog import metrics_row
from fedseg.settings import RunSettings, check_choices
from fedseg.sim._cli import CONF_DIR, check_start_file, resolve, user_errors
from fedseg.training import (
    augmented,
    derive_seed,
    epoch_round,
    make_loader,
    make_optimizer,
    scheduled_lr,
    set_lr,
    train,
)

log = logging.getLogger("fedseg")


@user_errors("fedseg-train")
def run(cfg: DictConfig) -> dict:
    raw = resolve(cfg)
    s = RunSettings.from_config(raw)
    check_choices(s)
    check_start_file(s)  # a bad model.init: one line before any frame is rendered
    compare = check_compare(s.compare, data=raw.get("data") or {}, seed=s.seed)  # likewise a bad compare=
    fed, progress = s.federation, s.run.progress
    epochs = s.train.epochs or fed.rounds * fed.local_epochs
    data = load_data(s.data, num_clients=fed.num_clients, seed=s.seed, progress=progress)
    pooled: ConcatDataset = ConcatDataset(data.clients)
    frames = augmented(pooled, fed.augment)
    model = load_initial_weights(build_run_model(s.model, data.label_map.num_classes, seed=s.seed,
                                                 dp=s.group_norm), s.model)
    out, device = Path(s.output_dir), resolve_device(s.device)
    tracker = s.tracking.build(run_dir=out, config=raw, name=f"{s.experiment}-{s.model.name}-centralized")
    reporter = RunReporter(model=model, data=data, out_dir=out, tracker=tracker,
                           meta=checkpoint_meta(s.model, s.data, data.label_map,
                                                {"mode": "centralized", "config": raw}),
                           total_rounds=epochs, batch_size=max(fed.batch_size, 8), device=device,
                           example_images=s.run.example_images, early_stop=s.early_stop,
                           compare=compare, lr_drops=fed.lr_drops)
    log.info(f"fedseg-train: {len(pooled)} pooled frames, {len(data.heldout)} held-out, {s.model.name}, "
             f"{epochs} epochs -> {out}")
    converged = train_epochs(model, frames, reporter, s, epochs=epochs, device=device, prog="fedseg-train")
    return reporter.finish({"experiment": s.experiment, "epochs": epochs, "privacy": None,
                            "converged_round": converged})


def train_epochs(trainee: nn.Module, frames: Dataset, reporter: RunReporter, s: RunSettings, *, epochs: int,
                 device: str, prog: str, criterion: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
                 ) -> int | None:
    """fedseg-train's loop: the reporter's model evaluated and recorded as epoch 0, then ``epochs`` epochs of
    ``trainee`` on ``frames`` (``federation``'s optimizer, batch size and lr schedule), each evaluated and
    recorded; returns the epoch ``early_stop`` stopped at, else None. ``trainee`` is the reporter's model,
    or it wrapped with what its ``criterion`` needs (fedseg-distill: the teacher beside it)."""
    fed = s.federation
    loss, metrics = reporter.evaluate()
    reporter.record(_row(0, loss, metrics, train_loss=None, seconds=0.0, examples=0))
    optimizer = make_optimizer(trainee, name=fed.optimizer, lr=fed.lr)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        as_round = epoch_round(epoch, epochs=epochs, rounds=fed.rounds)
        lr = scheduled_lr(fed.lr, fed.lr_schedule, round_=as_round, rounds=fed.rounds, final=fed.lr_final,
                          dropped=reporter.lr_dropped())
        set_lr(optimizer, lr)
        loader = make_loader(frames, batch_size=fed.batch_size, shuffle=True, seed=derive_seed(s.seed, epoch))
        result = train(trainee, loader, optimizer, epochs=1, device=device, criterion=criterion,
                       progress=f"epoch {epoch}/{epochs}" if s.run.progress else None)
        seconds = time.perf_counter() - t0
        loss, metrics = reporter.evaluate()
        try:
            reporter.record(_row(epoch, loss, metrics, result.loss, seconds, result.num_examples, result.steps, lr))
        except Converged as done:  # early_stop: held-out mIoU stopped improving
            log.info(f"{prog}: {done}")
            return epoch
    return None


def _row(epoch: int, loss: float, metrics: dict, train_loss: float | None, seconds: float,
         examples: int, steps: int = 0, lr: float | None = None) -> dict:
    return metrics_row(epoch, loss, metrics, epsilon=None, delta=None, bytes_up=0, bytes_down=0,
                       round_s=seconds, clients=1, train_loss=train_loss, examples=examples, steps=steps,
                       lr=lr)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
