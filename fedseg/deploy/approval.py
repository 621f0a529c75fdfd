"""Which app code a vehicle runs: its own installed fedseg, or app bundles its owner approved by hash.

A Flower app bundle (FAB) carries every ``.py`` of the app and goes first on ``sys.path``, so by
default a vehicle runs whatever the server ships. The vehicle's SuperExec (``fedseg-superexec``)
starts fedseg's launcher for every task instead of Flower's ``flwr-clientapp``, and the launcher
asks :meth:`AppPolicy.refusal` before any shipped code is imported:

- ``installed`` (no allowlist, the default): the vehicle runs its own installed
  ``fedseg.clients.client_app:app`` whatever the bundle holds; only the bundle's run config is used.
- allowlist (``--allow-app SHA256``, ``--allow-apps FILE``): the bundle's own code runs if the sha256
  of its bytes is listed, else the vehicle refuses the run in one logged line and replies an error.

A bundle's hash is Flower's own: the sha256 of the FAB's bytes, which ``flwr build`` names its file
after and ``flwr run`` computes the same way (its zip entries carry a fixed date, so one app folder
always gives one hash). The policy reaches the launcher in :data:`POLICY_ENV`, set by the SuperExec
the owner started; the SuperNode and the server never see it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

POLICY_ENV = "FEDSEG_APP_POLICY"  # "installed", or "allow:<sha256>,<sha256>,..."
INSTALLED_APP = "fedseg.clients.client_app:app"  # what installed mode runs (the wheel's ClientApp)
CLIENT_APP_TASK = "flwr-clientapp"  # Flower's task type for a ClientApp (flwr.supercore.constant.TaskType)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def bundle_hash(content: bytes) -> str:
    """The app bundle's hash as Flower computes it (``fab.hash_str``): sha256 of its bytes, hex."""
    return hashlib.sha256(content).hexdigest()


def _checked_hash(value: str, where: str) -> str:
    text = value.strip().lower()
    if not _SHA256.fullmatch(text):
        raise ValueError(f"{where}: {value.strip()!r} is not a sha256 (64 hex digits; "
                         "flwr build --app DIR names the .fab after it, sha256sum FILE.fab prints it)")
    return text


def read_allowlist(path: Path) -> list[str]:
    """Hashes in ``path``: one per line; blank lines and ``#`` comments ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the app allowlist ({err.strerror or err})") from None
    hashes = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            hashes.append(_checked_hash(entry.split()[0], f"{path}:{number}"))
    return hashes


@dataclass(frozen=True)
class AppPolicy:
    """The app bundles a vehicle runs: none but its installed fedseg (``allowed`` empty), or those listed."""

    allowed: frozenset[str] = frozenset()

    @classmethod
    def from_args(cls, hashes: Iterable[str] = (), files: Iterable[Path] = ()) -> AppPolicy:
        """``--allow-app`` values and ``--allow-apps`` files; ``ValueError`` naming a bad one."""
        listed = [_checked_hash(h, "--allow-app") for h in hashes]
        for path in files:
            found = read_allowlist(path)
            if not found:
                raise ValueError(f"{path}: the app allowlist names no bundle; list sha256 hashes, one a line "
                                 "(or leave out --allow-apps to run the vehicle's installed fedseg)")
            listed += found
        return cls(frozenset(listed))

    @property
    def installed_only(self) -> bool:
        return not self.allowed

    def to_env(self) -> str:
        return "installed" if self.installed_only else "allow:" + ",".join(sorted(self.allowed))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AppPolicy:
        """The policy the SuperExec set; installed mode when none is set (the safe default)."""
        value = env.get(POLICY_ENV, "installed")
        if value == "installed":
            return cls()
        if not value.startswith("allow:"):
            raise ValueError(f"{POLICY_ENV}={value!r}: expected 'installed' or 'allow:<sha256>,...'")
        return cls.from_args(value.removeprefix("allow:").split(","))

    def refusal(self, *, task_type: str, claimed_hash: str, content: bytes) -> str | None:
        """Why this vehicle will not run the bundle (one line), or None. The bundle's code runs only
        when ``None`` comes back and ``installed_only`` is False; in installed mode it never runs."""
        actual = bundle_hash(content)
        if task_type and task_type != CLIENT_APP_TASK:
            return f"refused a {task_type} task of app bundle {actual}: this vehicle runs only ClientApps"
        if claimed_hash != actual:
            return f"refused app bundle {actual}: its bytes do not match the hash it came with ({claimed_hash})"
        if not self.installed_only and actual not in self.allowed:
            return f"refused app bundle {actual}: not on this vehicle's allowlist ({len(self.allowed)} approved)"
        return None

    def describe(self) -> str:
        """One line for the SuperExec's start-up log."""
        if self.installed_only:
            return f"runs its installed fedseg ({INSTALLED_APP}) for every run, never an app bundle's code"
        return f"runs only app bundles whose sha256 is one of {len(self.allowed)} approved"
