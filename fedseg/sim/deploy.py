"""Deployment commands: ``fedseg-certs`` (fleet credentials) and ``fedseg-vehicle`` (an edge box's SuperNode).

    fedseg-certs --out /etc/fedseg/certs --host superlink.example.org --ca-passphrase-env FEDSEG_CA_PASS
    fedseg-vehicle keygen --out /etc/fedseg --name vehicle_0       # on the vehicle; prints the public key
    fedseg-vehicle --superlink superlink.example.org:9092 --data-root /data/carla/vehicle_0 \\
        --root-certificates /etc/fedseg/ca.crt --key /etc/fedseg/vehicle_0.key

Plain ``argparse``, not Hydra: these configure long-lived processes (a systemd service), not runs;
Hydra's run directories and log handlers would only get in their way. Errors are one line on stderr
with exit status 2; ``fedseg-vehicle`` then replaces itself with ``flower-supernode``, so a service
manager's signals reach the SuperNode directly.
"""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedseg.deploy.certs import (
    CA_DAYS,
    SERVER_DAYS,
    make_credentials,
    make_vehicle_key,
    needs_ca_key,
    vehicle_names,
)
from fedseg.deploy.launch import VehicleLaunch, check_vehicle, superexec_command, supernode_command
from fedseg.deploy.processes import with_this_environment_on_path
from fedseg.errors import DataError


def _fail(prog: str, err: BaseException) -> None:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def default_certs_folder() -> Path:
    """``$XDG_CONFIG_HOME/fedseg/certs`` (``~/.config/fedseg/certs``): outside any checkout, so no CA key is
    ever committed by accident."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedseg" / "certs"


def _ca_passphrase(args: argparse.Namespace, *, new_ca: bool) -> bytes | None:
    """The CA key's passphrase: from ``--ca-passphrase-env``, else prompted (twice for a new CA) on a
    terminal; ``None`` only with ``--no-ca-passphrase``."""
    if args.no_ca_passphrase:
        return None
    if args.ca_passphrase_env:
        value = os.environ.get(args.ca_passphrase_env, "")
        if not value:
            raise ValueError(f"--ca-passphrase-env {args.ca_passphrase_env}: that environment variable is unset "
                             "or empty")
        return value.encode()
    if not sys.stdin.isatty():
        raise ValueError("the CA key needs a passphrase: --ca-passphrase-env VAR, a terminal to be asked on, "
                         "or --no-ca-passphrase (unencrypted: tests only)")
    value = getpass.getpass("CA key passphrase: ")
    if new_ca and getpass.getpass("again: ") != value:
        raise ValueError("the two passphrases differ; nothing written")
    if not value:
        raise ValueError("empty passphrase; nothing written (--no-ca-passphrase for an unencrypted key)")
    return value.encode()


def certs_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-certs``: a CA (its key passphrase-protected) and the SuperLink's TLS certificate."""
    parser = argparse.ArgumentParser(
        prog="fedseg-certs", description=certs_main.__doc__,
        epilog="Vehicle keys are made on each vehicle: fedseg-vehicle keygen. After signing, ca.key can move "
               "off the server; it is needed again only to sign a new SuperLink certificate.")
    parser.add_argument("--out", type=Path, default=default_certs_folder(),
                        help="credentials folder (default: %(default)s, outside any checkout)")
    parser.add_argument("--host", action="append", default=[],
                        help="SuperLink host name or address the vehicles connect to (repeat; loopback always)")
    parser.add_argument("--days", type=int, default=SERVER_DAYS,
                        help="SuperLink certificate validity, never past the CA's (default %(default)s)")
    parser.add_argument("--ca-days", type=int, default=CA_DAYS, help="CA validity (default %(default)s)")
    parser.add_argument("--ca-passphrase-env", metavar="VAR", help="read the CA key's passphrase from $VAR "
                        "(default: ask on the terminal)")
    parser.add_argument("--no-ca-passphrase", action="store_true", help="CA key unencrypted (tests only)")
    parser.add_argument("--vehicles", type=int, default=0, help="with --server-side-vehicle-keys: key pairs "
                        "vehicle_0..vehicle_<N-1> made here")
    parser.add_argument("--names", nargs="*", default=[], help="vehicle names instead of vehicle_<i>")
    parser.add_argument("--server-side-vehicle-keys", action="store_true",
                        help="make vehicles' private keys on the server (discouraged: copying a private key "
                             "out is how it leaks; fedseg-vehicle keygen makes it on the vehicle)")
    args = parser.parse_args(argv)
    try:
        names = vehicle_names(args.vehicles, args.names)
        if names and not args.server_side_vehicle_keys:
            raise ValueError("--vehicles/--names make vehicles' private keys on the server; run fedseg-vehicle "
                             "keygen on each vehicle instead, or add --server-side-vehicle-keys (discouraged)")
        needed, new_ca = needs_ca_key(args.out)
        passphrase = _ca_passphrase(args, new_ca=new_ca) if needed else None
        made = make_credentials(args.out, vehicles=names, hosts=args.host, days=args.days, ca_days=args.ca_days,
                                ca_passphrase=passphrase)
    except (ValueError, FileExistsError, OSError) as err:
        _fail(parser.prog, err)
    for path in made.created:
        print(f"wrote {path}")
    kept = [p for p in (made.ca_cert, made.superlink_cert, *made.vehicle_keys.values()) if p not in made.created]
    for path in kept:
        print(f"kept  {path} (exists)")
    print(f"next: copy {made.ca_cert} to every vehicle; keep {made.ca_cert.with_suffix('.key')} offline once "
          "signing is done; register each vehicle's public key (fedseg-vehicle keygen prints it):\n"
          "  flwr supernode register <vehicle>.pub <connection>")


def keygen_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-vehicle keygen``: this vehicle's key pair, made here; prints the public key to register."""
    parser = argparse.ArgumentParser(prog="fedseg-vehicle keygen", description=keygen_main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for <name>.key (0600) and <name>.pub")
    parser.add_argument("--name", default="vehicle", help="the key's file name (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        key = make_vehicle_key(args.out, args.name)
    except (ValueError, FileExistsError, OSError) as err:
        _fail("fedseg-vehicle", err)
    public = key.with_suffix(".pub")
    print(f"wrote {key} (private, 0600: it never leaves this vehicle)\nwrote {public}\n"
          f"{public.read_text().strip()}\n"
          f"next: on the server, register this public key (copy the line above or {public}):\n"
          f"  flwr supernode register {public} <connection>")


def vehicle_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-vehicle``: check this vehicle's data and keys, then run ``flower-supernode`` for it."""
    parser = argparse.ArgumentParser(prog="fedseg-vehicle", description=vehicle_main.__doc__,
                                     epilog="Arguments after -- go to flower-supernode unchanged. "
                                            "fedseg-vehicle keygen --out DIR makes this vehicle's key pair.")
    parser.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT")
    parser.add_argument("--data-root", type=Path, help="this vehicle's CARLA-format folder")
    parser.add_argument("--vehicle", help="the vehicle's folder under --data-root, if it holds several")
    parser.add_argument("--partition-id", type=int, help="share of the run's data (or the vehicle's number)")
    parser.add_argument("--num-partitions", type=int, help="shares in all (= the run's federation.num_clients)")
    parser.add_argument("--hardware", help="hardware profile (conf/hardware), sets the training threads")
    parser.add_argument("--threads", type=int, help="training threads (default: profile's, else 1)")
    parser.add_argument("--key", type=Path, help="private key for node authentication (fedseg-vehicle keygen)")
    parser.add_argument("--root-certificates", type=Path, help="the fleet CA certificate (TLS)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (a SuperLink on this machine only)")
    parser.add_argument("--port", type=int, default=9094, help="local port for the ClientApp (default 9094)")
    parser.add_argument("--tagset", default="carla29", help="tag set the labels are checked against")
    parser.add_argument("--allow-app", action="append", default=[], metavar="SHA256",
                        help="run app bundles with this sha256 (repeat; flwr build names the .fab after it); "
                             "none: run this vehicle's installed fedseg whatever a run ships")
    parser.add_argument("--allow-apps", action="append", default=[], type=Path, metavar="FILE",
                        help="file of approved app bundle hashes, one a line")
    parser.add_argument("--external-superexec", action="store_true",
                        help="start no SuperExec: the owner runs fedseg-superexec as another user (docs/GUIDE.md)")
    # The vehicle's privacy floor (fedseg.deploy.floor): the run's overrides cannot lower it.
    parser.add_argument("--require-dp", action="store_true", help="train only under DP-SGD (privacy=dpsgd)")
    parser.add_argument("--min-noise-multiplier", type=float, metavar="X", help="refuse runs with less DP-SGD noise")
    parser.add_argument("--max-epsilon-per-run", type=float, metavar="E", help="refuse rounds past E in one run")
    parser.add_argument("--lifetime-epsilon", type=float, metavar="E",
                        help="refuse rounds past E over all runs, composed (the ledger's delta)")
    parser.add_argument("--ledger", type=Path, metavar="FILE", help="the lifetime privacy ledger (default: "
                        "$STATE_DIRECTORY, else $XDG_STATE_HOME/fedseg or ~/.local/state/fedseg, ledger-<name>.json)")
    parser.add_argument("--poll-interval", type=float, default=0.1, metavar="S",
                        help="during a round, ask the SuperLink for the next message every S s (default 0.1); "
                             "an idle vehicle asks every 3 s, as Flower does")
    parser.add_argument("--no-worker", action="store_true",
                        help="run every message in a process of its own (Flower's model) instead of this "
                             "vehicle's long-lived worker")
    parser.add_argument("--check-only", action="store_true", help="check, print the command, do not start")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keygen"]:  # a subcommand; every other invocation is the run interface, unchanged
        keygen_main(argv[1:])
        return
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    launch = VehicleLaunch(
        superlink=args.superlink, data_root=args.data_root, vehicle=args.vehicle, partition_id=args.partition_id,
        num_partitions=args.num_partitions, hardware=args.hardware, threads=args.threads, key=args.key,
        root_certificates=args.root_certificates, insecure=args.insecure, port=args.port, tagset=args.tagset,
        allow_apps=tuple(args.allow_app), allow_app_files=tuple(args.allow_apps),
        external_superexec=args.external_superexec, require_dp=args.require_dp,
        min_noise_multiplier=args.min_noise_multiplier, max_epsilon_per_run=args.max_epsilon_per_run,
        lifetime_epsilon=args.lifetime_epsilon, ledger=args.ledger, poll_interval=args.poll_interval,
        worker=not args.no_worker)
    try:
        summary = check_vehicle(launch)
        cmd = supernode_command(launch, extra)
        superexec = None if launch.external_superexec else superexec_command(launch, os.getpid())
    except (DataError, ValueError, KeyError, FileNotFoundError) as err:
        _fail(parser.prog, err)
    print(f"fedseg-vehicle: {summary}", flush=True)
    if args.check_only:
        print(" ".join(cmd) + ("" if superexec is None else "\n" + " ".join(superexec)))
        return
    env = with_this_environment_on_path(dict(os.environ))
    if superexec is not None:
        # Started before this process becomes the SuperNode (same pid: --parent-pid ends it with the
        # SuperNode); it runs each task through fedseg-clientapp, which runs only approved code.
        subprocess.Popen(superexec, env=env)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    vehicle_main()
