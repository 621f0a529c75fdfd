"""Flower's Deployment Engine: settings through ``flwr run``, a vehicle's own data, the server's patience,
credentials, the vehicle launcher; and (marker ``deploy``) a real SuperLink with 3 SuperNodes on loopback
with TLS and node authentication.
"""

from __future__ import annotations

import logging
import shutil
import stat
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)
from deploy_fleet import PROJECT, LocalFleet

from fedseg.config import to_run_config
from fedseg.deploy.certs import make_credentials, vehicle_names
from fedseg.deploy.launch import VehicleLaunch, check_vehicle, supernode_command
from fedseg.deploy.runconfig import compose_overrides, expand_run_config
from fedseg.deploy.vehicle import NodeSpec, load_heldout, load_vehicle, own_frames
from fedseg.errors import DataError
from fedseg.server.fleet import FleetClientManager, FleetError, wait_for_vehicles
from fedseg.settings import settings_of
from fedseg.sim.deploy import vehicle_main

SAMPLE = Path(__file__).parent / "data" / "carla_sample" / "dataA"
SMOKE = "experiment=smoke federation.num_clients=3"
CONTRACT = {"round", "loss", "pixel_acc", "miou", "dice", "per_class_iou", "epsilon", "delta",
            "bytes_up", "bytes_down", "round_s", "clients"}


# ---- settings: one run-config key, composed like fedseg-sim ----------------------------------------

def test_overrides_give_the_config_fedseg_sim_composes_plus_the_run_directory() -> None:
    expanded = expand_run_config({"overrides": SMOKE + " federation.lr=0.01"}, run_id=42)

    expected = to_run_config({**compose_overrides(SMOKE.split() + ["federation.lr=0.01"]),
                              "output_dir": "outputs/deploy/42"})
    assert expanded == expected
    assert (expanded["experiment_name"], expanded["model.name"], expanded["federation.num_clients"]) == (
        "smoke", "tiny", 3)
    assert expanded["federation.rounds"] == 2 and expanded["federation.lr"] == 0.01


def test_a_group_choice_brings_its_own_keys() -> None:
    # privacy=dpsgd adds keys the default config lacks: a flat table of keys could not carry them.
    expanded = expand_run_config({"overrides": "experiment=smoke privacy=dpsgd privacy.noise_multiplier=0.7 "
                                               "deploy.output_dir=/srv/runs"}, run_id=7)

    assert expanded["privacy.name"] == "dpsgd" and expanded["privacy.noise_multiplier"] == 0.7
    assert "privacy.noise_multiplier" not in expand_run_config({"overrides": ""}, run_id=7)
    assert expanded["output_dir"] == "/srv/runs/7"


def test_fedseg_sims_full_config_passes_unchanged() -> None:
    flat = {"federation.rounds": 3, "output_dir": "/tmp/x"}
    assert expand_run_config(flat, run_id=1) == flat


