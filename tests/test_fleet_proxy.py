"""The control plane off the fleet's network: the SuperLink on loopback behind Caddy, which forwards only
Flower's Fleet API (``scripts/deploy/Caddyfile``), and the sandboxed systemd units.

Without marker: the shipped Caddyfile as Caddy itself parses it, and the units' options (and
``systemd-analyze`` where this machine has it). Marker ``deploy``: a real TLS SuperLink with node
authentication on loopback, Caddy in front of it, vehicles connecting through Caddy, ``flwr run`` from
the operator's side; what someone on the fleet's network tries instead is refused.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from deploy_fleet import BIN, PROJECT, LocalFleet, _ancestor

from fedseg.deploy.certs import make_credentials, vehicle_names
from fedseg.deploy.processes import tagged_pids

DEPLOY = PROJECT / "scripts" / "deploy"
CADDYFILE = DEPLOY / "Caddyfile"
REFUSED = b"fedseg fleet proxy: only the Fleet API is served here"
SANDBOX = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
           "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectKernelTunables": "yes",
           "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
           "RestrictSUIDSGID": "yes", "RestrictNamespaces": "yes", "SystemCallArchitectures": "native"}


# ---- systemd units ----------------------------------------------------------------------------------

def unit_options(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (systemd allows repeats), continuation lines joined."""
    options: dict[str, list[str]] = {}
    section, text = "", re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        options.setdefault(f"{section}.{key}", []).append(value)
    return options


@pytest.mark.parametrize("name", ["fedseg-superlink.service", "fedseg-vehicle@.service",
                                  "fedseg-vehicle-apps@.service", "fedseg-fleet-proxy.service"])
def test_every_unit_is_sandboxed(name: str) -> None:
    service = {k.removeprefix("Service."): v for k, v in unit_options(DEPLOY / name).items()
               if k.startswith("Service.")}
    for key, value in SANDBOX.items():
        assert service.get(key) == [value], f"{name}: {key}={service.get(key)}, want {value!r}"
    assert "@system-service" in service["SystemCallFilter"], name
    assert set(" ".join(service["RestrictAddressFamilies"]).split()) <= {"AF_UNIX", "AF_INET", "AF_INET6",
                                                                         "AF_NETLINK"}, name
    assert re.fullmatch(r"\d+[KMG]", service["MemoryMax"][0]), name
    # Writable: the state folder only (ProtectSystem=strict makes everything else read-only).
    if name == "fedseg-fleet-proxy.service":
        assert service["DynamicUser"] == ["yes"] and service["StateDirectory"] == ["fedseg-proxy"]
        assert "ReadWritePaths" not in service
    else:
        assert service["ReadWritePaths"] == ["/var/lib/fedseg"] and service["StateDirectory"] == ["fedseg"]
        assert service["WorkingDirectory"] == ["/var/lib/fedseg"] and service["User"] == ["fedseg"]


def test_the_superlink_listens_on_loopback_and_the_proxy_forwards_to_it() -> None:
    superlink = unit_options(DEPLOY / "fedseg-superlink.service")
    command = superlink["Service.ExecStart"][0].split()
    host, port = command[command.index("--host") + 1], command[command.index("--port") + 1]
    assert host == "127.0.0.1" and "0.0.0.0" not in superlink["Service.ExecStart"][0]
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert "FLWR_INTERNAL_GRPC_CONTROL_API" in superlink["Service.UnsetEnvironment"][0]
    proxy = unit_options(DEPLOY / "fedseg-fleet-proxy.service")
    env = dict(item.split("=", 1) for line in proxy["Service.Environment"] for item in line.split())
    assert env["FEDSEG_SUPERLINK"] == f"127.0.0.1:{port}" and env["FEDSEG_FLEET_PORT"] == "9092"
    assert proxy["Service.ExecStart"][0].endswith("caddy run --adapter caddyfile --config /etc/fedseg/Caddyfile")
    # The vehicle unit's StartLimit* only work in [Unit]: in [Service] systemd ignores them.
    vehicle = unit_options(DEPLOY / "fedseg-vehicle@.service")
    assert vehicle["Unit.StartLimitBurst"] == ["5"] and "Service.StartLimitIntervalSec" not in vehicle


def test_the_apps_a_vehicle_runs_cannot_see_its_key() -> None:
    # The SuperNode (which holds the key) starts no SuperExec; the apps unit runs it with /etc/fedseg,
    # where the key is, hidden, and connects to the SuperNode's Runtime API on the box.
    vehicle = unit_options(DEPLOY / "fedseg-vehicle@.service")
    apps = unit_options(DEPLOY / "fedseg-vehicle-apps@.service")
    supernode, superexec = vehicle["Service.ExecStart"][0].split(), apps["Service.ExecStart"][0].split()
    key = supernode[supernode.index("--key") + 1]

    assert "--external-superexec" in supernode and "fedseg-vehicle-apps@%i.service" in vehicle["Unit.Wants"][0]
    assert superexec[0].endswith("/fedseg-superexec") and apps["Unit.PartOf"] == ["fedseg-vehicle@%i.service"]
    assert superexec[superexec.index("--runtime-api-address") + 1] == "127.0.0.1:9094"  # fedseg-vehicle's --port
    hidden = apps["Service.InaccessiblePaths"]
    assert any(key.startswith(path.rstrip("/") + "/") for path in hidden), (key, hidden)


