"""The settings of a deployed run: ``fedseg-sim``'s Hydra overrides, carried in Flower's run config.

``flwr run --run-config`` may only set keys that the app's ``[tool.flwr.app.config]`` declares, and a
Hydra group choice changes which keys exist (``privacy=dpsgd`` brings ``privacy.noise_multiplier``,
``experiment=smoke`` resets a dozen others), so no fixed table of flat keys can reach every setting.
The app therefore declares one key, ``overrides``: the command line ``fedseg-sim`` would get, as one
string::

    flwr run . fleet --run-config "overrides='experiment=smoke federation.num_clients=3'"

The ServerApp and every ClientApp compose ``conf/`` (which travels inside the app bundle, so every
machine composes the same files) with these overrides, exactly as ``fedseg-sim`` does, and so run
with the same settings as each other and as ``fedseg-sim`` with the same arguments. Only what
``conf/`` takes from the machine's environment resolves per machine: the synthetic data cache
(``$FEDSEG_DATA_CACHE`` or ``~/.cache/fedseg``), which is what an edge box needs. The run writes to
``deploy.output_dir/<run id>``. A run config without ``overrides`` (the full flat config that
``fedseg-sim`` hands its simulation) passes unchanged.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.config import RunConfig, bounded, conf_dir, parse_spec, to_run_config

OVERRIDES_KEY = "overrides"
CONF_DIR = conf_dir()


@dataclass(frozen=True)
class DeploySpec:
    """How the server treats its fleet (the ``deploy`` block of conf/config.yaml)."""

    join_timeout: float = bounded(300.0, gt=0)  # seconds to wait for federation.num_clients vehicles
    output_dir: str = "outputs/deploy"  # a deployed run writes to <output_dir>/<run id> on the server


def deploy_spec(raw: Mapping[str, Any]) -> DeploySpec:
    """The ``deploy`` block of a resolved (nested) config; defaults where it is absent."""
    return parse_spec(DeploySpec, raw.get("deploy"), key="deploy")


def split_overrides(text: str) -> list[str]:
    """``'experiment=smoke data.root="/my data"'`` -> the argv a shell would give ``fedseg-sim``."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ValueError(f"run config {OVERRIDES_KEY}={text!r}: {err}") from None


def compose_overrides(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """``conf/config.yaml`` composed with ``overrides`` and resolved, as ``fedseg-sim`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (conf_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{conf_dir / 'config.yaml'}: missing; the app bundle must ship conf/")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="fedseg-deploy"):
            cfg = compose(config_name="config", overrides=list(overrides))
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"run config {OVERRIDES_KEY}={' '.join(overrides)!r}: {first}") from None
    assert isinstance(container, dict)
    return {str(key): value for key, value in container.items()}


@functools.lru_cache(maxsize=8)
def _expanded(text: str, run_id: int) -> tuple[tuple[str, Any], ...]:
    nested = compose_overrides(split_overrides(text))
    out = Path(deploy_spec(nested).output_dir).expanduser() / str(run_id)
    nested["output_dir"] = str(out)
    return tuple(to_run_config(nested).items())


def expand_run_config(run_config: Mapping[str, Any], run_id: int) -> RunConfig:
    """The full flat run config the apps run with (composed once per process and run).

    ``{"overrides": "experiment=smoke"}`` becomes the smoke experiment's every key plus
    ``output_dir``; a run config without ``overrides`` is returned as it is.
    """
    if OVERRIDES_KEY not in run_config:
        return dict(run_config)
    text = run_config[OVERRIDES_KEY]
    if not isinstance(text, str):
        raise ValueError(f"run config {OVERRIDES_KEY}={text!r}: expected a string of Hydra overrides")  # noqa: TRY004
    return dict(_expanded(text, int(run_id)))
