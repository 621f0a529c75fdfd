"""What a vehicle sends instead of its raw weights, and the fixed-point arithmetic of secure aggregation.

Flower's SecAgg+ sums integers: each vehicle multiplies its arrays by ``examples / max_weight``,
clips them to ``±clipping_range``, quantizes them to ``quantization_range`` levels (stochastic
rounding) and masks them; the server unmasks only the sum. Clipping there is silent, so fedseg
sends the *update* (``local - global``, the ``delta`` codec), checks it against the range on the
vehicle before masking (:func:`check_secagg_range`), and the server adds the global weights back.
Deltas are small next to weights except BatchNorm running statistics: an untrained UNet-ResNet34's
running variances move by up to 27.5 in its first local epoch (measured, default config), far past
Flower's default range of 8, hence ``clipping_range: 64`` and a quantization grid that is as fine
as the modulus allows (:func:`auto_quantization_range`).

Flower sends each masked vector as int64 arrays (twice the bytes of float32) although every value
lies below the modulus (2^32 at most): :func:`pack_masked` packs them into one unsigned array of the
modulus' width for the wire and :func:`unpack_masked` restores Flower's list on the server.

No Flower imports here: the client mod and the server workflow both use these functions. The
``SECAGG`` registry (``none``, ``secaggplus``) holds the typed settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from fedseg.config import bounded, parse_choice

# Flower rounds quantized values into int32 (flwr.common.secure_aggregation.quantization).
MAX_QUANTIZATION_RANGE = 2**30
# Where a vehicle's packed masked vector travels: an ArrayRecord, plus its arrays' shapes in the
# SecAgg+ config record (ndim, then the dimensions, per array).
PACKED_RECORD, PACKED_SHAPES = "fedseg.masked", "fedseg.masked.shapes"


class SecAggRangeError(ValueError):
    """A vehicle's update does not fit the SecAgg+ fixed-point range: sending it would clip silently."""


@dataclass(frozen=True)
class NoSecAgg:
    """``secagg=none``: the server sees each vehicle's update (fine for simulation studies)."""

    name: ClassVar[str] = "none"


@dataclass(frozen=True)
class SecAggSpec:
    """``conf/secagg/secaggplus.yaml``: Flower's SecAggPlusWorkflow settings plus fedseg's failure policy."""

    name: ClassVar[str] = "secaggplus"

    num_shares: int | float = 3  # int: vehicles holding a share (self included); float: fraction of round
    reconstruction_threshold: int | float = 2  # int: shares that rebuild a secret; float: of num_shares
    clipping_range: float = bounded(64.0, gt=0)
    # None: auto_quantization_range(vehicles); at most what Flower's int32 rounding holds
    quantization_range: int | None = bounded(None, ge=2, le=MAX_QUANTIZATION_RANGE)
    max_weight: float | None = bounded(None, gt=0)  # None: the largest vehicle partition (frames)
    modulus_range: int = bounded(2**32, gt=0, le=2**32)  # and a power of 2 (validate_secagg)
    # seconds per protocol stage (stage 2 includes training); None: no limit
    timeout: float | None = bounded(None, gt=0)
    # A round below the threshold: "skip" keeps the global model, "stop" ends the run.
    on_failure: Literal["skip", "stop"] = "skip"


# The secure-aggregation registry, mirrored one to one by conf/secagg/*.yaml.
SECAGG: dict[str, type[NoSecAgg | SecAggSpec]] = {"none": NoSecAgg, "secaggplus": SecAggSpec}


def parse_secagg(block: Mapping[str, Any] | None) -> NoSecAgg | SecAggSpec:
    """The ``secagg`` block as its registry spec."""
    return parse_choice(SECAGG, block, key="secagg", default="none")


