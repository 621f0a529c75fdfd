"""Deployment commands: ``fedseg-certs`` (fleet credentials) and ``fedseg-vehicle`` (an edge box's SuperNode).

    fedseg-certs --out certs --vehicles 3 --host superlink.example.org
    fedseg-vehicle --superlink superlink.example.org:9092 --data-root /data/carla/vehicle_0 \\
        --root-certificates certs/ca.crt --key certs/vehicles/vehicle_0.key

Plain ``argparse``, not Hydra: these configure long-lived processes (a systemd service), not runs;
Hydra's run directories and log handlers would only get in their way. Errors are one line on stderr
with exit status 2; ``fedseg-vehicle`` then replaces itself with ``flower-supernode``, so a service
manager's signals reach the SuperNode directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedseg.deploy.certs import make_credentials, vehicle_names
from fedseg.deploy.launch import VehicleLaunch, check_vehicle, supernode_command
from fedseg.deploy.processes import with_this_environment_on_path
from fedseg.errors import DataError


def _fail(prog: str, err: BaseException) -> None:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def certs_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-certs``: a CA, the SuperLink's TLS certificate and one EC key pair per vehicle."""
    parser = argparse.ArgumentParser(prog="fedseg-certs", description=certs_main.__doc__)
    parser.add_argument("--out", type=Path, default=Path("certs"), help="credentials folder (default: certs)")
    parser.add_argument("--vehicles", type=int, default=0, help="key pairs vehicle_0..vehicle_<N-1>")
    parser.add_argument("--names", nargs="*", default=[], help="vehicle names instead of vehicle_<i>")
    parser.add_argument("--host", action="append", default=[],
                        help="SuperLink host name or address the vehicles connect to (repeat; loopback always)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    args = parser.parse_args(argv)
    try:
        made = make_credentials(args.out, vehicles=vehicle_names(args.vehicles, args.names), hosts=args.host,
                                days=args.days)
    except (ValueError, FileExistsError, OSError) as err:
        _fail(parser.prog, err)
    for path in made.created:
        print(f"wrote {path}")
    kept = [p for p in (made.ca_cert, made.superlink_cert, *made.vehicle_keys.values()) if p not in made.created]
    for path in kept:
        print(f"kept  {path} (exists)")
    print("next: register each vehicle's public key on the SuperLink, e.g.\n"
          + "\n".join(f"  flwr supernode register {key.with_suffix('.pub')} <connection>"
                      for key in made.vehicle_keys.values()))


def vehicle_main(argv: Sequence[str] | None = None) -> None:
    """``fedseg-vehicle``: check this vehicle's data and keys, then run ``flower-supernode`` for it."""
    parser = argparse.ArgumentParser(prog="fedseg-vehicle", description=vehicle_main.__doc__,
                                     epilog="Arguments after -- go to flower-supernode unchanged.")
    parser.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT")
    parser.add_argument("--data-root", type=Path, help="this vehicle's CARLA-format folder")
    parser.add_argument("--vehicle", help="the vehicle's folder under --data-root, if it holds several")
    parser.add_argument("--partition-id", type=int, help="share of the run's data (or the vehicle's number)")
    parser.add_argument("--num-partitions", type=int, help="shares in all (= the run's federation.num_clients)")
    parser.add_argument("--hardware", help="hardware profile (conf/hardware), sets the training threads")
    parser.add_argument("--threads", type=int, help="training threads (default: profile's, else 1)")
    parser.add_argument("--key", type=Path, help="private key for node authentication (fedseg-certs)")
    parser.add_argument("--root-certificates", type=Path, help="the fleet CA certificate (TLS)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    parser.add_argument("--port", type=int, default=9094, help="local port for the ClientApp (default 9094)")
    parser.add_argument("--tagset", default="carla29", help="tag set the labels are checked against")
    parser.add_argument("--check-only", action="store_true", help="check, print the command, do not start")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    launch = VehicleLaunch(
        superlink=args.superlink, data_root=args.data_root, vehicle=args.vehicle, partition_id=args.partition_id,
        num_partitions=args.num_partitions, hardware=args.hardware, threads=args.threads, key=args.key,
        root_certificates=args.root_certificates, insecure=args.insecure, port=args.port, tagset=args.tagset)
    try:
        summary = check_vehicle(launch)
        cmd = supernode_command(launch, extra)
    except (DataError, ValueError, KeyError, FileNotFoundError) as err:
        _fail(parser.prog, err)
    print(f"fedseg-vehicle: {summary}", flush=True)
    if args.check_only:
        print(" ".join(cmd))
        return
    os.execve(cmd[0], cmd, with_this_environment_on_path(dict(os.environ)))  # it starts flwr-clientapp by name


if __name__ == "__main__":
    vehicle_main()
