"""fedseg-collect end to end against a CARLA test double, and the real client against a closed port."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from carla_double import FakeCarla, FakeServer
from PIL import Image

from fedseg.collect import CollectSpec, collect
from fedseg.config import DataSpec
from fedseg.data import load_data
from fedseg.errors import CollectError
from fedseg.labels import TAGSETS

H, W = 12, 40  # small frames; W > 29 so every tag id appears in every row


def spec_for(out: Path, **overrides: object) -> CollectSpec:
    settings: dict = {"out": str(out), "vehicles": 3, "frames": 4, "every": 3, "warmup_ticks": 2,
                      "image_size": (H, W), "towns": ("Town01", "Town02"), "weathers": ("ClearNoon",),
                      "sensor_timeout": 2.0, "progress": False}
    settings.update(overrides)
    return CollectSpec(**settings)  # type: ignore[arg-type]


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def frame_of(rgb: np.ndarray) -> int:
    """The server frame the double wrote into an RGB image (green/blue bytes)."""
    return int(rgb[0, 0, 1]) * 256 + int(rgb[0, 0, 2])


def assert_cleaned_up(server: FakeServer) -> None:
    assert server.spawned and not server.actors, "an actor the collector spawned is still alive"
    assert sorted(server.destroyed) == sorted(a.id for a in server.spawned)
    assert server.settings.synchronous_mode is False and server.settings.fixed_delta_seconds is None
    assert server.tm_sync is False


def test_collects_paired_raw_tag_frames_per_vehicle(tmp_path: Path) -> None:
    carla = FakeCarla()

    result = collect(spec_for(tmp_path / "fleet"), carla=carla)

    assert result.complete and result.frames == {"vehicle_0": 4, "vehicle_1": 4, "vehicle_2": 4}
    for name in result.frames:
        rgb_files = sorted((tmp_path / "fleet" / name / "CameraRGB").iterdir())
        seg_files = sorted((tmp_path / "fleet" / name / "CameraSeg").iterdir())
        assert [p.name for p in rgb_files] == [p.name for p in seg_files] == [f"{i:06d}.png" for i in range(4)]
        frames = []
        for rgb_path, seg_path in zip(rgb_files, seg_files, strict=True):
            rgb, seg = read(rgb_path), read(seg_path)
            frame = frame_of(rgb)  # the label must be of the same server frame as the image
            assert seg.shape == rgb.shape == (H, W, 3)
            np.testing.assert_array_equal(seg[..., 0], np.tile((np.arange(W) + frame) % 29, (H, 1)))
            frames.append(frame)
        assert np.diff(frames).tolist() == [3, 3, 3]  # every 3rd tick
    assert_cleaned_up(carla.server)


def test_towns_load_once_and_weather_is_per_episode(tmp_path: Path) -> None:
    carla = FakeCarla()

    collect(spec_for(tmp_path, vehicles=4, weathers=("ClearNoon", "WetNoon")), carla=carla)

    # vehicles 0..3 -> (Town01, ClearNoon), (Town02, WetNoon), (Town01, ClearNoon), (Town02, WetNoon)
    assert carla.server.loads == ["Town01", "Town02"]
    assert carla.server.weathers == ["ClearNoon", "WetNoon"]
    manifest = json.loads((tmp_path / "vehicle_1" / "manifest.json").read_text())
    assert (manifest["town"], manifest["weather"]) == ("Town02", "WetNoon")
    bikes = [a for a in carla.server.spawned if a.type_id == "vehicle.yamaha.yzf"]
    assert not bikes and all(a.autopilot == (True, 8000) for a in carla.server.spawned if a.parent is None)


def test_cameras_share_pose_size_and_fov(tmp_path: Path) -> None:
    carla = FakeCarla()

    collect(spec_for(tmp_path, vehicles=1, fov=70.0, camera_location=(1.0, 0.0, 2.0)), carla=carla)

    cameras = [a for a in carla.server.spawned if a.parent is not None]
    assert sorted(c.type_id for c in cameras) == ["sensor.camera.rgb", "sensor.camera.semantic_segmentation"]
    rgb, seg = cameras
    assert rgb.transform == seg.transform and rgb.transform.location.z == 2.0
    for key, value in (("image_size_x", str(W)), ("image_size_y", str(H)), ("fov", "70.0")):
        assert rgb.attributes[key] == seg.attributes[key] == value
    assert carla.server.applied[0].synchronous_mode and carla.server.applied[0].fixed_delta_seconds == 0.05


def test_manifests_record_versions_camera_and_counts(tmp_path: Path) -> None:
    collect(spec_for(tmp_path, vehicles=2, fov=90.0), carla=FakeCarla())

    vehicle = json.loads((tmp_path / "vehicle_0" / "manifest.json").read_text())
    fleet = json.loads((tmp_path / "manifest.json").read_text())
    assert vehicle["carla"]["server_version"] == vehicle["carla"]["client_version"] == "0.9.16"
    assert vehicle["tagset"] == "carla29" and vehicle["frames"] == 4 and vehicle["complete"]
    assert vehicle["tick_hz"] == pytest.approx(20.0) and vehicle["frame_period_s"] == pytest.approx(0.15)
    intrinsics = vehicle["camera"]["intrinsics"]  # fov 90: f = W / (2 tan 45deg) = W / 2
    assert intrinsics["fx"] == pytest.approx(W / 2) and (intrinsics["cx"], intrinsics["cy"]) == (W / 2, H / 2)
    assert vehicle["camera"]["extrinsics"]["location_m"] == {"x": 1.5, "y": 0.0, "z": 2.4}
    assert vehicle["sessions"][0]["frames_written"] == 4 and vehicle["blueprint"].startswith("vehicle.")
    assert fleet["frames_total"] == 8 and fleet["complete"] and len(fleet["vehicles"]) == 2


def test_drawn_towns_and_weathers_are_seeded_and_skip_opt_twins(tmp_path: Path) -> None:
    plans = []
    for run in ("a", "b"):
        collect(spec_for(tmp_path / run, vehicles=6, frames=1, towns=None, weathers=None), carla=FakeCarla())
        plans.append(json.loads((tmp_path / run / "manifest.json").read_text())["vehicles"])

    assert plans[0] == plans[1]
    towns = {v["town"] for v in plans[0]}
    assert len(towns) > 1 and not {"Town01_Opt", "Town10HD_Opt"} & towns
    assert len({v["weather"] for v in plans[0]}) > 1


def test_legacy_tagset_from_a_new_server_is_remapped(tmp_path: Path) -> None:
    collect(spec_for(tmp_path, vehicles=1, frames=1, tagset="legacy13"), carla=FakeCarla())

    rgb, seg = (read(next((tmp_path / "vehicle_0" / d).iterdir())) for d in ("CameraRGB", "CameraSeg"))
    carla29, legacy = TAGSETS["carla29"], TAGSETS["legacy13"]
    expected = [legacy.tag_id(carla29.names[(x + frame_of(rgb)) % 29]) for x in range(W)]
    assert seg[0, :, 0].tolist() == expected


def test_legacy_server_writes_its_own_tags_and_refuses_carla29(tmp_path: Path) -> None:
    server = FakeServer(version="0.9.13")
    collect(spec_for(tmp_path / "ok", vehicles=1, frames=1, tagset="legacy13"),
            carla=FakeCarla(server, client_version="0.9.13"))
    rgb, seg = (read(next((tmp_path / "ok" / "vehicle_0" / d).iterdir())) for d in ("CameraRGB", "CameraSeg"))
    assert seg[0, :, 0].tolist() == [(x + frame_of(rgb)) % 13 for x in range(W)]

    with pytest.raises(CollectError, match="tagset=carla29 needs a CARLA 0.9.14"):
        collect(spec_for(tmp_path / "no"), carla=FakeCarla(FakeServer(version="0.9.13"), client_version="0.9.13"))


@pytest.mark.parametrize(
    ("carla", "overrides", "message"),
    [
        (lambda: FakeCarla(client_version="0.9.15"), {}, "CARLA client 0.9.15 and server 0.9.16 at 127.0.0.1:2000 differ"),
        (FakeCarla, {"towns": ("Town07",)}, "town 'Town07' is not on the server at 127.0.0.1:2000; available: Town01,"),
        (FakeCarla, {"weathers": ("Sunny",)}, "unknown weather preset 'Sunny'; valid: ClearNoon,"),
    ],
)
def test_user_errors_are_one_line_and_spawn_nothing(tmp_path: Path, carla, overrides: dict, message: str) -> None:
    double = carla()

    with pytest.raises(CollectError) as err:
        collect(spec_for(tmp_path, **overrides), carla=double)

    assert message in str(err.value) and "\n" not in str(err.value)
    assert not double.server.spawned


@pytest.mark.parametrize("fault", ["interrupt", "silent_cameras"])
def test_every_actor_destroyed_and_settings_restored_on_failure(tmp_path: Path, fault: str) -> None:
    carla = FakeCarla()
    if fault == "interrupt":
        carla.server.interrupt_after_ticks = 7
    else:
        carla.server.silent_after_ticks = 7

    with pytest.raises(KeyboardInterrupt if fault == "interrupt" else CollectError):
        collect(spec_for(tmp_path, sensor_timeout=0.3), carla=carla)

    assert_cleaned_up(carla.server)
    fleet = json.loads((tmp_path / "manifest.json").read_text())
    assert not fleet["complete"] and fleet["frames_total"] == 2 * 2  # ticks 3, 6 of the Town01 episode


def test_a_refused_spawn_is_one_line_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import carla_double

    def refuse(world: object, blueprint: object, transform: object, attach_to: object = None) -> None:
        raise RuntimeError("Spawn failed because of collision at spawn position")

    monkeypatch.setattr(carla_double.World, "spawn_actor", refuse)
    carla = FakeCarla()

    with pytest.raises(CollectError, match="failed while collecting in Town01: Spawn failed because of collision"):
        collect(spec_for(tmp_path), carla=carla)

    assert_cleaned_up(carla.server)  # the vehicle spawned before the camera failed is gone too


def test_ctrl_c_between_a_pairs_renames_leaves_no_unpaired_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseg.collect import store

    renames, real_replace = [], os.replace

    def replace(src: str, dst: str) -> None:
        if str(dst).endswith(".png"):
            renames.append(dst)
            if len(renames) == 6:  # label, image per frame: the 6th is frame 2's image
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    carla = FakeCarla()
    with pytest.raises(KeyboardInterrupt):
        collect(spec_for(tmp_path, vehicles=1), carla=carla)

    rgb = sorted(p.name for p in (tmp_path / "vehicle_0" / "CameraRGB").iterdir())
    seg = sorted(p.name for p in (tmp_path / "vehicle_0" / "CameraSeg").iterdir())
    assert rgb == seg == ["000000.png", "000001.png"]
    assert_cleaned_up(carla.server)


def test_lost_server_then_same_command_continues(tmp_path: Path) -> None:
    server = FakeServer()
    server.fail_after_ticks = 8
    spec = spec_for(tmp_path)

    started = time.monotonic()
    with pytest.raises(CollectError, match="lost the CARLA server at 127.0.0.1:2000 .*run the same command"):
        collect(spec, carla=FakeCarla(server))
    assert time.monotonic() - started < 5  # no cleanup RPC waits on a dead server
    (tmp_path / "vehicle_0" / "CameraSeg" / "000002.png").write_bytes(b"half")  # a pair cut short
    (tmp_path / "vehicle_0" / "CameraRGB" / ".000003.png.tmp").write_bytes(b"partial")

    server.restart()
    result = collect(spec, carla=FakeCarla(server))

    assert result.complete and result.frames == {"vehicle_0": 4, "vehicle_1": 4, "vehicle_2": 4}
    names = sorted(p.name for p in (tmp_path / "vehicle_0" / "CameraRGB").iterdir())
    assert names == [f"{i:06d}.png" for i in range(4)]
    sessions = json.loads((tmp_path / "vehicle_0" / "manifest.json").read_text())["sessions"]
    assert [s["frames_written"] for s in sessions] == [2, 2]
    assert_cleaned_up(server)


def test_continuing_with_other_settings_is_refused(tmp_path: Path) -> None:
    collect(spec_for(tmp_path, frames=1), carla=FakeCarla())

    with pytest.raises(CollectError, match=r"other settings: every=3 \(now 5\)"):
        collect(spec_for(tmp_path, frames=1, every=5), carla=FakeCarla())
    more = collect(spec_for(tmp_path, frames=2), carla=FakeCarla())  # a larger target continues
    assert more.frames["vehicle_0"] == 2


def test_fedseg_imports_without_the_carla_package() -> None:
    code = "import sys, fedseg.collect, fedseg.sim.collect; print('carla' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert proc.stdout.strip() == "False"


def test_missing_carla_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "carla", None)  # import carla -> ImportError

    with pytest.raises(CollectError, match=r"pip install -e '\.\[carla\]'"):
        collect(spec_for(tmp_path))


def test_collected_fleet_loads_with_the_carla_loader(tmp_path: Path) -> None:
    collect(spec_for(tmp_path / "fleet", vehicles=2, frames=5), carla=FakeCarla())
    spec = DataSpec(name="carla", root=str(tmp_path / "fleet"), tagset="carla29", image_size=(8, 16),
                    frames_per_vehicle=None, heldout_frames=None)

    data = load_data(spec, num_clients=2, seed=0, progress=False)

    assert [len(c) for c in data.clients] == [4, 4] and len(data.heldout) == 2  # last 10% of each, >= 1
    image, mask = data.clients[0][0]
    assert image.shape == (3, 8, 16) and mask.shape == (8, 16)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(name: str, *args: str, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSEG_DATA_CACHE": str(tmp / "cache"), "WANDB_MODE": "offline"}
    return subprocess.run([str(Path(sys.executable).with_name(name)), *args], check=False,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.e2e
def test_no_server_is_one_line_naming_the_address_with_the_real_client(tmp_path: Path) -> None:
    pytest.importorskip("carla", reason="no carla client wheel for this platform/Python (the carla extra)")
    port = closed_port()

    started = time.monotonic()
    proc = cli("fedseg-collect", "host=127.0.0.1", f"port={port}", f"out={tmp_path / 'out'}", tmp=tmp_path, timeout=60)
    seconds = time.monotonic() - started

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and seconds < 30, (seconds, proc.stderr)
    assert lines == [(f"fedseg-collect: error: no CARLA server answered at 127.0.0.1:{port} within 10s "
                      f"(start one with ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}, or set host= and port=)")]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_collected_fleet_trains_a_smoke_run(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    collect(spec_for(root, vehicles=2, frames=6, image_size=(32, 48)), carla=FakeCarla())

    proc = cli("fedseg-train", "experiment=smoke", "data=carla", f"data.root={root}", "data.tagset=carla29",
               "federation.num_clients=2", "federation.min_fit_clients=2", "run.progress=false", f"hydra.run.dir={tmp_path / 'run'}", tmp=tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[1]["examples"] == 10


def run_entry_point(monkeypatch: pytest.MonkeyPatch, collector: object, *overrides: str) -> int:
    """``fedseg-collect OVERRIDES`` in-process with ``collector`` in place of ``collect``; exit status."""
    import fedseg.sim.collect

    monkeypatch.setattr(fedseg.sim.collect, "collect", collector)
    monkeypatch.setattr(sys, "argv", ["fedseg-collect", *overrides])
    try:
        fedseg.sim.collect.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_entry_point_reads_conf_collect_into_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet"

    code = run_entry_point(monkeypatch, lambda spec: collect(spec, carla=FakeCarla()), f"out={out}",
                           "vehicles=2", "frames=2", "image_size=[8,32]", "towns=[Town02]", "progress=false")

    assert code == 0
    assert "2 vehicles, 4 frames" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["every"] == 10 and manifest["camera"]["fov_deg"] == 90.0  # yaml defaults
    assert (out / ".hydra" / "config.yaml").exists()  # beside the vehicles; the loader skips it
    spec = DataSpec(name="carla", root=str(out), tagset="carla29", image_size=(8, 32))
    assert len(load_data(spec, num_clients=2, seed=0, progress=False).heldout) == 2


def test_entry_point_ctrl_c_is_one_line_and_status_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(spec: CollectSpec) -> None:
        raise KeyboardInterrupt

    code = run_entry_point(monkeypatch, interrupted, f"out={tmp_path}")

    assert code == 130
    assert capsys.readouterr().err.splitlines() == [
        f"fedseg-collect: interrupted; only complete frame pairs are in {tmp_path}: run the same command to continue"]
