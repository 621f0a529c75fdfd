"""A catalogue of bad input across the entry points: each gets one line naming the key, value or file,
a non-zero exit, and no traceback. Nothing trains, nothing hangs.

Every case runs the entry point's Hydra ``main`` in-process, as its console script does (argv,
``sys.exit``); the first case of each command also runs as a real subprocess, so that what a user
sees in a terminal is checked too, without paying a Python start-up for all thirty.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.checkpoints import checkpoint_meta, save_checkpoint
from fedseg.config import DataSpec, ModelSpec
from fedseg.labels import build_label_map
from fedseg.models import build_run_model

pytestmark = pytest.mark.e2e
MAINS = {"fedseg-sim": "fedseg.sim.federated", "fedseg-train": "fedseg.sim.centralized",
         "fedseg-export": "fedseg.sim.export", "fedseg-search": "fedseg.sim.search",
         "fedseg-collect": "fedseg.sim.collect"}

SMOKE = ("experiment=smoke", "run.progress=false")
CASES = [
    # fedseg-sim: types, ranges, unknown keys
    ("fedseg-sim", [*SMOKE, "federation.rounds=abc"], "federation.rounds='abc': expected an integer"),
    ("fedseg-sim", [*SMOKE, "federation.rounds=0"], "federation.rounds=0 is out of range: must be >= 1"),
    ("fedseg-sim", [*SMOKE, "federation.fraction_fit=1.5"], "federation.fraction_fit=1.5 is out of range"),
    ("fedseg-sim", [*SMOKE, "+federation.roundz=3"], "unknown federation keys ['roundz']"),
    ("fedseg-sim", [*SMOKE, "seed=abc"], "seed='abc': expected an integer"),
    ("fedseg-sim", [*SMOKE, "federation.min_fit_clients=5"], "federation.min_fit_clients=5 exceeds"),
    ("fedseg-sim", [*SMOKE, "federation.sim_nodes=2"], "federation.sim_nodes=2: a round samples 3 of 3 vehicles"),
    ("fedseg-sim", [*SMOKE, "federation.optimizer=rmsprop"], "federation.optimizer=rmsprop: valid:"),
    # fedseg-sim: registries and data
    ("fedseg-sim", [*SMOKE, "model.name=nope"], "unknown backbone 'nope'; valid:"),
    ("fedseg-sim", [*SMOKE, "data.tagset=carla30"], "unknown tag set 'carla30'; valid:"),
    ("fedseg-sim", [*SMOKE, "data.task=lanes"], "unknown task 'lanes'; valid:"),
    ("fedseg-sim", [*SMOKE, "data.input=depth"], "data.input='depth': expected 'rgb' | 'seg'"),
    ("fedseg-sim", [*SMOKE, "data.image_size=[64]"], "data.image_size=[64]: expected a list of 2"),
    ("fedseg-sim", [*SMOKE, "data.image_size=[60,60]"], "data.image_size=[60, 60] must be multiples of 8"),
    ("fedseg-sim", [*SMOKE, "data=carla"], "data.root is required"),
    ("fedseg-sim", [*SMOKE, "data=carla", "data.root=/nonexistent/carla"], "/nonexistent/carla"),
    # fedseg-sim: an existing Ray cluster (ray.address), checked before anything starts
    ("fedseg-sim", [*SMOKE, "ray.address=headnode"], "ray.address='headnode': expected HOST:PORT"),
    ("fedseg-sim", [*SMOKE, "ray.address=127.0.0.1:6379", "federation.ray_cpus=2"],
     "federation.ray_cpus=2 with ray.address=127.0.0.1:6379: an existing cluster's CPUs are set on its nodes"),
    ("fedseg-sim", [*SMOKE, "ray.address=127.0.0.1:1"], "ray.address=127.0.0.1:1: nothing answers there"),
    # fedseg-sim: privacy, secure aggregation, tracking, and how they combine
    ("fedseg-sim", [*SMOKE, "privacy=dpsgd", "privacy.target_epsilon=0.001"],
     "privacy.target_epsilon=0.001 is out of reach"),
    ("fedseg-sim", [*SMOKE, "privacy=dpsgd", "privacy.noise_multiplier=1.0"], "exactly one of noise_multiplier"),
    ("fedseg-sim", [*SMOKE, "privacy=dpsgd", "privacy.grad_sample_mode=fast"], "privacy.grad_sample_mode='fast'"),
    ("fedseg-sim", [*SMOKE, "privacy=dpsgd", "privacy.delta=0.5"], "privacy.delta=0.5 must be below 1/N"),
    ("fedseg-sim", [*SMOKE, "privacy=dpsgd", "privacy.grad_sample_mode=ew", "model.name=inception_next_tiny"],
     ("privacy.grad_sample_mode=ew cannot give model inception_next_tiny per-sample gradients (Opacus); "
      "valid for it: ['ghost', 'hooks', 'functorch']")),
    ("fedseg-sim", [*SMOKE, "privacy=central", "strategy=krum"], "privacy=central calibrates its noise"),
    ("fedseg-sim", [*SMOKE, "secagg=secaggplus", "strategy=fedmedian"], "strategy=fedmedian needs each update"),
    ("fedseg-sim", [*SMOKE, "secagg=secaggplus", "federation.num_clients=2", "federation.min_fit_clients=2"],
     "needs at least 3 vehicles per round"),
    ("fedseg-sim", [*SMOKE, "tracking=wandb", "tracking.mode=cloud"], "tracking.mode='cloud'"),
    # fedseg-sim: the start file (model.init, resume), checked before any frame is rendered or Ray starts
    ("fedseg-sim", [*SMOKE, "model.init=/nonexistent/global.pt"], "model.init: checkpoint not found: /nonexistent"),
    ("fedseg-sim", [*SMOKE, "model.init={ckpt}/hostname"], "hostname is not a fedseg checkpoint: not a torch file"),
    ("fedseg-sim", [*SMOKE, "model.init={ckpt}/other_backbone.pt"],
     "other_backbone.pt does not fit this run: backbone resnet18 (this run: tiny)"),
    ("fedseg-sim", [*SMOKE, "model.init={ckpt}/other_classes.pt"],
     "other_classes.pt does not fit this run: 99 classes (this run: "),
    ("fedseg-sim", [*SMOKE, "model.init={ckpt}/other_size.pt"],
     "other_size.pt does not fit this run: image_size [96, 128] (this run: [64, 64])"),
    ("fedseg-sim", ["resume={ckpt}/broken_run"],
     "resume: {ckpt}/broken_run/checkpoints/global.pt is not a fedseg checkpoint: not a torch file"),
    # fedseg-train
    ("fedseg-train", [*SMOKE, "train.epochs=0"], "train.epochs=0 is out of range"),
    ("fedseg-train", [*SMOKE, "federation.lr=-1"], "federation.lr=-1.0 is out of range: must be > 0"),
    ("fedseg-train", [*SMOKE, "model.init={ckpt}/other_classes.pt"], "other_classes.pt does not fit this run"),
    ("fedseg-train", [*SMOKE, "privacy=dpsgd", "privacy.grad_sample_mode=ew", "model.name=inception_next_tiny"],
     "privacy.grad_sample_mode=ew cannot give model inception_next_tiny"),
    # fedseg-export
    ("fedseg-export", [], "needs checkpoint=PATH"),
    ("fedseg-export", ["checkpoint=/nonexistent/global.pt"], "checkpoint not found: /nonexistent/global.pt"),
    ("fedseg-export", ["checkpoint={not_a_checkpoint}"], "not_a_checkpoint.pt is not a fedseg checkpoint"),
    # fedseg-search
    ("fedseg-search", [*SMOKE, "search.backbones=[nope]"], "unknown backbone(s) ['nope'] in search.backbones"),
    ("fedseg-search", [*SMOKE, "hardware.latency_ms=abc"], "hardware.latency_ms='abc'"),
    # fedseg-collect
    ("fedseg-collect", ["port=abc", "out={tmp}/collect"], "port='abc': expected an integer"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad_input")
    (path / "not_a_checkpoint.pt").write_bytes(os.urandom(256))
    (path / "hostname").write_text("vm\n")  # as /etc/hostname: a text file given as model.init
    write_start_checkpoints(path)
    return path


def write_start_checkpoints(folder: Path) -> None:
    """Checkpoints that fit ``experiment=smoke`` but for one thing each, written by fedseg's own save."""
    spec, data = ModelSpec(name="tiny"), DataSpec(image_size=(64, 64))
    label_map = build_label_map(data.tagset, data.task)
    model = build_run_model(spec, label_map.num_classes, seed=0)
    fits = checkpoint_meta(spec, data, label_map, {"mode": "centralized"})
    for name, changed in (("other_backbone", {"backbone": "resnet18"}), ("other_classes", {"num_classes": 99}),
                          ("other_size", {"image_size": [96, 128]})):
        save_checkpoint(folder / f"{name}.pt", model, fits | changed)
    run = folder / "broken_run"  # a run directory whose checkpoint is not one
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("experiment_name: smoke\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "global.pt").write_text("vm\n")


def run_in_process(command: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    main = importlib.import_module(MAINS[command]).main
    monkeypatch.setattr(sys, "argv", [command, *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def run_subprocess(command: str, args: list[str]) -> tuple[int, str]:
    exe = Path(sys.executable).with_name(command)
    proc = subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    return proc.returncode, proc.stderr + proc.stdout


FIRST_OF_EACH = {command: i for i, (command, _, _) in reversed(list(enumerate(CASES)))}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c}-{' '.join(a[2:] or a)}" for c, a, _ in CASES])
def test_bad_input_gets_one_line_naming_it(case: int, workdir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    command, args, message = CASES[case]
    args = [a.format(not_a_checkpoint=workdir / "not_a_checkpoint.pt", ckpt=workdir, tmp=tmp_path) for a in args]
    args.append(f"hydra.run.dir={tmp_path / 'run'}")
    monkeypatch.setenv("FEDSEG_DATA_CACHE", str(workdir / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")

    runs = [run_in_process(command, args, monkeypatch, capsys)]
    if FIRST_OF_EACH[command] == case:
        runs.append(run_subprocess(command, args))

    for code, stderr in runs:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code != 0
        assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), stderr[-2000:]
        assert message.format(ckpt=workdir) in lines[0]
        assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran
