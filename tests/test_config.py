"""The Hydra <-> Flower run-config bridge and the typed settings built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedseg.config import DataSpec, from_run_config, parse_spec, to_run_config
from fedseg.settings import RunSettings

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def test_run_config_is_flat_scalars_and_round_trips_hand_example() -> None:
    nested = {"a": {"b": 1, "c": [2, 3], "d": None, "e": {"f": "x"}}, "g": 0.5, "h": True, "i": {}}

    flat = to_run_config(nested)

    assert flat == {"a.b": 1, "a.c": "json:[2, 3]", "a.d": "json:null", "a.e.f": "x", "g": 0.5,
                    "h": True, "i": "json:{}"}
    assert from_run_config(flat) == nested


@pytest.mark.parametrize("experiment", ["default", "smoke", "paper_rgb", "paper_seg"])
def test_every_experiment_round_trips_through_the_run_config(experiment: str) -> None:
    cfg = compose_config(f"experiment={experiment}")

    back = from_run_config(to_run_config(cfg))

    assert back == cfg
    assert all(isinstance(v, bool | int | float | str) for v in to_run_config(cfg).values())


def test_settings_from_smoke_config_are_typed() -> None:
    cfg = compose_config("experiment=smoke", "strategy=fedprox")

    s = RunSettings.from_config(from_run_config(to_run_config(cfg)))

    assert s.model.name == "tiny"
    assert s.data.image_size == (64, 64)
    assert s.federation.num_clients == 3 and s.federation.rounds == 2
    assert s.strategy.name == "fedprox" and s.strategy.options == {"proximal_mu": 0.01}


def test_default_run_is_unet_resnet34_on_synthetic_data() -> None:
    s = RunSettings.from_config(compose_config())

    assert (s.model.name, s.data.name, s.model.encoder_weights) == ("resnet34", "synthetic", None)
    assert s.federation.local_norm == "affine"  # FedBN: docs/PERFORMANCE.md "Federated vs centralized"


def test_unknown_spec_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown DataSpec keys \['imgsize'\].*image_size"):
        parse_spec(DataSpec, {"imgsize": [1, 2]})


def test_prefix_lookalike_strings_survive() -> None:
    flat = to_run_config({"s": "json:not-really"})

    assert from_run_config(flat) == {"s": "json:not-really"}


def test_model_group_mirrors_the_backbone_registry() -> None:
    from fedseg.models import BACKBONES

    names = {p.stem for p in (Path(CONF) / "model").glob("*.yaml")}

    assert names == set(BACKBONES)