def _runnable_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart's /opt/fedseg venv replaced by this one (verify checks the binary exists)."""
    copies = []
    for unit in sorted(DEPLOY.glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/fedseg/.venv/bin/", f"{BIN}/"))
        copies.append(copy)
    return copies


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze on this machine")
def test_systemd_analyze_accepts_the_units_and_rates_them_ok(tmp_path: Path) -> None:
    for unit in _runnable_copies(tmp_path):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                                cwd=tmp_path, check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                                  capture_output=True, text=True, cwd=tmp_path, check=False)
        if "--offline" in security.stderr:  # systemd older than 250 rates running services only
            continue
        match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", security.stdout)
        assert match, security.stdout[-500:] + security.stderr[-500:]
        # systemd's scale: 0-10, "OK" below 3 (the units before sandboxing were 9.2, "UNSAFE").
        assert float(match.group(1)) < 3.0 and match.group(2) == "OK", (unit.name, match.group(0))


# ---- the Caddyfile, as Caddy reads it -------------------------------------------------------------

def _caddy_env(certs: Path, home: Path) -> dict[str, str]:
    return {"PATH": str(BIN), "HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home),
            "FEDSEG_TLS_CERT": str(certs / "superlink.crt"), "FEDSEG_TLS_KEY": str(certs / "superlink.key"),
            "FEDSEG_CA": str(certs / "ca.crt")}


