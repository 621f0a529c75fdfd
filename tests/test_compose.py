"""The server's strategy chain as composed, against the two places that describe it: the numbered list
in docs/ARCHITECTURE.md ("## Composition") and in ``fedseg/server/compose.py``'s docstring. Both are
parsed, so neither can drift from the code: a layer added, dropped or moved fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fedseg.server import compose
from fedseg.server.compose import compose_server
from fedseg.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
LAYER = re.compile(r"^\s*\d+\.\s+(?::\w+:)?`+~?([\w.]+)`+")  # "3. `EqualWeights` ..." or ":class:`~a.b.C`"


def documented_layers(text: str) -> list[str]:
    """The chain's layers, innermost first: the class each item of the first numbered list names first."""
    names, started = [], False
    for line in text.splitlines():
        match = LAYER.match(line)
        if match:
            names.append(match.group(1).rsplit(".", 1)[-1])
            started = True
        elif started and line.strip() and not line.startswith(" "):  # the list ended
            break
    return names


def architecture_chain() -> list[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Composition\n", 1)[1].split("\n## ", 1)[0]
    return documented_layers(section)


def composed_layers(**blocks: Any) -> list[str]:
    """Layer class names of the composed chain, innermost first, read from its ``repr``."""
    start_round, trained = blocks.pop("start_round", 0), blocks.pop("trained", None)
    settings = RunSettings.from_config({"federation": {"num_clients": 3, "min_fit_clients": 3}, **blocks})
    parts = compose_server(settings, on_round=lambda row, resume: None, partition_sizes=[8, 8, 8],
                           start_round=start_round, trained=trained)
    return list(reversed(re.findall(r"(\w+)\(", repr(parts.strategy))))


PLAIN = composed_layers()
CENTRAL_TOPK_RESUMED = composed_layers(privacy={"name": "central"}, compression={"name": "topk"}, start_round=2)
SECAGG_RESUMED = composed_layers(secagg={"name": "secaggplus"}, start_round=2)
HEAD_MOMENTUM = composed_layers(privacy={"name": "central", "trainable": "head"}, strategy={"name": "fedavgm"},
                                trained=[False, True])
CENTRAL_HEAD_MOMENTUM = ["FedAvg", *HEAD_MOMENTUM[1:]]  # the documented item 1: FedAvg or the run's strategy


def test_repr_lists_every_layer_of_the_chain_with_its_settings() -> None:
    settings = RunSettings.from_config({"federation": {"num_clients": 3, "min_fit_clients": 3},
                                        "secagg": {"name": "secaggplus"}})

    chain = repr(compose_server(settings, on_round=lambda row, resume: None, partition_sizes=[8, 8, 8],
                                start_round=2).strategy)

    assert chain == ("RoundOffset(offset=2, SecureSumStrategy(codec='none', RoundRecorder(min_replies=3, "
                     "max_examples=8, StatisticsMean(FedAvg()))))")


def test_the_chain_is_what_compose_builds() -> None:
    assert PLAIN == ["FedAvg", "StatisticsMean", "UpdateGuard", "RoundRecorder"]
    assert CENTRAL_TOPK_RESUMED == ["FedAvg", "StatisticsMean", "EqualWeights",
                                    "DifferentialPrivacyClientSideFixedClipping", "UpdateGuard",
                                    "DecodingStrategy", "RoundRecorder", "RoundOffset"]
    assert SECAGG_RESUMED == ["FedAvg", "StatisticsMean", "RoundRecorder", "SecureSumStrategy", "RoundOffset"]
    assert HEAD_MOMENTUM == ["InPlaceFedAvgM", "PlainMean", "StatisticsMean", "EqualWeights",
                             "DifferentialPrivacyClientSideFixedClipping", "TrainedOnly", "ServerStep",
                             "UpdateGuard", "RoundRecorder"]


@pytest.mark.parametrize("where", ["docs/ARCHITECTURE.md", "fedseg/server/compose.py"])
def test_documented_chain_matches_the_composed_one(where: str) -> None:
    # Prepare: the documented list, innermost first, and the union of the composed chains in the
    # order compose builds them (each chain above is the documented list with the layers its
    # settings leave out removed).
    documented = architecture_chain() if where.endswith(".md") else documented_layers(compose.__doc__ or "")
    every_layer = dict.fromkeys(CENTRAL_TOPK_RESUMED + SECAGG_RESUMED + PLAIN + CENTRAL_HEAD_MOMENTUM)

    # Assert: the same layers, and each composed chain in the documented order
    assert sorted(documented) == sorted(every_layer), f"{where} lists {documented}"
    for chain in (PLAIN, CENTRAL_TOPK_RESUMED, SECAGG_RESUMED, CENTRAL_HEAD_MOMENTUM):
        assert [name for name in documented if name in chain] == chain, f"{where}: {documented} vs {chain}"
    assert len(documented) == 12
