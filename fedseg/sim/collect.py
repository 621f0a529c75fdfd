"""``fedseg-collect``: drive a fleet on a running CARLA server and write each vehicle's frames.

    fedseg-collect out=DIR [host=127.0.0.1 port=2000 vehicles=4 frames=200 towns=[Town01,Town03]]

Writes ``DIR/vehicle_<i>/CameraRGB|CameraSeg/<frame>.png`` (tag id in the red channel) with a
manifest per vehicle and one for the fleet: train on it with ``fedseg-sim data=carla
data.root=DIR data.tagset=carla29``. Run the same command again to continue an interrupted
collection. Settings: ``conf/collect.yaml``.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fedseg.collect import CollectSpec, collect
from fedseg.config import parse_spec
from fedseg.sim._cli import CONF_DIR, resolve, user_errors

PROG = "fedseg-collect"


@user_errors(PROG)
def run(cfg: DictConfig) -> None:
    raw = resolve(cfg)
    raw.pop("output_dir", None)
    spec = parse_spec(CollectSpec, raw, key="")
    try:
        result = collect(spec)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; only complete frame pairs are in {spec.out}: run the same command "
              f"to continue", file=sys.stderr)
        sys.exit(130)
    total = sum(result.frames.values())
    print(f"{PROG}: {len(result.frames)} vehicles, {total} frames -> {result.out} "
          f"(train: fedseg-sim data=carla data.root={result.out} data.tagset={spec.tagset})", flush=True)


@hydra.main(config_path=CONF_DIR, config_name="collect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