def resolve_shares(spec: SecAggSpec, sampled: int) -> tuple[int, int]:
    """``(num_shares, threshold)`` exactly as Flower's SecAggPlusWorkflow resolves them at run time."""
    shares, threshold = spec.num_shares, spec.reconstruction_threshold
    if isinstance(shares, float) or shares == 1:  # Flower reads the int 1 as the fraction 1.0
        shares = round(float(shares) * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    if isinstance(threshold, float) or threshold == 1:
        threshold = max(round(float(threshold) * shares), 2)
    return int(shares), int(threshold)


def auto_quantization_range(vehicles: int, modulus_range: int = 2**32) -> int:
    """The finest grid whose sum over ``vehicles`` cannot wrap around the modulus (a power of 2).

    Each quantized value lies in ``[0, quantization_range]`` and the server only sees their sum
    modulo ``modulus_range``, so ``vehicles * quantization_range < modulus_range`` is required.
    """
    bits = math.floor(math.log2((modulus_range - 1) / max(vehicles, 1)))
    return int(min(2**bits, MAX_QUANTIZATION_RANGE))


def resolve_max_weight(spec: SecAggSpec, partition_sizes: Sequence[int] | None) -> float:
    """``max_weight`` as configured, else the largest partition (frames).

    Vehicles report their partition size as their weight (also under DP-SGD, whose Poisson-sampled
    epoch length is random), so no vehicle exceeds it; the tightest bound keeps the weights, and with
    them the quantization grid, as fine as possible. The vehicle checks it anyway.
    """
    if spec.max_weight is not None:
        return float(spec.max_weight)
    if not partition_sizes:
        raise ValueError("secagg.max_weight=null needs the vehicles' partition sizes; "
                         "set secagg.max_weight to the most examples one vehicle trains on per round")
    return float(max(partition_sizes))


def encode_delta(local: Sequence[np.ndarray], global_: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``local - global`` per array, in float64 (integer buffers such as BN step counters included)."""
    if len(local) != len(global_):
        raise ValueError(f"delta codec: {len(local)} local arrays vs {len(global_)} global arrays")
    return [np.asarray(a, np.float64) - np.asarray(g, np.float64)
            for a, g in zip(local, global_, strict=True)]


def decode_delta(global_: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``global + delta`` back in each global array's dtype (integers rounded, not truncated)."""
    out = []
    for g, d in zip(global_, delta, strict=True):
        g = np.asarray(g)
        value = g.astype(np.float64) + np.asarray(d, np.float64).reshape(g.shape)
        out.append(value.astype(g.dtype) if g.dtype.kind == "f" else np.rint(value).astype(g.dtype))
    return out


def check_secagg_range(delta: Sequence[np.ndarray], *, examples: int, max_weight: float,
                       clipping_range: float) -> None:
    """Raise :class:`SecAggRangeError` unless SecAgg+ can carry ``delta`` without clipping it.

    Flower sends ``delta * examples / max_weight`` clipped to ``±clipping_range``; the message names
    the offending array and the smallest ``clipping_range`` (or largest ``max_weight``) that fits.
    """
    if examples > max_weight:
        raise SecAggRangeError(f"secagg: a vehicle trained on {examples} examples > secagg.max_weight="
                               f"{max_weight:g}; set secagg.max_weight to at least {examples}")
    ratio = examples / max_weight
    for index, array in enumerate(delta):
        if array.size == 0:
            continue
        if not np.all(np.isfinite(array)):
            raise SecAggRangeError(f"secagg: array #{index} {array.shape} of a vehicle's update "
                                   "is not finite")
        peak = float(np.abs(array).max()) * ratio
        if peak > clipping_range:
            raise SecAggRangeError(
                f"secagg: array #{index} {array.shape} of a vehicle's update reaches {peak:.4g} after "
                f"weighting by examples/max_weight={ratio:.3g}, outside secagg.clipping_range="
                f"{clipping_range:g}, where SecAgg+ would clip it silently; "
                f"set secagg.clipping_range>={math.ceil(peak * 1.5)}")


def aggregate_error_bound(examples: Sequence[int], *, clipping_range: float, quantization_range: int,
                          max_weight: float, peak: float | None = None) -> float:
    """Largest per-element gap between the SecAgg+ aggregate and the exact weighted mean of in-range updates.

    Vehicle i sends ``x * w_i`` (``w_i = examples_i / max_weight``) stochastically rounded to a grid of
    step ``2 * clipping_range / quantization_range`` (error < one step); the server divides the sum by
    the sum of the weights, which are rounded to ``1 / quantization_range`` themselves (relative error
    ``<= 0.5 / (quantization_range * w_i)`` on each weight, at most twice that on a weighted mean of
    values up to ``peak``; default: the largest value :func:`check_secagg_range` lets through).
    """
    weights = [n / max_weight for n in examples if n > 0]
    if not weights:
        return math.inf
    step = 2.0 * clipping_range / quantization_range
    w_min = min(weights)
    peak = clipping_range / w_min if peak is None else peak
    rounding = len(examples) * step / sum(weights)
    weighting = peak / (quantization_range * w_min)
    return rounding + weighting


@dataclass(frozen=True)
class FixedPoint:
    """One run's SecAgg+ fixed point, and what it lets the server check of the one sum it sees.

    Flower's ``secaggplus_mod`` computes, on the vehicle, ``q = round(examples / max_weight *
    quantization_range)`` and sends ``q`` beside ``update * q / quantization_range`` clipped to
    ``±clipping_range`` and quantized; the server divides the unmasked sum of the values by the sum of
    the ``q``. So vehicles running that code cannot make an element of the mean larger than
    :meth:`sum_bound`; a vehicle that changed its own mod can send any integers (a weight slot that
    cancels the others' amplifies the sum; one that cancels it to 0 makes it infinite), and only
    :meth:`sum_problem` on the server sees that, in the sum.
    """

    clipping_range: float
    quantization_range: int
    max_weight: float

    def sum_bound(self, examples: Sequence[int]) -> float:
        """The largest element of the unmasked mean that vehicles with these (claimed) example counts
        can produce when each stays in ``±clipping_range``: ``(k * C + S * step) / sum(q_i / Q)``, with
        k vehicles that trained, S survivors (each adds < one rounding ``step``) and Flower's rounded
        weights ``q_i``."""
        levels = self.quantization_range
        weights = [round(n / self.max_weight * levels) / levels for n in examples if n > 0]
        if not weights or sum(weights) <= 0:
            return math.inf
        step = 2.0 * self.clipping_range / levels
        return (len(weights) * self.clipping_range + len(examples) * step) / sum(weights) * (1 + 1e-9)

    def sum_problem(self, mean: Sequence[np.ndarray], examples: Sequence[int]) -> str | None:
        """Why the unmasked mean ``mean`` cannot come from in-range vehicles with these example counts
        (not finite, or an element beyond :meth:`sum_bound`), or None."""
        for index, array in enumerate(mean):
            if not np.all(np.isfinite(array)):
                return f"array #{index} of the unmasked sum is not finite"
        peak = max((float(np.abs(a).max()) for a in mean if np.size(a)), default=0.0)
        limit = self.sum_bound(examples)
        if peak > limit:
            return (f"the unmasked mean reaches {peak:.4g}, beyond the {limit:.4g} that {len(examples)} "
                    f"vehicles within secagg.clipping_range={self.clipping_range:g} can produce")
        return None


def validate_secagg(spec: SecAggSpec, *, sampled: int, partition_sizes: Sequence[int] | None = None) -> None:
    """Raise a ValueError naming the setting for any configuration SecAgg+ cannot run (before training).

    Only what :func:`fedseg.config.parse_spec` cannot check is checked here: the settings against the
    fleet (vehicles per round, partition sizes) and one another, a float share count's range, the
    modulus being a power of 2. Each value's type and range are the spec's own (``bounded`` fields).
    Which strategies can consume a sum is the strategy registry's business (``fedseg/server/compose.py``).
    """
    if sampled < 3:
        raise ValueError(f"secagg=secaggplus needs at least 3 vehicles per round, got {sampled} "
                         "(federation.num_clients x fraction_fit, at least min_fit_clients): with 2, "
                         "each vehicle reads the other's update off the sum")
    _check_shares(spec, sampled)
    _check_fixed_point(spec, sampled)
    if spec.max_weight is not None and partition_sizes and spec.max_weight < max(partition_sizes):
        raise ValueError(f"secagg.max_weight={spec.max_weight:g} is below the {max(partition_sizes)} frames "
                         "of the largest vehicle (weights above it overflow); set it higher or to null")


def _check_shares(spec: SecAggSpec, sampled: int) -> None:
    """Shares and threshold: Flower's own limits, its ring construction, and the SecAgg+ security bound."""
    for key in ("num_shares", "reconstruction_threshold"):
        value = getattr(spec, key)
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"secagg.{key}={value}: a float is a fraction in (0, 1]; use an int for a count")
    shares, threshold = resolve_shares(spec, sampled)
    if shares > sampled:
        raise ValueError(f"secagg.num_shares={shares} exceeds the {sampled} vehicles sampled per round")
    if shares < 3:
        raise ValueError(f"secagg.num_shares={shares}: SecAgg+ needs at least 3 shares per vehicle")
    if shares < sampled and shares % 2 == 0:
        raise ValueError(f"secagg.num_shares={shares} must be odd when below the {sampled} vehicles per "
                         "round (each vehicle shares with num_shares // 2 neighbours on either side)")
    if not 2 <= threshold < shares:
        raise ValueError(f"secagg.reconstruction_threshold={threshold} must be at least 2 and below "
                         f"num_shares={shares} (a round survives num_shares - threshold dropouts "
                         "per neighbourhood)")
    if 2 * threshold <= shares:
        raise ValueError(f"secagg.reconstruction_threshold={threshold} must exceed half of "
                         f"num_shares={shares}: else a server can rebuild both secrets of one vehicle "
                         "from two disjoint halves")


def _check_fixed_point(spec: SecAggSpec, sampled: int) -> None:
    """Grid and modulus: the sum of ``sampled`` quantized vectors must not wrap around."""
    modulus = spec.modulus_range
    if modulus & (modulus - 1):
        raise ValueError(f"secagg.modulus_range={modulus} must be a power of 2, at most 2**32")
    qr = spec.quantization_range
    if qr is not None and sampled * qr >= modulus:
        raise ValueError(f"secagg.quantization_range={qr} overflows: {sampled} vehicles x {qr} >= "
                         f"modulus_range={modulus}; use at most {auto_quantization_range(sampled, modulus)} "
                         "or null")


def packed_dtype(modulus: int) -> np.dtype:
    """The narrowest unsigned integer that holds every value below ``modulus`` (a power of 2 <= 2**32)."""
    bits = int(modulus - 1).bit_length()
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def pack_masked(vectors: Sequence[np.ndarray], modulus: int) -> tuple[np.ndarray, list[int]]:
    """Flower's masked vectors (integers in ``[0, modulus)``) as one flat array of :func:`packed_dtype`,
    and their shapes (``[ndim, *shape]`` per array)."""
    dtype = packed_dtype(modulus)
    out = np.empty(sum(int(np.size(v)) for v in vectors), dtype)
    shapes: list[int] = []
    start = 0
    for v in vectors:
        flat = np.asarray(v).ravel()
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= modulus):
            raise ValueError(f"secagg: a masked value lies outside [0, {modulus}): not a SecAgg+ vector")
        out[start:start + flat.size] = flat
        start += flat.size
        shapes += [np.ndim(v), *np.shape(v)]
    return out, shapes


def unpack_masked(packed: np.ndarray, shapes: Sequence[int]) -> list[np.ndarray]:
    """The arrays :func:`pack_masked` packed, still in the packed dtype.

    Flower's workflow sums them modulo the modulus, and the packed dtype's arithmetic wraps at 2^8,
    2^16 or 2^32, a multiple of that modulus (a power of 2 no wider than the dtype), so its sums agree
    with int64 ones modulo the modulus at a fraction of the memory; unmasking then subtracts int64
    masks, which promotes to int64.
    """
    arrays, start, i = [], 0, 0
    while i < len(shapes):
        ndim = int(shapes[i])
        shape = tuple(int(d) for d in shapes[i + 1:i + 1 + ndim])
        size = math.prod(shape)
        if start + size > packed.size:
            raise ValueError(f"secagg: packed masked vector holds {packed.size} values, its shapes need more")
        arrays.append(packed[start:start + size].reshape(shape))
        start, i = start + size, i + 1 + ndim
    if start != packed.size:
        raise ValueError(f"secagg: packed masked vector holds {packed.size} values, its shapes {start}")
    return arrays
