"""The import contracts in pyproject.toml hold (``lint-imports``), and they cover every library module.

The contracts: the library never imports the apps (``fedseg.clients``, ``fedseg.server``) or the entry
points (``fedseg.sim``); the entry points sit above the apps; no import cycle among fedseg's modules.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import fedseg

ROOT = Path(__file__).resolve().parents[1]
APPS = {"fedseg.clients", "fedseg.server", "fedseg.sim"}


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["type"]: contract for contract in config["contracts"]}


def test_import_contracts_are_kept() -> None:
    beside = Path(sys.executable).parent / "lint-imports"  # this environment's, activated or not
    lint_imports = str(beside) if beside.exists() else shutil.which("lint-imports") or "lint-imports"
    done = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_library_contract_lists_every_library_module() -> None:
    top_level = {f"fedseg.{m.name}" for m in pkgutil.iter_modules(fedseg.__path__)} - {"fedseg.conf"}
    forbidden = _contracts()["forbidden"]

    assert set(forbidden["forbidden_modules"]) == APPS
    assert set(forbidden["source_modules"]) == top_level - APPS  # a new module must be listed to be checked


def test_the_cycle_contract_covers_the_whole_package() -> None:
    assert _contracts()["acyclic_siblings"]["ancestors"] == ["fedseg"]
