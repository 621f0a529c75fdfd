"""A vehicle runs only code its owner approved (fedseg/deploy/approval.py, fedseg/sim/vehicle_apps.py): its
installed fedseg, or app bundles whose sha256 is on its allowlist; and (marker ``deploy``) real SuperLink,
SuperNodes and fedseg-superexec on loopback: a tampered bundle's code never runs in installed mode, an
approved bundle's code runs and trains, and a bundle off the allowlist is refused in one line.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from deploy_fleet import PROJECT, LocalFleet
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import subprocess_executor

from fedseg.deploy.approval import POLICY_ENV, AppPolicy, bundle_hash, read_allowlist
from fedseg.deploy.launch import VehicleLaunch, superexec_command, supernode_command
from fedseg.sim.vehicle_apps import launcher_path, route_tasks_to, superexec_main

A, B = "a" * 64, "0123456789abcdef" * 4


# ---- the policy: hand-written cases ----------------------------------------------------------------

def test_installed_mode_runs_any_clientapp_bundle_but_never_its_code() -> None:
    policy = AppPolicy()
    content = b"any bundle"

    assert policy.installed_only and policy.to_env() == "installed"
    assert policy.refusal(task_type="flwr-clientapp", claimed_hash=bundle_hash(content), content=content) is None
    assert AppPolicy.from_env({}) == policy  # no policy set: the safe default


def test_an_allowlist_runs_listed_bundles_and_refuses_others_in_one_line() -> None:
    content = b"approved bundle"
    listed = AppPolicy.from_args([hashlib.sha256(content).hexdigest().upper()])
    other = b"another bundle"

    refused = listed.refusal(task_type="flwr-clientapp", claimed_hash=bundle_hash(other), content=other)

    assert listed.refusal(task_type="flwr-clientapp", claimed_hash=bundle_hash(content), content=content) is None
    assert refused == (f"refused app bundle {hashlib.sha256(other).hexdigest()}: not on this vehicle's "
                       "allowlist (1 approved)")
    assert AppPolicy.from_env({POLICY_ENV: listed.to_env()}) == listed


def test_agent_apps_and_bundles_whose_bytes_miss_their_hash_are_refused_in_every_mode() -> None:
    content = b"bundle"
    for policy in (AppPolicy(), AppPolicy.from_args([bundle_hash(content)])):
        agent = policy.refusal(task_type="flwr-agentapp", claimed_hash=bundle_hash(content), content=content)
        forged = policy.refusal(task_type="flwr-clientapp", claimed_hash=A, content=content)
        assert agent is not None and "runs only ClientApps" in agent
        assert forged is not None and "do not match the hash it came with" in forged


def test_allowlist_files_take_one_hash_a_line_and_name_a_bad_line(tmp_path: Path) -> None:
    good, bad, empty = tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "empty.txt"
    good.write_text(f"# approved 2025-01\n{A}  fedseg 0.1.0\n\n{B}\n")
    bad.write_text(f"{A}\nnot-a-hash\n")
    empty.write_text("# nothing yet\n")

    assert read_allowlist(good) == [A, B]
    with pytest.raises(ValueError) as wrong:
        AppPolicy.from_args([], [bad])
    with pytest.raises(ValueError) as none:
        AppPolicy.from_args([], [empty])
    assert str(wrong.value).startswith(f"{bad}:2: 'not-a-hash' is not a sha256") and "\n" not in str(wrong.value)
    assert "names no bundle" in str(none.value)


def test_a_bundles_hash_is_the_one_flwr_build_and_flwr_run_compute(tmp_path: Path) -> None:
    app = _copy_app(tmp_path / "app")
    fab = build_fab_from_disk(app)

    assert bundle_hash(fab) == hashlib.sha256(fab).hexdigest() == bundle_hash(build_fab_from_disk(app))


# ---- the vehicle's SuperExec ----------------------------------------------------------------------

def test_flowers_superexec_starts_fedsegs_launcher_for_every_task_type(monkeypatch: pytest.MonkeyPatch) -> None:
    for task_type in TaskType:  # restored after the test: this process is not a SuperExec
        monkeypatch.setitem(subprocess_executor.TASK_TYPE_TO_COMMAND, task_type,
                            subprocess_executor.TASK_TYPE_TO_COMMAND[task_type])
    route_tasks_to(launcher_path())

    assert {subprocess_executor.TASK_TYPE_TO_COMMAND[t] for t in TaskType} == {launcher_path()}
    assert Path(launcher_path()).name == "fedseg-clientapp"


@pytest.mark.parametrize(("args", "message"), [
    (["--allow-app", "abc"], "--allow-app: 'abc' is not a sha256"),
    (["--executor", "kubernetes"], "local processes only"),
    (["--allow-runtime-dependency-installation"], "installs nothing a run names"),
])
def test_fedseg_superexec_refuses_what_would_open_the_vehicle_in_one_line(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        superexec_main(["--runtime-api-address", "127.0.0.1:9", "--insecure", *args])

    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("fedseg-superexec: error: ") and message in err
    assert "\n" not in err


def test_the_supernode_starts_no_superexec_of_its_own_and_the_key_stays_with_it(tmp_path: Path) -> None:
    key = tmp_path / "car.key"
    launch = VehicleLaunch(superlink="link:9092", partition_id=0, num_partitions=2, key=key, insecure=True,
                           port=9101, allow_apps=(A,), allow_app_files=(tmp_path / "approved.txt",))

    node, runner = supernode_command(launch), superexec_command(launch, 4242)

    assert node[node.index("--isolation") + 1] == "process"
    assert runner[1:] == ["--runtime-api-address", "127.0.0.1:9101", "--insecure", "--parent-pid", "4242",
                          "--allow-app", A, "--allow-apps", str(tmp_path / "approved.txt")]
    assert not any(str(key) in arg for arg in runner)  # the ClientApp's launcher never hears of the key
    with pytest.raises(ValueError, match="--isolation after --"):
        supernode_command(launch, ["--isolation", "subprocess"])


# ---- the Deployment Engine for real ------------------------------------------------------------------

TAMPER = '''

# --- tampered: a server that ships its own code leaves a mark where it ran
import os as _os

_honest_client_fn = client_fn


def client_fn(context: Context) -> Client:  # noqa: F811
    Path(_os.environ["FEDSEG_TAMPER_MARKS"], f"ran-{context.node_config['partition-id']}").write_text("ran")
    return _honest_client_fn(context)


app = ClientApp(client_fn=client_fn, mods=VEHICLE_MODS)
'''


def _copy_app(dest: Path, extra: str = "") -> Path:
    """The checkout's app files (what flwr run bundles), with ``extra`` appended to the ClientApp's module."""
    for name in ("pyproject.toml", ".gitignore", "README.md", "fedseg", "clients", "server", "sim", "conf"):
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    module = dest / "fedseg" / "clients" / "client_app.py"
    module.write_text(module.read_text() + extra)
    return dest


@pytest.mark.deploy
def test_vehicles_run_only_their_installed_fedseg_or_approved_bundles(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    approved = _copy_app(tmp_path / "approved", TAMPER)  # approved on vehicle 1, tampered for vehicle 0
    unapproved = _copy_app(tmp_path / "unapproved", TAMPER + "# one byte more\n")
    fleet = LocalFleet(tmp_path / "fleet", env_extra={"FEDSEG_DATA_CACHE": str(tmp_path / "cache"),
                                                      "FEDSEG_TAMPER_MARKS": str(marks), "WANDB_MODE": "offline"})
    overrides = ("experiment=smoke federation.num_clients=2 federation.min_fit_clients=1 federation.rounds=1 "
                 "deploy.join_timeout=120")
    try:
        (fleet.root / "server").mkdir(parents=True)
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=fleet.root / "server")
        fleet.start_vehicle("vehicle_0", "--partition-id", "0", "--num-partitions", "2")  # installed mode
        fleet.start_vehicle("vehicle_1", "--partition-id", "1", "--num-partitions", "2",
                            "--allow-app", bundle_hash(build_fab_from_disk(approved)))
        ran = fleet.run(overrides, app=approved, timeout=420)
        ran_marks = sorted(p.name for p in marks.iterdir())
        refused = fleet.run(overrides, app=unapproved, timeout=420)
    finally:
        fleet.stop()

    # Both trained; only the vehicle that approved the bundle ran its code (vehicle 0 ran its own fedseg).
    assert ran.status == "finished:completed", ran.output[-3000:]
    assert "fedseg-clientapp: run " in fleet.log("vehicle_0") and ran_marks == ["ran-1"]
    assert "is approved: running its code" in fleet.log("vehicle_1")
    # The bundle off vehicle 1's allowlist: refused there in one line naming its hash; vehicle 0 trained.
    bad = bundle_hash(build_fab_from_disk(unapproved))
    lines = [line for line in fleet.log("vehicle_1").splitlines() if f"refused app bundle {bad}" in line]
    assert len(lines) >= 1 and all("not on this vehicle's allowlist" in line for line in lines)
    assert refused.status in ("finished:completed", "finished:failed"), refused.output[-3000:]
    assert f"vehicle refused app bundle {bad}: not on this vehicle's allowlist" in refused.output  # the server says
    assert sorted(p.name for p in marks.iterdir()) == ["ran-1"]  # nothing of the refused bundle ran
