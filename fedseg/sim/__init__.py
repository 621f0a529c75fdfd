"""Hydra entry points. Importing this package sets process-wide defaults before torch or Ray load."""

import os

# Flower and Ray phone home or chatter by default; a vehicle fleet simulation should do neither.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's GPU-env FutureWarning
# Before torch loads OpenMP: idle OpenMP workers sleep rather than spin. On cores shared with other
# work (Ray's virtual vehicles, a vehicle's whole software stack, CI), spinning workers stall each
# other's barriers. Measured here, 2 threads, UNet-ResNet34 at 192x256, load ~3.5 on 2 cores:
# median/p95 834/1989 ms spinning, 146/150 ms passive. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A resumed run (`fedseg-sim resume=DIR`) continues in DIR; the resumed session's Hydra files go to
# DIR/.hydra/resumed-<time>/ so that the run's own .hydra/config.yaml stays what it was.
from omegaconf import OmegaConf

OmegaConf.register_new_resolver("fedseg_run_dir", lambda resume, default: resume or default, replace=True)
OmegaConf.register_new_resolver(
    "fedseg_hydra_subdir", lambda resume, now: f".hydra/resumed-{now}" if resume else ".hydra", replace=True)
