"""A real Flower Deployment Engine on loopback for tests and measurements: one ``flower-superlink``,
``flower-supernode`` per vehicle, ``flwr run``; free ports picked at run time, and every process it
started (and their children: SuperExec, ServerApp, ClientApps) killed on :meth:`LocalFleet.stop`.

Processes are found for cleanup by a tag in their environment (``fedseg.deploy.processes``; each
child inherits it), so even a SuperExec that Flower detaches into its own session, or a ClientApp
orphaned by a killed SuperNode, is stopped, and nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.deploy.processes import (
    TAG,
    free_port,
    new_tag,
    proc_stat,
    stop_tagged,
    tagged_pids,
    wait_for_port,
    with_this_environment_on_path,
)

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class RunResult:
    """What ``flwr run --stream`` printed, the run's id and its final status (``flwr ls``)."""

    run_id: int | None
    output: str
    status: str
    returncode: int


@dataclass
class LocalFleet:
    """A SuperLink on a free loopback port, in TLS with node authentication when ``certs`` is given."""

    root: Path
    certs: Path | None = None  # fedseg-certs output: TLS and --enable-supernode-auth
    env_extra: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=new_tag)
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    fleet_port: int = 0  # the fleet proxy's port (start_proxy): vehicles connect there when it is set

    def __post_init__(self) -> None:
        self.home = self.root / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        # The SuperLink starts flower-superexec by name: this environment's bin first, as fedseg-sim does,
        # so the suite also runs as `.venv/bin/python -m pytest` without activating the venv.
        # Vehicles keep their privacy ledgers in the fleet's folder, never in the real home's state folder.
        self.env = with_this_environment_on_path({**os.environ, "XDG_STATE_HOME": str(self.root / "state"),
                                                  **self.env_extra, TAG: self.tag,
                                                  "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                                                  "PYTHONUNBUFFERED": "1"})

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        (self.root / "logs").mkdir(exist_ok=True)
        with (self.root / "logs" / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    cwd=cwd or self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self, *extra: str, cwd: Path | None = None) -> None:
        """``flower-superlink`` (runtime dependency installation off unless ``extra`` says otherwise)."""
        self.port = free_port()
        cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port), *extra]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile",
                    str(self.certs / "superlink.crt"), "--ssl-keyfile", str(self.certs / "superlink.key"),
                    "--enable-supernode-auth"]
        proc = self._spawn("superlink", cmd, cwd)
        wait_for_port(self.port, 60, proc)
        connection = f'address = "127.0.0.1:{self.port}"\n' + (
            "insecure = true\n" if self.certs is None else f'root-certificates = "{self.certs / "ca.crt"}"\n')
        (self.home / "config.toml").write_text(f"[superlink]\ndefault = \"fleet\"\n\n[superlink.fleet]\n{connection}")

    def start_proxy(self, caddyfile: Path = PROJECT / "scripts" / "deploy" / "Caddyfile") -> None:
        """Caddy with ``caddyfile`` on a free loopback port in front of this TLS SuperLink, configured as
        ``fedseg-fleet-proxy.service`` configures it; vehicles started later connect through it, and the
        ``flwr`` connection ``outside`` points at it (what someone on the fleet's network reaches)."""
        assert self.certs is not None and self.port, "start_superlink with certs first"
        self.fleet_port = free_port()
        caddy_home = self.root / "caddy"
        env = {"FEDSEG_FLEET_BIND": "127.0.0.1", "FEDSEG_FLEET_PORT": str(self.fleet_port),
               "FEDSEG_SUPERLINK": f"127.0.0.1:{self.port}", "FEDSEG_TLS_CERT": str(self.certs / "superlink.crt"),
               "FEDSEG_TLS_KEY": str(self.certs / "superlink.key"), "FEDSEG_CA": str(self.certs / "ca.crt"),
               "XDG_DATA_HOME": str(caddy_home), "XDG_CONFIG_HOME": str(caddy_home)}
        proc = self._spawn("proxy", [str(BIN / "caddy"), "run", "--adapter", "caddyfile", "--config",
                                     str(caddyfile)], env=env)
        wait_for_port(self.fleet_port, 30, proc)
        with (self.home / "config.toml").open("a") as config:
            config.write(f'\n[superlink.outside]\naddress = "127.0.0.1:{self.fleet_port}"\n'
                         f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this SuperLink (connection ``fleet``)."""
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=timeout, check=False)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: the node id the SuperLink gave this key."""
        proc = self.flwr("supernode", "register", str(public_key), "fleet", "--format", "json")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return int(json.loads(proc.stdout)["node-id"])

    def unregister(self, node_id: int) -> None:
        """``flwr supernode unregister``: revoke the node (its key can never be registered again)."""
        proc = self.flwr("supernode", "unregister", str(node_id), "fleet")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr supernode unregister failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")

    def nodes(self) -> dict[int, str]:
        """Every node the SuperLink knows, unregistered ones too: node id -> status (``flwr supernode ls``)."""
        proc = self.flwr("supernode", "ls", "fleet", "--format", "json", "--verbose")
        return {int(n["node-id"]): n["status"] for n in json.loads(proc.stdout)["nodes"]}

    def start_vehicle(self, name: str, *args: str, key: Path | None = None) -> subprocess.Popen:
        """``fedseg-vehicle ARGS`` (checks, then becomes ``flower-supernode``) on a free local port, with
        ``key`` (default: ``certs/vehicles/<name>.key``) under TLS."""
        cmd = [str(BIN / "fedseg-vehicle"), "--superlink", f"127.0.0.1:{self.fleet_port or self.port}",
               "--port", str(free_port()),
               *args]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.certs / "ca.crt"),
                    "--key", str(key or self.certs / "vehicles" / f"{name}.key")]
        return self._spawn(name, cmd)

    def start_run(self, overrides: str, *, app: Path = PROJECT) -> subprocess.Popen:
        """``flwr run APP fleet --stream`` with these Hydra overrides, in the background."""
        name = f"run-{len(self.procs)}"
        (self.root / "logs").mkdir(exist_ok=True)
        out = (self.root / "logs" / f"{name}.log").open("w+")
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "fleet", "--stream", "--run-config",
                                 f"overrides='{overrides}'"], stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=self.env, cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        proc.output_file, proc.log_name = out, name  # type: ignore[attr-defined]
        return proc

    def finish_run(self, proc: subprocess.Popen, *, timeout: float) -> RunResult:
        """Wait for a started run (killing ``flwr`` after ``timeout`` s); its id, output and status."""
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -1
        out = proc.output_file  # type: ignore[attr-defined]
        out.seek(0)
        output = out.read() + ("" if code != -1 else f"\nTIMEOUT after {timeout} s")
        out.close()
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        return RunResult(run_id, output, self.status(run_id) if run_id else "not started", code)

    def run(self, overrides: str, *, timeout: float, app: Path = PROJECT) -> RunResult:
        """``flwr run APP fleet --stream`` with these Hydra overrides; then the run's status."""
        return self.finish_run(self.start_run(overrides, app=app), timeout=timeout)

    def status(self, run_id: int) -> str:
        proc = self.flwr("ls", "fleet", "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(proc.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({proc.stdout[-500:]} {proc.stderr[-500:]})"

    def kill(self, name: str) -> None:
        """Kill one vehicle at once (its SuperNode and the ClientApps it started), as a power cut would."""
        proc = self.procs[name]
        children = [pid for pid in tagged_pids(self.tag) if _ancestor(pid, proc.pid)]
        for pid in [proc.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)

    def stop(self) -> None:
        stop_tagged(self.tag)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _ancestor(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is a parent (at any depth) of ``pid``."""
    for _ in range(32):
        pid = proc_stat(pid).parent  # 0 once gone
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
