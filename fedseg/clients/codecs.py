"""The vehicle's half of update compression: encode its reply with the run's codec, keep its residual.

:func:`encode_reply` turns the vehicle's final weights into the codec's encoding of its update
``weights - global``; the one mod that calls it is ``encode_update_mod`` (``fedseg/clients/mods.py``),
with or without SecAgg+. It sits outside the client and outside ``fixedclipping_mod``:

* under DP-SGD the noise is inside training, so the codec only post-processes a private output (the
  guarantee holds, and so does it for the residual, which is derived from private outputs alone);
* under central DP the update was clipped to ``clipping_norm``, but a codec can lengthen it again
  (error feedback adds the residual, rounding adds a little), and the server's noise is calibrated
  to that norm: the vehicle clips its *encoded* update so that it decodes to at most the clipping norm
  (and the residual keeps what that cut), and without SecAgg+ the server clips again after decoding.

Error feedback state lives in ``context.state`` (an ArrayRecord) and on disk,
``<output_dir>/compression/vehicle_<id>.npz``, written atomically, so a restarted vehicle goes on
with what it still owes. It is never sent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import FitIns, FitRes, parameters_to_ndarrays
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedseg.compression import SEED_KEY, Arrays, clip_encoded
from fedseg.deploy.vehicle import vehicle_id
from fedseg.secagg import encode_delta
from fedseg.settings import RunSettings

RESIDUAL_RECORD = "compression.residual"  # context.state key of the error-feedback residual


def encode_reply(settings: RunSettings, ctxt: Context, fitins: FitIns, fitres: FitRes) -> Arrays:
    """The codec's encoding of ``fitres``' weights minus ``fitins``' global weights.

    With error feedback the residual is added first and what the encoding leaves out is kept for the
    next round; a vehicle that skipped training (privacy budget spent) sends a zero update and keeps
    its residual as it was. Under central DP the encoding is clipped (see the module docstring).
    """
    codec = settings.compression
    global_ = parameters_to_ndarrays(fitins.parameters)
    update = encode_delta(parameters_to_ndarrays(fitres.parameters), global_)
    if codec.sends_update and not all(np.isfinite(u).all() for u in update):  # else SecAgg+'s check says so
        raise ValueError("compression: the vehicle's update is not finite; nothing sent")
    server_round = int(fitins.config.get("server_round", 0))
    seed = fitins.config.get(SEED_KEY)
    seed = int(seed) if isinstance(seed, int) else None
    store = None
    if codec.keeps_residual and not fitres.metrics.get("skipped"):
        store = ResidualStore(ctxt, Path(settings.output_dir) / "compression")
        update = [np.asarray(u + r) for u, r in zip(update, store.load(global_), strict=True)]
    vehicle = vehicle_id(ctxt)
    rng = np.random.default_rng([settings.seed, server_round, vehicle])  # int8's stochastic rounding
    encoded = codec.encode(update, global_, seed=seed, rng=rng)
    clipping_norm = fitins.config.get(KEY_CLIPPING_NORM)
    if codec.sends_update and isinstance(clipping_norm, int | float):
        encoded = clip_encoded(codec, encoded, global_, seed=seed, max_norm=float(clipping_norm))
    if store is not None:
        sent = codec.decode(encoded, global_, seed=seed)
        store.save([np.asarray(u - s, np.float32) for u, s in zip(update, sent, strict=True)])
    return encoded


class ResidualStore:
    """One vehicle's error-feedback residual: ``context.state`` first, then its file, else zeros."""

    def __init__(self, ctxt: Context, folder: Path) -> None:
        self.state = ctxt.state
        self.path = folder / f"vehicle_{vehicle_id(ctxt)}.npz"

    def load(self, like: Arrays) -> Arrays:
        """The residual, or zeros when there is none yet or it was kept for other shapes."""
        if RESIDUAL_RECORD in self.state.array_records:
            saved: Arrays | None = self.state.array_records[RESIDUAL_RECORD].to_numpy_ndarrays()
        else:
            saved = load_residual(self.path)
        if saved is None or [np.shape(r) for r in saved] != [np.shape(g) for g in like]:
            return [np.zeros(np.shape(g), np.float32) for g in like]
        return saved

    def save(self, residual: Arrays) -> None:
        self.state.array_records[RESIDUAL_RECORD] = ArrayRecord(residual)
        save_residual(self.path, residual)


def save_residual(path: Path, residual: Arrays) -> None:
    """Write a vehicle's error-feedback residual atomically (a crash leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, *residual)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_residual(path: Path) -> Arrays | None:
    """The residual saved at ``path``, or None if there is none."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]
