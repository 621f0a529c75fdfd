"""The accountant's epsilon and the audit's, side by side: no DP, per-frame DP-SGD at epsilon 8, and
vehicle-level DP at epsilon 8 and at epsilon 1, in one invocation with one seed.

Each row is the audit ``privacy.audit=true`` runs after a private run (``fedseg/server/audit.py``), on
the tiny UNet and one synthetic vehicle's frames at 32x32, so the whole bench takes minutes:

* a frame (``privacy=dpsgd``, and ``no_dp``: the same without noise): Steinke, Nasr and Jagielski's
  one-run audit, 1000 white-box gradient canaries, a lower bound on epsilon at 95% confidence;
* a vehicle (``privacy=central``, and ``no_dp``'s ``audit_epsilon_vehicle``): Andrew et al.'s canary
  vehicles through Flower's clipping and DP wrapper, 1000 vehicles of a 2000-vehicle fleet, 200 a
  round, 20 rounds; an estimate. Noise calibrated with Flower's accountant to epsilon 8 and 1.

What it must show: the audit's figure at most the accountant's in every private row, and clearly above 1
in the no-DP row (the audit has power). One-run audits are loose by design: a lower bound well below the
accountant's epsilon says no bug leaks more than the proof allows, not that the proof is tight.

    python scripts/bench/audit.py --json
    python scripts/bench/audit.py --canaries 500 --frames 32     # quicker, weaker audits
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from typing import Any

import torch

from fedseg._dp_compat import make_dp_compatible
from fedseg.audit import AuditResult, audit_dpsgd
from fedseg.config import DataSpec, FederationSpec
from fedseg.data import load_data
from fedseg.models import build_model
from fedseg.privacy import CentralDPSpec, DPSpec, default_delta
from fedseg.server.audit import audit_central
from fedseg.server.central_dp import calibrate_noise_multiplier

SEED = 0
VEHICLES, SAMPLED, ROUNDS = 2000, 200, 20
SHAPES = [(100, 300)]  # 30,000 noised coordinates: the cosines' signal does not depend on the count


def frame_audit(noise: float | None, target: float | None, args: argparse.Namespace) -> AuditResult:
    """Steinke et al.'s audit of DP-SGD on one synthetic vehicle's frames (noise 0: no DP)."""
    spec = DataSpec(image_size=(32, 32), frames_per_vehicle=args.frames, heldout_frames=1)
    data = load_data(spec, num_clients=1, seed=SEED, progress=False)
    torch.manual_seed(SEED)
    model = make_dp_compatible(build_model("tiny", data.label_map.num_classes))
    dp = DPSpec(noise_multiplier=noise, target_epsilon=target, delta=1e-5)  # trains the decoder, the default
    return audit_dpsgd(model, data.clients[0], dp, batch_size=args.batch, epochs=args.epochs, lr=0.1,
                       canaries=args.canaries, seed=SEED)


def vehicle_audit(epsilon: float | None, args: argparse.Namespace) -> AuditResult:
    """Andrew et al.'s canary vehicles at the noise that gives ``epsilon`` (None: no noise)."""
    delta = default_delta(VEHICLES)  # what the run's accountant uses
    noise = 0.0 if epsilon is None else calibrate_noise_multiplier(epsilon, vehicles=VEHICLES, sampled=SAMPLED,
                                                                   rounds=ROUNDS, delta=delta)
    fed = FederationSpec(num_clients=VEHICLES, fraction_fit=SAMPLED / VEHICLES, min_fit_clients=SAMPLED,
                         rounds=ROUNDS)
    return audit_central(CentralDPSpec(noise_multiplier=noise), fed, SHAPES, rounds=ROUNDS,
                         canaries=args.canaries, seed=SEED)


def row(result: AuditResult) -> dict[str, Any]:
    record = result.as_json()
    return {key: record[key] for key in ("accountant_epsilon", "audit_epsilon", "delta", "canaries", "confidence")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000, help="gradient canaries and canary vehicles")
    parser.add_argument("--frames", type=int, default=64, help="the audited vehicle's frames")
    parser.add_argument("--batch", type=int, default=8, help="expected frames per DP-SGD step")
    parser.add_argument("--epochs", type=int, default=5, help="the audited vehicle's epochs")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on the last line")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs each noised round
    torch.set_num_threads(1)  # tiny convolutions: more threads only fight over a shared machine
    start = time.perf_counter()
    plain, plain_vehicle = frame_audit(0.0, None, args), vehicle_audit(None, args)
    rows = {
        "no_dp": row(plain) | {"audit_epsilon_vehicle": row(plain_vehicle)["audit_epsilon"]},
        "dpsgd_eps8": row(frame_audit(None, 8.0, args)),
        "vehicle_eps8": row(vehicle_audit(8.0, args)),
        "vehicle_eps1": row(vehicle_audit(1.0, args)),
    }
    private = [r for name, r in rows.items() if name != "no_dp"]
    checks = {
        "audit_at_most_accountant": all(r["audit_epsilon"] <= r["accountant_epsilon"] for r in private),
        # None: beyond 1e4, unbounded
        "no_dp_audit_above_1": all(e is None or e > 1 for e in (rows["no_dp"]["audit_epsilon"],
                                                               rows["no_dp"]["audit_epsilon_vehicle"])),
    }
    for name, r in rows.items():
        print(f"{name:14s} accountant {r['accountant_epsilon']!s:>8}  audit {r['audit_epsilon']!s:>8}"
              + (f"  (vehicle audit {r['audit_epsilon_vehicle']})" if "audit_epsilon_vehicle" in r else ""))
    print(f"checks: {checks}; {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps({"rows": rows, "checks": checks, "seed": SEED,
                          "frame": {"frames": args.frames, "batch": args.batch, "epochs": args.epochs,
                                    "image_size": [32, 32], "backbone": "tiny"},
                          "vehicle": {"vehicles": VEHICLES, "sampled": SAMPLED, "rounds": ROUNDS,
                                      "coordinates": sum(a * b for a, b in SHAPES)},
                          "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
