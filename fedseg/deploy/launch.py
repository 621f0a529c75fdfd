"""A vehicle's launch: check its data and credentials, then the ``flower-supernode`` command that runs it.

Everything that can be wrong on the box is found here, before the SuperNode connects, with one line
naming the file: a data folder ``data=carla`` would refuse (same checks, :mod:`fedseg.data.carla`), a
key that is not an OpenSSH EC private key (what ``fedseg-vehicle keygen`` writes), a CA file that holds no
certificate, a node config that the ClientApp would refuse (:class:`~fedseg.deploy.vehicle.NodeSpec`), or
``--insecure`` (no TLS) towards a SuperLink that is not on this machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.supercore.address import parse_address

from fedseg.data.carla import validate
from fedseg.deploy.approval import AppPolicy
from fedseg.deploy.ledger import PrivacyLedger, default_ledger_path
from fedseg.deploy.vehicle import NodeSpec, own_frames


@dataclass(frozen=True)
class VehicleLaunch:
    """What ``fedseg-vehicle`` was asked to start."""

    superlink: str  # host:port of the SuperLink's Fleet API
    data_root: Path | None = None
    vehicle: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    hardware: str | None = None
    threads: int | None = None
    key: Path | None = None  # the vehicle's private key (node authentication)
    root_certificates: Path | None = None  # the fleet CA (TLS); None with insecure
    insecure: bool = False
    port: int = 9094  # the SuperNode's local port for its ClientApp processes
    tagset: str = "carla29"  # tag set the data folder's labels are checked against
    allow_apps: tuple[str, ...] = ()  # approved app bundle hashes (fedseg.deploy.approval); none: installed fedseg
    allow_app_files: tuple[Path, ...] = ()  # files of approved hashes, one a line
    external_superexec: bool = False  # the owner runs fedseg-superexec (as another user) instead
    # The vehicle's own privacy floor and lifetime ledger (fedseg.deploy.floor), which no run can lower
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_epsilon_per_run: float | None = None
    lifetime_epsilon: float | None = None
    ledger: Path | None = None  # None: default_ledger_path(this vehicle's name)
    # The vehicle's processes (docs/ARCHITECTURE.md "The vehicle's processes")
    poll_interval: float = 0.1  # fedseg-supernode's asks for a message during a round (Flower: 3 s)
    worker: bool = True  # a long-lived worker runs the installed fedseg's tasks (else a process per message)

    def node_config(self) -> dict[str, str | int | float]:
        """The ``--node-config`` entries (Flower's keys: dashes), checked as the ClientApp will check them."""
        entries: dict[str, str | int | float | None] = {
            "data-root": str(self.data_root.expanduser().resolve()) if self.data_root else None,
            "vehicle": self.vehicle, "partition-id": self.partition_id, "num-partitions": self.num_partitions,
            "hardware": self.hardware, "threads": self.threads}
        entries |= self.privacy_entries()
        config = {k: v for k, v in entries.items() if v is not None}
        NodeSpec.from_node_config(config)
        return config

    def privacy_entries(self) -> dict[str, str | float | None]:
        """The floor's node config keys, and always a ``ledger``: that marks a deployed vehicle, whose DP-SGD
        noise comes from the OS's entropy (fedseg.deploy.vehicle.NodeSpec.owns_privacy)."""
        name = (self.key.stem if self.key else self.vehicle
                or (f"partition-{self.partition_id}" if self.partition_id is not None else "vehicle"))
        ledger = self.ledger if self.ledger is not None else default_ledger_path(name)
        return {"ledger": str(ledger.expanduser().resolve()), "require-dp": True if self.require_dp else None,
                "min-noise-multiplier": self.min_noise_multiplier, "max-epsilon-per-run": self.max_epsilon_per_run,
                "lifetime-epsilon": self.lifetime_epsilon}


def _node_config_text(config: dict[str, str | int | float]) -> str:
    """``key=value`` pairs as Flower parses them (TOML values: strings in double quotes)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def check_key(path: Path) -> str:
    """The key's curve name; ``ValueError`` if it is not an OpenSSH EC private key Flower can load."""
    if not path.is_file():
        raise ValueError(f"{path}: no such key file (fedseg-vehicle keygen writes <name>.key)")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: {type(key).__name__} key; Flower's node authentication needs an EC key")  # noqa: TRY004
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: readable by other users; chmod 600 {path}")
    return key.curve.name


def check_ca(path: Path) -> int:
    """How many certificates ``path`` holds; ``ValueError`` if none can be read."""
    if not path.is_file():
        raise ValueError(f"{path}: no such CA certificate file (fedseg-certs writes ca.crt)")
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: not a PEM certificate ({err})") from None
    return len(certs)


def is_loopback(superlink: str) -> bool:
    """Whether ``HOST:PORT`` (parsed as Flower parses it) names this machine: 127.0.0.0/8, ::1 or localhost."""
    parsed = parse_address(superlink)
    if parsed is None:
        return False
    host = parsed[0]
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name could resolve anywhere
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def check_ledger(path: Path) -> str:
    """What the vehicle's privacy ledger holds; ``ValueError`` if it is unreadable or its folder unwritable."""
    try:
        rounds = len(PrivacyLedger(path).records())
    except OSError as err:
        raise ValueError(f"{path}: the privacy ledger cannot be read ({err.strerror}); pass --ledger FILE") from None
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # created on the first round
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{folder}: not writable; the privacy ledger {path} needs it (or pass --ledger FILE)")
    return f"privacy ledger {path} ({rounds} rounds recorded)"


def check_vehicle(launch: VehicleLaunch) -> str:
    """Check data, credentials and node config; return one line saying what will run."""
    config = launch.node_config()
    if launch.data_root is None and launch.partition_id is None:
        raise ValueError("name this vehicle's data: --data-root DIR (its own frames) or "
                         "--partition-id I --num-partitions N (its share of the run's data)")
    if launch.insecure == (launch.root_certificates is not None):
        raise ValueError("choose one: --root-certificates CA.crt (TLS) or --insecure (no TLS, tests only)")
    if launch.insecure and not is_loopback(launch.superlink):
        raise ValueError(f"--insecure (no TLS) is for a SuperLink on this machine only (127.0.0.0/8, ::1, "
                         f"localhost), not {launch.superlink}; use --root-certificates CA.crt")
    parts = [f"SuperLink {launch.superlink} ({'insecure' if launch.insecure else 'TLS'})"]
    if launch.root_certificates is not None:
        check_ca(launch.root_certificates)
    if launch.key is not None:
        parts.append(f"key {launch.key.name} ({check_key(launch.key)})")
    if launch.data_root is not None:
        frames = own_frames(launch.data_root.expanduser(), launch.vehicle)
        validate(frames, launch.tagset)
        parts.append(f"{len(frames)} frames checked in {launch.data_root}")
    else:
        parts.append(f"partition {launch.partition_id} of {launch.num_partitions}")
    parts.append(check_ledger(Path(str(config["ledger"]))))
    if launch.external_superexec:
        parts.append("apps: the owner's own fedseg-superexec runs them")
    else:
        parts.append("apps: " + AppPolicy.from_args(launch.allow_apps, launch.allow_app_files).describe())
    return "; ".join(parts) + f"; node config: {_node_config_text(config)}"


def supernode_executable() -> str:
    """``fedseg-supernode`` (Flower's ``flower-supernode`` with a round's shorter waits) of this environment
    (beside the running Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("fedseg-supernode")
    found = str(beside) if beside.exists() else shutil.which("fedseg-supernode")
    if not found:
        raise FileNotFoundError("fedseg-supernode not found; install fedseg (pip install -e .) in this environment")
    return found


TRANSPORT_FLAGS = ("--superlink", "--insecure", "--root-certificates", "--auth-supernode-private-key")


def supernode_command(launch: VehicleLaunch, extra: list[str] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for ``launch`` (checked separately by :func:`check_vehicle`)."""
    owned = sorted({a.split("=", 1)[0] for a in extra or []} & set(TRANSPORT_FLAGS))
    if owned:  # after --, these would undo the TLS choice check_vehicle made (--insecure to a remote host)
        raise ValueError(f"{owned[0]} after --: set the SuperLink and TLS with fedseg-vehicle's own options")
    # --isolation process: the SuperNode starts no SuperExec of its own (that one would start Flower's
    # flwr-clientapp, which runs the bundle's code); fedseg-superexec (superexec_command) runs the tasks.
    if reopened := sorted({a.split("=", 1)[0] for a in extra or []} & {"--isolation", "--trusted-entities"}):
        raise ValueError(f"{reopened[0]} after --: a vehicle runs only approved code (--allow-app)")
    if not 0.01 <= launch.poll_interval <= 3:
        raise ValueError(f"--poll-interval {launch.poll_interval:g}: valid: 0.01 to 3 seconds (Flower's idle wait)")
    cmd = [supernode_executable(), "--poll-interval", f"{launch.poll_interval:g}", "--superlink", launch.superlink,
           "--port", str(launch.port), "--node-config", _node_config_text(launch.node_config()),
           "--isolation", "process"]
    if launch.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(launch.root_certificates)]
    if launch.key is not None:
        cmd += ["--auth-supernode-private-key", str(launch.key)]
    return cmd + list(extra or [])


def superexec_command(launch: VehicleLaunch, supernode_pid: int) -> list[str]:
    """The ``fedseg-superexec`` command that runs this vehicle's tasks: only the code its owner approved
    (:mod:`fedseg.deploy.approval`), over the SuperNode's Runtime API on loopback; it exits with the
    SuperNode (``supernode_pid``)."""
    beside = Path(sys.executable).with_name("fedseg-superexec")
    found = str(beside) if beside.exists() else shutil.which("fedseg-superexec")
    if not found:
        raise FileNotFoundError("fedseg-superexec not found; install fedseg (pip install -e .) in this environment")
    cmd = [found, "--runtime-api-address", f"127.0.0.1:{launch.port}", "--insecure", "--parent-pid",
           str(supernode_pid)]
    for sha in launch.allow_apps:
        cmd += ["--allow-app", sha]
    for path in launch.allow_app_files:
        cmd += ["--allow-apps", str(path.expanduser().resolve())]
    return cmd + ([] if launch.worker else ["--no-worker"])