def test_the_caddyfile_forwards_only_fleet_posts_with_a_body_cap(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_credentials(certs, vehicles=[])
    env = _caddy_env(certs, tmp_path)
    valid = subprocess.run([str(BIN / "caddy"), "validate", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
                           capture_output=True, text=True, env=env, check=False)
    assert valid.returncode == 0, valid.stderr[-2000:]
    adapted = subprocess.run([str(BIN / "caddy"), "adapt", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
                             capture_output=True, text=True, env=env, check=True)
    config = json.loads(adapted.stdout)
    assert config["admin"]["disabled"] is True  # no admin API on localhost:2019 to rewrite the rules
    (server,) = config["apps"]["http"]["servers"].values()
    assert server["listen"] == ["0.0.0.0:9092"]
    forwarding = [route for route in server["routes"] if "reverse_proxy" in json.dumps(route)]
    (route,) = forwarding
    assert route["match"] == [{"method": ["POST"], "path_regexp": {"name": "fleet",
                                                                   "pattern": "^/v1/fleet/[a-z-]+$"}}]
    (handlers,) = [r["handle"] for r in route["handle"][0]["routes"]]
    assert handlers[0] == {"handler": "request_body", "max_size": 128_000_000}
    assert handlers[1]["upstreams"] == [{"dial": "127.0.0.1:9093"}] and "tls" in handlers[1]["transport"]
    (rest,) = [r for r in server["routes"] if "match" not in r]
    assert rest["handle"][0]["routes"][0]["handle"][0]["status_code"] == 403


# ---- for real: SuperLink on loopback, Caddy in front, vehicles through it ----------------------------

@pytest.fixture(scope="module")
def proxied_fleet(tmp_path_factory: pytest.TempPathFactory):
    """A TLS SuperLink with node authentication on loopback behind Caddy; vehicles 0-1 registered from
    the operator's side (loopback), vehicle_2's key made but never registered."""
    root = tmp_path_factory.mktemp("proxied")
    make_credentials(root / "certs", vehicles=vehicle_names(3))
    fleet = LocalFleet(root, certs=root / "certs", env_extra={"FEDSEG_DATA_CACHE": str(root / "cache"),
                                                              "WANDB_MODE": "offline"})
    try:
        (root / "server").mkdir()
        fleet.start_superlink("--disable-runtime-dependency-installation", cwd=root / "server")
        fleet.start_proxy()
        for i in range(2):
            fleet.register(root / "certs" / "vehicles" / f"vehicle_{i}.pub")
        yield fleet
    finally:
        fleet.stop()


def _post(port: int, ca: Path, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One raw HTTPS POST to 127.0.0.1:port, the path sent exactly as given (no client-side cleaning)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=ca),
                                             timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/protobuf"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _node_count(fleet: LocalFleet) -> int:
    listing = fleet.flwr("supernode", "list", "fleet", "--format", "json")
    return len(json.loads(listing.stdout)["nodes"])


@pytest.mark.deploy
def test_the_fleet_address_refuses_the_control_plane(proxied_fleet: LocalFleet) -> None:
    fleet, ca = proxied_fleet, proxied_fleet.certs / "ca.crt"  # type: ignore[operator]
    nodes = _node_count(fleet)
    # What flwr does, from the fleet's network: start a run (code on every vehicle), register a key.
    run = fleet.flwr("run", str(PROJECT), "outside", "--run-config", "overrides='experiment=smoke'", timeout=120)
    register = fleet.flwr("supernode", "register", str(fleet.root / "certs" / "vehicles" / "vehicle_2.pub"),
                          "outside")
    listing = fleet.flwr("ls", "outside")
    for refused in (run, register, listing):
        assert refused.returncode != 0, refused.stdout[-1500:] + refused.stderr[-1500:]
    assert "Successfully started run" not in run.stdout
    assert json.loads(fleet.flwr("ls", "fleet", "--format", "json").stdout)["runs"] == []
    assert _node_count(fleet) == nodes
    # By hand: the other APIs and the usual ways around a path rule get Caddy's 403, never the SuperLink.
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/health",
                 "/docs", "/openapi.json", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                 "//v1/control/list-runs", "/v1/fleet/get-run/", "/V1/FLEET/get-run"):
        assert _post(fleet.fleet_port, ca, path) == (403, REFUSED), path
    # The same call on loopback reaches the SuperLink: the boundary is the proxy, not Flower.
    assert _post(fleet.port, ca, "/v1/control/list-runs")[0] == 200
    # Body cap: a whole UNet-ResNet34 float32 update (97.6 MB) reaches the SuperLink (which finds it is
    # no protobuf message: 400); one byte over 128 MB is turned away by Caddy (413).
    assert _post(fleet.fleet_port, ca, "/v1/fleet/push-object", bytes(97_600_000))[0] == 400
    assert _post(fleet.fleet_port, ca, "/v1/fleet/push-object", bytes(128_000_001))[0] == 413


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on (from /proc: Linux)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = fd.readlink().as_posix() if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.add((_ip(address), int(port, 16)))
    return found


def _ip(hex_address: str) -> str:
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "::1" if hex_address == "0" * 24 + "01000000" else f"ipv6:{hex_address}"


@pytest.mark.deploy
def test_vehicles_train_through_the_proxy_with_node_authentication(proxied_fleet: LocalFleet) -> None:
    fleet = proxied_fleet
    for i in range(2):
        fleet.start_vehicle(f"vehicle_{i}", "--partition-id", str(i), "--num-partitions", "2")
    stranger = fleet.start_vehicle("vehicle_2", "--partition-id", "0", "--num-partitions", "2")
    run = fleet.start_run("experiment=smoke federation.num_clients=2 federation.min_fit_clients=2 federation.rounds=1 "
                          "deploy.join_timeout=120")
    log_name, deadline = run.log_name, time.monotonic() + 180  # type: ignore[attr-defined]
    while "fedseg: 2 of 2 vehicles joined" not in fleet.log(log_name):
        assert time.monotonic() < deadline and run.poll() is None, fleet.log(log_name)[-3000:]
        time.sleep(0.5)
    # Mid-run, the SuperLink and everything it started (SuperExec, ServerApp) listen on its loopback
    # port only; Caddy on the fleet port only.
    superlink = fleet.procs["superlink"].pid
    server_side = [pid for pid in tagged_pids(fleet.tag) if pid == superlink or _ancestor(pid, superlink)]
    assert len(server_side) >= 3, "SuperLink, SuperExec and ServerApp should all be running"
    assert _listening(server_side) == {("127.0.0.1", fleet.port)}
    assert _listening([fleet.procs["proxy"].pid]) == {("127.0.0.1", fleet.fleet_port)}

    result = fleet.finish_run(run, timeout=420)
    assert result.status == "finished:completed", result.output[-3000:]
    rows = (fleet.root / "server" / "outputs" / "deploy" / str(result.run_id) / "metrics.jsonl").read_text()
    assert [json.loads(r)["clients"] for r in rows.splitlines()][1:] == [2]
    # Node authentication held through the proxy: the unregistered key was refused by the SuperLink.
    assert stranger.wait(timeout=60) != 0
    assert "No SuperNode found with the given public key" in fleet.log("superlink")
    # The vehicles' Fleet calls went through Caddy (its access log names each vehicle's key), all within
    # the body cap; the log keeps no signature (one would be replayable for 5 minutes).
    requests = [entry for entry in (json.loads(line) for line in fleet.log("proxy").splitlines()
                                    if line.startswith("{") and '"http.log.access' in line)
                if "Flwr-Public-Key" in entry["request"]["headers"]]
    paths = {entry["request"]["uri"] for entry in requests}
    assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-messages"} <= paths
    assert max(entry["bytes_read"] for entry in requests) < 128_000_000
    assert "flwr-signature" not in fleet.log("proxy").lower()