@pytest.mark.parametrize(("overrides", "message"), [
    ("experiment=nope", "Could not find 'experiment/nope'"),
    ("federation.nope=1", "federation.nope"),
    ("data.root='unclosed", "No closing quotation"),
])
def test_bad_overrides_are_one_line_naming_them(overrides: str, message: str) -> None:
    with pytest.raises(ValueError, match="run config overrides=") as err:
        expand_run_config({"overrides": overrides}, run_id=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_app_declares_only_overrides_and_no_federation() -> None:
    # `flwr run` refuses keys the table lacks, and rewrites a pyproject.toml that has federations.
    flwr = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["config"] == {"overrides": ""}
    assert "federations" not in flwr


# ---- a vehicle knows only itself ----------------------------------------------------------------

def test_node_config_is_checked_like_a_spec() -> None:
    assert NodeSpec.from_node_config({"partition-id": 2, "num-partitions": 3}).vehicle_id(99) == 2
    assert NodeSpec.from_node_config({"data-root": "/d"}).vehicle_id(99) == 99
    assert NodeSpec.from_node_config({"hardware": "arm_4core"}).torch_threads(1) == 4
    assert NodeSpec.from_node_config({"threads": 3, "hardware": "arm_4core"}).torch_threads(1) == 3
    with pytest.raises(ValueError, match=r"unknown node config keys \['data_root'\]; valid: .*'data-root'"):
        NodeSpec.from_node_config({"data_root": "/d"})
    with pytest.raises(ValueError, match="hardware=abacus: valid:"):
        NodeSpec.from_node_config({"hardware": "abacus"})
    with pytest.raises(ValueError, match="partition-id='1': expected an integer"):
        NodeSpec.from_node_config({"partition-id": "1"})


def _fleet_folder(root: Path, vehicles: list[str]) -> Path:
    for name in vehicles:
        shutil.copytree(SAMPLE, root / name)
    return root


def test_own_frames_reads_the_one_vehicle_folder_and_never_a_heldout_split(tmp_path: Path) -> None:
    alone = _fleet_folder(tmp_path / "box", ["car", "heldout"])
    several = _fleet_folder(tmp_path / "fleet", ["car_a", "car_b"])

    assert {f.source for f in own_frames(alone)} == {"car"} and len(own_frames(alone)) == 4
    assert len(own_frames(SAMPLE)) == 4  # a camera folder itself
    assert {f.source for f in own_frames(several, "car_b")} == {"car_b"}
    with pytest.raises(DataError, match=r"holds 2 vehicle folders \(car_a, car_b\); .*vehicle=NAME"):
        own_frames(several)
    with pytest.raises(DataError, match=r"no vehicle folder 'car_c'; found \['car_a', 'car_b'\]"):
        own_frames(several, "car_c")


def _smoke_settings(cache: Path):
    return settings_of(to_run_config({**compose_overrides(SMOKE.split()), "output_dir": "unused"}) | {
        "data.root": str(cache / "synthetic")})


def test_a_vehicle_loads_only_its_share_and_the_server_only_the_heldout_set(tmp_path: Path) -> None:
    settings = _smoke_settings(tmp_path)

    vehicle = load_vehicle(settings, NodeSpec.from_node_config({"partition-id": 1, "num-partitions": 3}))
    data, sizes = load_heldout(settings)

    assert {f.source for f in vehicle.dataset.frames} == {"vehicle_01"} and len(vehicle.dataset) == 8
    assert data.clients == [] and {f.source for f in data.heldout.frames} == {"heldout"} and sizes == [8, 8, 8]
    assert vehicle.num_classes == data.label_map.num_classes
    with pytest.raises(ValueError, match="num-partitions=4 but the run has federation.num_clients=3"):
        load_vehicle(settings, NodeSpec.from_node_config({"partition-id": 1, "num-partitions": 4}))


def test_a_data_root_vehicle_checks_its_files_like_data_carla(tmp_path: Path) -> None:
    settings = _smoke_settings(tmp_path)
    box = _fleet_folder(tmp_path / "box", ["car"])
    (box / "car" / "CameraSeg" / "000_0412.png").write_bytes(b"not a png")

    with pytest.raises(DataError, match=r"000_0412.png: cannot read as an image"):
        load_vehicle(settings, NodeSpec.from_node_config({"data-root": str(box)}))


# ---- the server never waits silently --------------------------------------------------------------

class _Grid:
    """get_node_ids() answers from a script: the vehicles joined by each poll."""

    def __init__(self, joined: list[int]) -> None:
        self.joined, self.polls = joined, 0

    def get_node_ids(self) -> list[int]:
        count = self.joined[min(self.polls, len(self.joined) - 1)]
        self.polls += 1
        return list(range(count))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_server_reports_vehicles_as_they_join(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    with caplog.at_level(logging.INFO, logger="fedseg"):
        joined = wait_for_vehicles(_Grid([0, 1, 1, 3]), wanted=3, minimum=3, timeout=60, clock=clock,
                                   sleep=clock.sleep)

    assert joined == 3 and clock.now == 3.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("fedseg: 0 of 3 vehicles joined; waiting up to 60 s more")
    assert lines[1].startswith("fedseg: 1 of 3 vehicles joined") and lines[-1] == "fedseg: 3 of 3 vehicles joined"


def test_after_the_join_timeout_the_run_goes_on_with_enough_vehicles_or_stops_in_one_line() -> None:
    clock = _Clock()
    assert wait_for_vehicles(_Grid([2]), wanted=3, minimum=2, timeout=5, clock=clock, sleep=clock.sleep) == 2
    assert clock.now == 5.0

    with pytest.raises(FleetError, match=r"^only 1 of 3 vehicles joined within deploy.join_timeout=5 s, fewer "
                                         r"than federation.min_fit_clients=2: start more SuperNodes"):
        wait_for_vehicles(_Grid([1]), wanted=3, minimum=2, timeout=5, clock=clock, sleep=clock.sleep)


def _manager(minimum: int, connected: int) -> FleetClientManager:
    manager = FleetClientManager(minimum=minimum, timeout=0.05)
    for cid in range(connected):
        manager.clients[str(cid)] = object()  # type: ignore[assignment]
    return manager


def test_a_later_round_waits_for_lost_vehicles_only_up_to_the_join_timeout() -> None:
    # Flower's client manager would wait a day for the third vehicle, without a word.
    started = time.monotonic()
    assert _manager(minimum=2, connected=2).wait_for(3) is False  # enough: the round goes on with two
    with pytest.raises(FleetError, match="only 2 of 3 vehicles joined within deploy.join_timeout=0.05 s"):
        _manager(minimum=3, connected=2).wait_for(3)
    assert time.monotonic() - started < 5


# ---- credentials and the vehicle launcher ---------------------------------------------------------

def test_credentials_chain_to_the_ca_and_vehicle_keys_are_what_flower_loads(tmp_path: Path) -> None:
    made = make_credentials(tmp_path, vehicles=vehicle_names(2), hosts=["link.example.org", "10.0.0.5"])

    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(made.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.5"}
    key = load_ssh_private_key(made.vehicle_keys["vehicle_1"].read_bytes(), None)
    public = load_ssh_public_key(made.vehicle_keys["vehicle_1"].with_suffix(".pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public == key.public_key()
    for private in (made.vehicle_keys["vehicle_0"], tmp_path / "ca.key", tmp_path / "superlink.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_credentials_are_never_overwritten_and_new_vehicles_are_added(tmp_path: Path) -> None:
    first = make_credentials(tmp_path, vehicles=vehicle_names(1))
    before = first.vehicle_keys["vehicle_0"].read_bytes(), first.ca_cert.read_bytes()

    second = make_credentials(tmp_path, vehicles=vehicle_names(2))

    assert (second.vehicle_keys["vehicle_0"].read_bytes(), second.ca_cert.read_bytes()) == before
    assert second.created == [tmp_path / "vehicles" / "vehicle_1.key", tmp_path / "vehicles" / "vehicle_1.pub"]


def test_the_launcher_checks_data_and_keys_then_builds_flowers_command(tmp_path: Path) -> None:
    made = make_credentials(tmp_path / "certs", vehicles=["car"])
    box = _fleet_folder(tmp_path / "box", ["car"])
    launch = VehicleLaunch(superlink="link:9092", data_root=box, partition_id=0, hardware="edge_cpu_2core",
                           key=made.vehicle_keys["car"], root_certificates=made.ca_cert, port=9101,
                           tagset="legacy13", ledger=tmp_path / "ledger.json", lifetime_epsilon=8)

    summary = check_vehicle(launch)
    cmd = supernode_command(launch)

    assert "4 frames checked" in summary and "key car.key (secp384r1)" in summary
    assert Path(cmd[0]).name == "fedseg-supernode"
    assert cmd[1:] == ["--poll-interval", "0.1", "--superlink", "link:9092", "--port", "9101", "--node-config",
                       (f'data-root="{box.resolve()}" partition-id=0 hardware="edge_cpu_2core" '
                        f'ledger="{tmp_path / "ledger.json"}" lifetime-epsilon=8'),
                       "--isolation", "process", "--root-certificates", str(made.ca_cert), "--auth-supernode-private-key",
                       str(made.vehicle_keys["car"])]


@pytest.mark.parametrize("problem", ["world-readable", "rsa", "missing", "tagset", "no-data", "both-tls"])
def test_the_launcher_refuses_what_would_fail_later_in_one_line(tmp_path: Path, problem: str) -> None:
    made = make_credentials(tmp_path / "certs", vehicles=["car"])
    key = made.vehicle_keys["car"]
    fields = {"superlink": "link:9092", "data_root": _fleet_folder(tmp_path / "box", ["car"]), "key": key,
              "root_certificates": made.ca_cert, "tagset": "legacy13"}
    expected = {"world-readable": "readable by other users; chmod 600", "rsa": "RSAPrivateKey key; Flower's node",
                "missing": "no such key file", "tagset": "outside tag set 'legacy13'",
                "no-data": "name this vehicle's data", "both-tls": "choose one"}[problem]
    if problem == "world-readable":
        key.chmod(0o644)
    elif problem == "rsa":
        other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        fields["key"] = tmp_path / "rsa.key"
        fields["key"].write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
        fields["key"].chmod(0o600)
    elif problem == "missing":
        fields["key"] = tmp_path / "nope.key"
    elif problem == "tagset":
        fields["data_root"] = _tagged_beyond_legacy(tmp_path)
    elif problem == "no-data":
        fields["data_root"] = None
    elif problem == "both-tls":
        fields["insecure"] = True

    with pytest.raises((ValueError, DataError)) as err:
        check_vehicle(VehicleLaunch(**fields))  # type: ignore[arg-type]
    assert expected in str(err.value) and "\n" not in str(err.value)


def _tagged_beyond_legacy(tmp_path: Path) -> Path:
    """A vehicle folder whose labels use a carla29 tag (id 20) the legacy13 set lacks."""
    import numpy as np
    from PIL import Image

    box = _fleet_folder(tmp_path / "box29", ["car"])
    seg = box / "car" / "CameraSeg" / "000_0412.png"
    tags = np.array(Image.open(seg).convert("RGB"))
    tags[0, 0, 0] = 20
    Image.fromarray(tags).save(seg)
    return box


def test_fedseg_vehicle_check_only_prints_the_supernode_command(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    box = _fleet_folder(tmp_path / "box", ["car"])

    vehicle_main(["--superlink", "127.0.0.1:9", "--insecure", "--data-root", str(box), "--tagset", "legacy13",
                  "--check-only"])
    ok = capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        vehicle_main(["--superlink", "127.0.0.1:9", "--insecure", "--data-root", str(tmp_path / "nowhere")])

    assert "fedseg-supernode --poll-interval 0.1 --superlink 127.0.0.1:9" in ok.out and "--insecure" in ok.out
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == (f"fedseg-vehicle: error: {tmp_path / 'nowhere'}: data root does not "
                                               "exist or is not a folder")


# ---- the Deployment Engine for real: SuperLink, 3 SuperNodes, flwr run, on loopback ----------------

@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory):
    """A SuperLink with TLS and node authentication; vehicles 0-2 registered, each with its own folder."""
    root = tmp_path_factory.mktemp("fleet")
    cache = root / "cache"
    settings = _smoke_settings(cache)
    # Vehicles 0-2 of the smoke fleet, rendered into the cache; each box gets a copy of its own.
    folders = [load_vehicle(settings, NodeSpec.from_node_config({"partition-id": i, "num-partitions": 3}))
               .dataset.frames[0].rgb.parents[1] for i in range(3)]
    make_credentials(root / "certs", vehicles=vehicle_names(4))
    fleet = LocalFleet(root, certs=root / "certs", env_extra={"FEDSEG_DATA_CACHE": str(cache),
                                                              "WANDB_MODE": "offline"})
    try:
        (root / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=root / "server")
        for i in range(3):
            fleet.register(root / "certs" / "vehicles" / f"vehicle_{i}.pub")
            shutil.copytree(folders[i], root / f"box_{i}" / "frames")
        yield fleet
    finally:
        fleet.stop()


def _rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _start_vehicle(fleet: LocalFleet, i: int) -> None:
    fleet.start_vehicle(f"vehicle_{i}", "--data-root", str(fleet.root / f"box_{i}" / "frames"),
                        "--partition-id", str(i))


def _wait_for_line(path_text, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path_text():
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.5)


@pytest.mark.deploy
def test_tls_fleet_waits_for_its_vehicles_runs_two_smoke_rounds_and_refuses_a_stranger(
        tls_fleet: LocalFleet) -> None:
    root = tls_fleet.root
    for i in range(2):
        _start_vehicle(tls_fleet, i)
    stranger = tls_fleet.start_vehicle("vehicle_3", "--data-root", str(root / "box_0" / "frames"))

    overrides = SMOKE + " deploy.join_timeout=120"
    run = tls_fleet.start_run(overrides)
    # The server says how many of its vehicles joined (the stranger's key is not registered: it never
    # counts) and waits; the third vehicle comes up late, and the run goes on with all three.
    _wait_for_line(lambda: tls_fleet.log(run.log_name), "fedseg: 2 of 3 vehicles joined; waiting up to", 120)
    _start_vehicle(tls_fleet, 2)
    result = tls_fleet.finish_run(run, timeout=420)

    assert result.status == "finished:completed", result.output[-3000:]
    out = root / "server" / "outputs" / "deploy" / str(result.run_id)  # deploy.output_dir, SuperLink's cwd
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(CONTRACT <= set(r) for r in rows)
    assert [r["clients"] for r in rows[1:]] == [3, 3] and rows[-1]["loss"] < rows[0]["loss"]
    for name in ("summary.json", "checkpoints/global.pt", ".hydra/config.yaml", "server.log", "plots/miou.png"):
        assert (out / name).exists(), name
    # The apps ran with what fedseg-sim composes for the same overrides (only output_dir differs).
    ran = tomllib.loads((out / "flwr_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    sim = to_run_config(compose_overrides(overrides.split()) | {"output_dir": str(Path("outputs/deploy") /
                                                                                    str(result.run_id))})
    assert ran == sim | {"data.root": ran["data.root"]}
    assert "round   2/2" in result.output and "fedseg: 3 of 3 vehicles joined" in result.output
    # The vehicle whose key was never registered is turned away and stops.
    assert stranger.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in tls_fleet.log("vehicle_3")
    assert "No SuperNode found with the given public key" in tls_fleet.log("superlink")


@pytest.mark.deploy
def test_a_vehicle_killed_mid_run_leaves_a_finished_run_never_a_hang(tls_fleet: LocalFleet) -> None:
    root = tls_fleet.root
    for i in range(3):  # all up (also when this test runs alone)
        if tls_fleet.procs.get(f"vehicle_{i}") is None or tls_fleet.procs[f"vehicle_{i}"].poll() is not None:
            _start_vehicle(tls_fleet, i)
    started = tls_fleet.log("vehicle_2").count("fedseg-clientapp: run ")
    # 30 local epochs: a vehicle's round takes seconds, not the fraction of one that a smoke round takes, so
    # the kill lands while vehicle_2 trains (once, its reply was in before the kill and the round had 3).
    run = tls_fleet.start_run("experiment=smoke federation.num_clients=3 federation.rounds=1 "
                              "federation.local_epochs=30 federation.min_fit_clients=2 federation.round_timeout=40 "
                              "deploy.join_timeout=5")
    deadline = time.monotonic() + 120
    while tls_fleet.log("vehicle_2").count("fedseg-clientapp: run ") == started:
        assert time.monotonic() < deadline and run.poll() is None, "vehicle_2 never got its round-1 message"
        time.sleep(0.1)

    tls_fleet.kill("vehicle_2")  # SIGKILL: the SuperNode and the ClientApp training for it, mid-round
    result = tls_fleet.finish_run(run, timeout=240)

    assert result.returncode != -1, "flwr run hung"
    if result.status == "finished:completed":
        out = root / "server" / "outputs" / "deploy" / str(result.run_id)
        last = _rows(out)[-1]
        assert last["round"] == 1 and last["clients"] == 2 and last["failures"] == 1
    else:  # a clear stop: one line saying why
        assert result.status == "finished:failed" and "fedseg: error: " in result.output, result.output[-3000:]
