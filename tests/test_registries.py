"""Every pluggable kind has one registry, and its Hydra group mirrors it one to one.

For each group: the yaml file stems equal the registry's keys, each yaml's ``name:`` is its stem, and
each yaml is accepted by the code it selects (its typed spec parses it, or Flower's class takes its
options), so a group option can neither go missing nor drift from what the code reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from omegaconf import OmegaConf

from fedseg.compression import CODECS, parse_compression
from fedseg.data import DATA_SOURCES
from fedseg.models import BACKBONES
from fedseg.privacy import PRIVACY, parse_privacy
from fedseg.search.hardware import HARDWARE_PROFILES
from fedseg.secagg import SECAGG, parse_secagg
from fedseg.server.strategies import STRATEGIES, build_strategy
from fedseg.tracking import TRACKERS, parse_tracking

CONF = Path(__file__).resolve().parents[1] / "conf"
REGISTRIES: dict[str, Mapping[str, Any]] = {
    "data": DATA_SOURCES,
    "model": BACKBONES,
    "strategy": STRATEGIES,
    "privacy": PRIVACY,
    "secagg": SECAGG,
    "compression": CODECS,
    "tracking": TRACKERS,
    "hardware": HARDWARE_PROFILES,
}
PARSERS = {"privacy": parse_privacy, "secagg": parse_secagg, "compression": parse_compression,
           "tracking": parse_tracking}


def group_files(group: str) -> dict[str, dict[str, Any]]:
    files = sorted((CONF / group).glob("*.yaml"))
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p), resolve=False) for p in files}  # type: ignore[misc]


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_group_mirrors_its_registry_one_to_one(group: str) -> None:
    files = group_files(group)

    assert set(files) == set(REGISTRIES[group]), f"conf/{group} vs its registry"
    assert {stem: block.get("name") for stem, block in files.items()} == {stem: stem for stem in files}


@pytest.mark.parametrize("group", sorted(PARSERS))
def test_every_option_parses_into_the_spec_it_names(group: str) -> None:
    for stem, block in group_files(group).items():
        spec = PARSERS[group](block)

        assert isinstance(spec, REGISTRIES[group][stem]) and spec.name == stem


def test_every_strategy_option_is_accepted_by_its_flower_class() -> None:
    for stem, block in group_files("strategy").items():
        options = {k: v for k, v in block.items() if k != "name"}

        strategy = build_strategy(stem, options, initial_parameters=ndarrays_to_parameters([np.zeros(2)]))

        assert type(strategy) is STRATEGIES[stem].flower


def test_test_only_backbone_is_flagged_in_the_registry() -> None:
    assert [name for name, spec in BACKBONES.items() if spec.test_only] == ["tiny"]
