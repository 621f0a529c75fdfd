"""What the wheel installs: one import name, every subpackage, the configs (``.ci/wheel-check`` installs it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedseg.config import conf_dir

PROJECT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    # pyproject lists the packages (discovery cannot see the mapped conf/), so a new subpackage must be
    # added there or the wheel silently lacks it.
    on_disk = {".".join(p.parent.relative_to(PROJECT).parts) for p in (PROJECT / "fedseg").rglob("__init__.py")}

    listed = set(_setuptools()["packages"])

    assert listed - {"fedseg.conf"} == on_disk
    assert all(name == "fedseg" or name.startswith("fedseg.") for name in listed)


def test_configs_ship_as_fedseg_conf_with_every_group() -> None:
    setuptools = _setuptools()
    shipped = setuptools["package-data"]["fedseg.conf"]
    yaml_dirs = {p.parent.relative_to(PROJECT / "conf") for p in (PROJECT / "conf").rglob("*.yaml")}

    assert setuptools["package-dir"]["fedseg.conf"] == "conf"
    assert max(len(d.parts) for d in yaml_dirs) <= 1 and {"*.yaml", "*/*.yaml"} <= set(shipped)
    assert conf_dir() == PROJECT / "conf"  # a checkout composes its own conf/
