"""conf/hardware/*.yaml mirrors fedseg.search.hardware.HARDWARE_PROFILES: same names, same values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedseg.search.hardware import HARDWARE_PROFILES, HardwareBudget

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
FILES = sorted(CONF.glob("*.yaml"))


def test_every_profile_has_a_yaml_and_every_yaml_a_profile() -> None:
    assert FILES, f"no hardware profiles found in {CONF}"
    assert sorted(path.stem for path in FILES) == sorted(HARDWARE_PROFILES)


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.stem)
def test_yaml_equals_registry_entry(path: Path) -> None:
    # Prepare
    block = yaml.safe_load(path.read_text())
    entry = HARDWARE_PROFILES.get(path.stem)
    assert entry is not None, f"{path.name} has no HARDWARE_PROFILES entry"
    # Assert: the yaml names itself, spells out every field, and each value is the registry's.
    assert block["name"] == path.stem == entry.name
    assert set(block) == {f.name for f in dataclasses.fields(HardwareBudget)}
    expected = dataclasses.asdict(entry)
    for key, value in block.items():
        actual = tuple(value) if isinstance(value, list) else value
        assert actual == expected[key], f"{path.name}: {key}={value!r}, registry has {expected[key]!r}"
