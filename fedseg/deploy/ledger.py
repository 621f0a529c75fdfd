"""A vehicle's lifetime privacy ledger: every round it trained, in any run, kept outside every run folder.

The ledger is the vehicle's own (``fedseg-vehicle --ledger``, by default under its state folder), so no run
can reset it: a new ``flwr run`` gets a new output folder and a fresh run accountant, never a fresh ledger.
One record per (run id, round), written before the round trains and counted as spent from then on (a
process killed mid-round spent it); a second request for a recorded (run, round) is refused, since training
it again with fresh noise would release a second noisy update.

Accounting is Opacus': one accountant (RDP) over the (noise multiplier, sample rate, steps) of every
recorded round of every run, at the ledger's own delta. RDP composes adaptively across mechanisms applied to
the same frames, so this bounds the vehicle's total loss; it is tighter than summing per-run epsilons
(basic composition, which would also add up the deltas). A round without per-frame noise (``privacy=none``
or ``central``, whose noise the server adds) is recorded as unbounded: epsilon is infinite from then on.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.privacy import Mechanism

ACCOUNTANT = "rdp"  # the vehicle's choice, whatever accountant a run reports with


def default_ledger_path(name: str, env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else ``$XDG_STATE_HOME/fedseg``, else
    ``~/.local/state/fedseg``; the file ``ledger-<name>.json`` there."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        folder = Path(env["STATE_DIRECTORY"].split(":")[0])
    else:
        folder = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedseg"
    return folder / f"ledger-{name}.json"


def ledger_epsilon(mechanisms: list[Mechanism | None], delta: float) -> float:
    """Opacus' epsilon at ``delta`` for these rounds composed; ``inf`` if one had no noise, 0 if none.

    Rounds with the same noise and sample rate are merged (their steps summed) first: the same RDP
    curve, and a call per distinct mechanism instead of per round."""
    if any(m is None for m in mechanisms):
        return math.inf
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in (m for m in mechanisms if m is not None):
        merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    from fedseg.dpsgd import epsilon_of  # Opacus: only where a vehicle keeps a ledger

    return epsilon_of([(n, q, k) for (n, q), k in sorted(merged.items())], delta, ACCOUNTANT)


@dataclass(frozen=True)
class Caps:
    """The vehicle's epsilon caps (node config); ``None``: no cap."""

    per_run: float | None = None
    lifetime: float | None = None


@dataclass(frozen=True)
class Verdict:
    """A reservation's outcome: ``refusal`` is ``None`` when the round was recorded."""

    refusal: str | None
    run_epsilon: float  # this run's epsilon on this vehicle with the round (at the ledger's delta)
    lifetime_epsilon: float  # every run's, composed
    delta: float


class PrivacyLedger:
    """The JSON file of a vehicle's rounds, read and rewritten under an exclusive lock (two runs on one
    vehicle cannot both pass a check on the same balance) and replaced atomically (a crash leaves the old
    file or the new one, never half of one)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Every recorded round (an absent file: none; an unreadable one raises, never reads as empty)."""
        return self._load()["rounds"] if self.path.exists() else []

    def lifetime_epsilon(self) -> float:
        """Epsilon spent over the vehicle's life so far (``inf`` after a round without per-frame noise)."""
        data = self._load() if self.path.exists() else {"rounds": [], "delta": None}
        return ledger_epsilon([_mechanism(r) for r in data["rounds"]], data["delta"] or 1.0)

    def reserve(self, run: int, server_round: int, mechanism: Mechanism | None, *, delta: float,
                caps: Caps) -> Verdict:
        """Record the round (run, server_round) unless it is recorded already or would pass a cap.

        ``delta``: the vehicle's (from its frames); the ledger keeps the smallest it has been given, so
        its epsilons only grow as the vehicle's data does."""
        with self._locked():
            data: dict[str, Any] = self._load() if self.path.exists() else {"version": 1, "accountant": ACCOUNTANT,
                                                             "delta": delta, "rounds": []}
            delta = min(float(data["delta"]), delta)
            rounds = data["rounds"]
            in_run = [_mechanism(r) for r in rounds if r["run"] == str(run)] + [mechanism]
            run_eps = ledger_epsilon(in_run, delta)
            life_eps = ledger_epsilon([_mechanism(r) for r in rounds] + [mechanism], delta)
            refusal = None
            if any(r["run"] == str(run) and r["round"] == server_round for r in rounds):
                refusal = f"round {server_round} of run {run} is in the ledger already (trained once)"
            elif caps.per_run is not None and run_eps > caps.per_run:
                refusal = (f"the run's epsilon on this vehicle would reach {run_eps:.4g} > max-epsilon-per-run "
                           f"{caps.per_run:g} (delta {delta:.3g})")
            elif caps.lifetime is not None and life_eps > caps.lifetime:
                # No path: the reason goes to the server too, which has no business knowing the box's files
                refusal = (f"the lifetime epsilon would reach {life_eps:.4g} > lifetime-epsilon {caps.lifetime:g} "
                           f"(delta {delta:.3g})")
            if refusal is None:
                noise, rate, steps = mechanism if mechanism is not None else (None, None, None)
                rounds.append({"run": str(run), "round": server_round, "noise_multiplier": noise,
                               "sample_rate": rate, "steps": steps})
                self._write(data | {"delta": delta})
            return Verdict(refusal, run_eps, life_eps, delta)

    def release(self, run: int, server_round: int) -> None:
        """Drop the record of a round that did not train after all (nothing was released)."""
        with self._locked():
            data = self._load()
            data["rounds"] = [r for r in data["rounds"] if (r["run"], r["round"]) != (str(run), server_round)]
            self._write(data)

    def _load(self) -> dict[str, Any]:
        try:  # unreadable: refuse rather than start over at zero
            data = json.loads(self.path.read_bytes())
        except ValueError as err:
            raise ValueError(f"{self.path}: not a fedseg privacy ledger ({err}); restore it from a backup") from None
        if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
            raise ValueError(f"{self.path}: not a fedseg privacy ledger (no 'rounds' list); restore it from a backup")  # noqa: TRY004
        return data

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)  # the rename itself survives a power cut
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _mechanism(record: Mapping[str, Any]) -> Mechanism | None:
    if record.get("noise_multiplier") is None:
        return None
    return float(record["noise_multiplier"]), float(record["sample_rate"]), int(record["steps"])
