"""Update compression codecs: what a vehicle's update becomes on the wire.

One registry, ``CODECS``, mirrored one to one by ``conf/compression/*.yaml``. ``none`` sends the
weights as Flower's float32 arrays. Every other codec encodes the *update* ``local - global`` (the
server adds its global arrays back): an update is small and centred, so halving (``fp16``) or
quantizing (``int8``) it loses far less than doing so to the weights, and sparsifying (``topk``,
``randk``) it means "leave the other coordinates as they are". ``bytes_up`` in ``metrics.jsonl`` stays
the encoded arrays' real serialized size; the global model still goes down in float32.

A codec is a spec with ``encode(update, like, seed=, rng=)`` and ``decode(encoded, like, seed=)``
(``like``: the global arrays, whose shapes and dtypes both sides know); integer buffers (BatchNorm's
step counters) always travel whole. Sparse codecs send arrays smaller than ``dense_below`` whole too
(biases and norm layers: a few KB in all, and the ones that move most). Codecs with error feedback
keep on the vehicle what they did not send (``residual``) and add it to the next update, so the sum
of what a vehicle sends tracks the sum of its true updates.

Under SecAgg+ the server only sees a sum, so a codec must be decodable from the sum of its outputs
(``secagg_refusal`` says why one is not): ``randk`` is, because all vehicles draw the same coordinates
from the round's seed, which the server picks and sends in the fit config (``SEED_KEY``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from fedseg.config import bounded, parse_choice

SEED_KEY = "compression_seed"  # fit-config key of the round's shared randk seed
Arrays = list[np.ndarray]


def _is_float(like: np.ndarray) -> bool:
    return np.asarray(like).dtype.kind == "f"


def _int_delta(update: np.ndarray) -> np.ndarray:
    """An integer buffer's update, whole (step counters: exact, and a few bytes)."""
    return np.asarray(np.rint(np.asarray(update, np.float64)), np.int64)


@dataclass(frozen=True)
class Codec:
    """Base of every codec: the identity on updates (what SecAgg+ masks under ``compression=none``)."""

    name: ClassVar[str] = "update"
    secagg_refusal: ClassVar[str | None] = None  # why SecAgg+ cannot decode a sum of its outputs
    needs_seed: ClassVar[bool] = False  # the server sends the round's seed in the fit config
    sends_update: ClassVar[bool] = True  # False: raw weights travel (no codec mod, no decoder)

    @property
    def secagg_compatible(self) -> bool:
        return self.secagg_refusal is None

    @property
    def keeps_residual(self) -> bool:
        """Error feedback: the vehicle keeps what it did not send and adds it to its next update."""
        return False

    def encode(self, update: Sequence[np.ndarray], like: Sequence[np.ndarray], *, seed: int | None = None,
               rng: np.random.Generator | None = None) -> Arrays:
        """The update itself, in float64 (under SecAgg+ this is the delta that Flower masks).

        ``like`` are the global arrays: their dtypes say which arrays are integer buffers."""
        _check_count(update, len(like), self.name)
        return [np.asarray(u, np.float64) for u in update]

    def decode(self, encoded: Sequence[np.ndarray], like: Sequence[np.ndarray], *,
               seed: int | None = None) -> Arrays:
        """Float64 update arrays shaped like ``like``; a malformed reply raises ValueError."""
        _check_count(encoded, len(like), self.name)
        return [np.asarray(e, np.float64).reshape(np.shape(g)) for e, g in zip(encoded, like, strict=True)]


@dataclass(frozen=True)
class NoCompression(Codec):
    """``compression=none``: float32 weights as Flower serializes them (no codec mod, no decoder)."""

    name: ClassVar[str] = "none"
    sends_update: ClassVar[bool] = False


@dataclass(frozen=True)
class FP16Compression(Codec):
    """``compression=fp16``: the update in half precision (2 bytes a value, relative error 2^-11)."""

    name: ClassVar[str] = "fp16"
    secagg_refusal: ClassVar[str | None] = (
        "fp16 would save nothing: SecAgg+ quantizes every value onto its own integer grid and masks it "
        "modulo 2^32, so each value travels in 32 bits whatever the vehicle rounded it to")

    def encode(self, update: Sequence[np.ndarray], like: Sequence[np.ndarray], *, seed: int | None = None,
               rng: np.random.Generator | None = None) -> Arrays:
        _check_count(update, len(like), self.name)
        return [np.asarray(u, np.float16) if _is_float(g) else _int_delta(u)
                for u, g in zip(update, like, strict=True)]


@dataclass(frozen=True)
class Int8Compression(Codec):
    """``compression=int8``: each float array as int8 with its own scale ``max|x| / 127``.

    Stochastic rounding (up with probability equal to the fraction) makes the decoded update
    unbiased, with an error below one step (``scale``) per value. Layout: one int8 array per float
    array (integer buffers whole), then one float32 array of the scales.
    """

    name: ClassVar[str] = "int8"
    secagg_refusal: ClassVar[str | None] = (
        "int8 scales each vehicle's arrays by that vehicle's own maximum, and integers on different "
        "scales cannot be decoded from their masked sum (SecAgg+ already quantizes every vehicle onto "
        "one shared grid)")

    def encode(self, update: Sequence[np.ndarray], like: Sequence[np.ndarray], *, seed: int | None = None,
               rng: np.random.Generator | None = None) -> Arrays:
        _check_count(update, len(like), self.name)
        rng = rng if rng is not None else np.random.default_rng()
        out: Arrays = []
        scales: list[float] = []
        for u, g in zip(update, like, strict=True):
            if not _is_float(g):
                out.append(_int_delta(u))
                continue
            x = np.asarray(u, np.float32)
            peak = float(np.abs(x).max()) if x.size else 0.0
            scale = peak / 127.0 if math.isfinite(peak) else math.nan  # NaN: the server's guard rejects it
            scales.append(scale)
            y = x / scale if scale > 0 else np.zeros_like(x)
            out.append(np.asarray(stochastic_round(y, rng), np.int8) if math.isfinite(scale) else
                       np.zeros(x.shape, np.int8))
        return [*out, np.asarray(scales, np.float32)]

    def decode(self, encoded: Sequence[np.ndarray], like: Sequence[np.ndarray], *,
               seed: int | None = None) -> Arrays:
        _check_count(encoded, len(like) + 1, self.name)
        scales, floats = iter(np.asarray(encoded[-1], np.float64)), sum(_is_float(g) for g in like)
        if np.size(encoded[-1]) != floats:
            raise ValueError(f"int8: {np.size(encoded[-1])} scales for {floats} float arrays")
        return [np.asarray(e, np.float64).reshape(np.shape(g)) * (next(scales) if _is_float(g) else 1.0)
                for e, g in zip(encoded, like, strict=False)]


@dataclass(frozen=True)
class _SparseCodec(Codec):
    """Shared by ``topk`` and ``randk``: keep ``fraction`` of each float array of ``dense_below``+ values."""

    fraction: float = bounded(0.1, gt=0, le=1)
    dense_below: int = bounded(1024, ge=1)  # arrays smaller than this travel whole

    def kept(self, size: int) -> int:
        """How many of an array's ``size`` values travel."""
        return max(1, math.ceil(self.fraction * size))

    def sparse(self, like: np.ndarray) -> bool:
        return _is_float(like) and np.size(like) >= self.dense_below

    def _dense(self, u: np.ndarray, like: np.ndarray) -> np.ndarray:
        return np.asarray(u, np.float32) if _is_float(like) else _int_delta(u)


@dataclass(frozen=True)
class TopKCompression(_SparseCodec):
    """``compression=topk``: each vehicle's largest ``fraction`` of every array, with error feedback.

    Per sparse array: a bitmask of the kept positions (``n / 8`` bytes: cheaper than 32-bit indices
    once more than 1/32 of the values are kept), then the kept values in position order, as
    ``values``: float32, float16, or int8 / int4 with the array's own scale (``max / 127`` or
    ``max / 7``, stochastic rounding; int4 packs two values a byte; a third array holds the scale).
    What is not sent, and the rounding of what is, stays in the residual.
    """

    name: ClassVar[str] = "topk"
    secagg_refusal: ClassVar[str | None] = (
        "topk sends each vehicle's own top coordinates: their sum cannot be decoded from a masked sum "
        "(the server would need every vehicle's positions)")
    fraction: float = bounded(0.3, gt=0, le=1)  # with int8 values: 1/32 + 0.3/4 of float32, ~9x fewer bytes
    values: Literal["float32", "float16", "int8", "int4"] = "int8"

    @property
    def keeps_residual(self) -> bool:
        return True

    def encode(self, update: Sequence[np.ndarray], like: Sequence[np.ndarray], *, seed: int | None = None,
               rng: np.random.Generator | None = None) -> Arrays:
        _check_count(update, len(like), self.name)
        out: Arrays = []
        for u, g in zip(update, like, strict=True):
            if not self.sparse(g):
                out.append(self._dense(u, g))
                continue
            flat = np.asarray(u, np.float32).ravel()
            k = self.kept(flat.size)
            mask = np.zeros(flat.size, bool)
            mask[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]] = True
            out += [np.packbits(mask), *self._values(flat[mask], rng)]
        return out

    def _values(self, kept: np.ndarray, rng: np.random.Generator | None) -> Arrays:
        if self.values == "int4":
            return _int4_encode(kept, rng if rng is not None else np.random.default_rng())
        if self.values != "int8":
            return [np.asarray(kept, self.values)]
        steps, scales = Int8Compression().encode([kept], [kept], rng=rng)
        return [steps, scales]

    def _decode_values(self, vals: Arrays, kept: int) -> np.ndarray:
        if self.values == "int4":
            return _int4_decode(vals, kept)
        if np.size(vals[0]) != kept:
            raise ValueError(f"topk: {kept} positions but {np.size(vals[0])} values")
        if self.values == "int8":
            like_kept = np.broadcast_to(np.float32(0), np.shape(vals[0]))  # float: int8 scales it
            return Int8Compression().decode(vals, [like_kept])[0]
        return np.asarray(vals[0], np.float64)

    def decode(self, encoded: Sequence[np.ndarray], like: Sequence[np.ndarray], *,
               seed: int | None = None) -> Arrays:
        per_sparse = 3 if self.values in ("int8", "int4") else 2
        _check_count(encoded, len(like) + (per_sparse - 1) * sum(self.sparse(g) for g in like), self.name)
        parts, out = iter(encoded), []
        for g in like:
            if not self.sparse(g):
                out.append(np.asarray(next(parts), np.float64).reshape(np.shape(g)))
                continue
            mask = np.unpackbits(np.asarray(next(parts), np.uint8), count=np.size(g)).view(bool)
            flat = np.zeros(np.size(g))
            flat[mask] = self._decode_values([next(parts) for _ in range(per_sparse - 1)], int(mask.sum()))
            out.append(flat.reshape(np.shape(g)))
        return out


@dataclass(frozen=True)
class RandKCompression(_SparseCodec):
    """``compression=randk``: the same random ``fraction`` of every array on all vehicles (float32 values).

    The positions come from the round's seed (:func:`round_seed`, sent by the server), so only the
    values travel, and a SecAgg+ sum of them decodes. With ``error_feedback`` the vehicle keeps what
    it did not send and sends it when its coordinates are drawn; without it the server rescales by
    ``size / kept`` so each round's decoded update is unbiased (higher variance, no vehicle state).
    """

    name: ClassVar[str] = "randk"
    needs_seed: ClassVar[bool] = True
    error_feedback: bool = True

    @property
    def keeps_residual(self) -> bool:
        return self.error_feedback

    def positions(self, seed: int | None, index: int, size: int) -> np.ndarray:
        """Sorted positions kept of array ``index`` this round (same on every vehicle and the server)."""
        if seed is None:
            raise ValueError(f"randk needs the round's seed ({SEED_KEY!r} in the fit config)")
        rng = np.random.default_rng([seed, index])
        return np.sort(rng.choice(size, self.kept(size), replace=False))

    def encode(self, update: Sequence[np.ndarray], like: Sequence[np.ndarray], *, seed: int | None = None,
               rng: np.random.Generator | None = None) -> Arrays:
        _check_count(update, len(like), self.name)
        return [np.asarray(u, np.float32).ravel()[self.positions(seed, i, np.size(g))]
                if self.sparse(g) else self._dense(u, g) for i, (u, g) in enumerate(zip(update, like, strict=True))]

    def decode(self, encoded: Sequence[np.ndarray], like: Sequence[np.ndarray], *,
               seed: int | None = None) -> Arrays:
        _check_count(encoded, len(like), self.name)
        out = []
        for i, (e, g) in enumerate(zip(encoded, like, strict=True)):
            if not self.sparse(g):
                out.append(np.asarray(e, np.float64).reshape(np.shape(g)))
                continue
            where = self.positions(seed, i, np.size(g))
            if np.size(e) != where.size:
                raise ValueError(f"randk: array #{i} has {np.size(e)} values, the round keeps {where.size}")
            flat = np.zeros(np.size(g))
            flat[where] = np.asarray(e, np.float64).ravel() * (1.0 if self.error_feedback else
                                                                 np.size(g) / where.size)
            out.append(flat.reshape(np.shape(g)))
        return out


CompressionSpec = Codec  # what RunSettings.compression holds: one of CODECS
CODECS: dict[str, type[CompressionSpec]] = {
    "none": NoCompression, "fp16": FP16Compression, "int8": Int8Compression,
    "topk": TopKCompression, "randk": RandKCompression,
}


def parse_compression(block: Mapping[str, Any] | None) -> CompressionSpec:
    """The ``compression`` block as its registry spec."""
    return parse_choice(CODECS, block, key="compression", default="none")


def _check_count(encoded: Sequence[np.ndarray], expected: int, name: str) -> None:
    if len(encoded) != expected:
        raise ValueError(f"{name}: {len(encoded)} encoded arrays, expected {expected}")


def stochastic_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(y)`` plus 1 with probability ``y - floor(y)``: unbiased, error below 1 (float32)."""
    low = np.floor(y)
    return low + (rng.random(y.shape, dtype=np.float32) < (y - low))


def _int4_encode(x: np.ndarray, rng: np.random.Generator) -> Arrays:
    """``x`` as 4-bit steps of ``max|x| / 7`` (stochastic rounding onto -7..7, stored as 1..15), two a
    byte (the first in the low nibble; an odd count pads with a zero step), and the scale."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    scale = peak / 7.0 if math.isfinite(peak) else math.nan  # NaN: the server's guard rejects it
    steps = (np.clip(stochastic_round(np.asarray(x, np.float32) / scale, rng), -7, 7) if scale > 0
             else np.zeros(x.size))
    nibbles = np.asarray(steps, np.int64).ravel() + 8
    if nibbles.size % 2:
        nibbles = np.append(nibbles, 8)
    packed = np.asarray(nibbles[0::2] | (nibbles[1::2] << 4), np.uint8)
    return [packed, np.asarray([scale], np.float32)]


def _int4_decode(vals: Sequence[np.ndarray], count: int) -> np.ndarray:
    """The ``count`` values :func:`_int4_encode` packed, as float64."""
    packed, scale = np.asarray(vals[0], np.uint8), np.asarray(vals[1], np.float64)
    if packed.size != (count + 1) // 2 or scale.size != 1:
        raise ValueError(f"topk: {count} positions but {packed.size} bytes of int4 values and {scale.size} scales")
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()[:count]
    return (nibbles.astype(np.float64) - 8.0) * float(scale[0])


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed the server picks for a round's shared random positions (deterministic per run)."""
    return int(np.random.SeedSequence([run_seed, server_round, 0x5EED]).generate_state(1)[0])


def update_norm(update: Sequence[np.ndarray], like: Sequence[np.ndarray]) -> float:
    """L2 norm over the arrays that are float in ``like`` (what central DP's clipping bounds)."""
    return math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64)))
                         for u, g in zip(update, like, strict=True) if _is_float(g)))


def clip_update(update: Sequence[np.ndarray], like: Sequence[np.ndarray], max_norm: float) -> Arrays:
    """``update`` scaled down to L2 norm ``max_norm`` if it is longer (float arrays only)."""
    norm = update_norm(update, like)
    factor = max_norm / norm if norm > max_norm else 1.0
    return [np.asarray(u) * factor if _is_float(g) else np.asarray(u) for u, g in zip(update, like, strict=True)]


def clip_encoded(codec: Codec, encoded: Sequence[np.ndarray], like: Sequence[np.ndarray], *,
                 seed: int | None, max_norm: float) -> Arrays:
    """``encoded`` scaled so that it decodes to L2 norm at most ``max_norm`` (central DP's bound).

    Every codec decodes linearly in its float arrays (values, dense arrays, int8's scales) and keeps
    its integer ones (positions, int8 steps, counters), so scaling the floats scales the decode;
    half-precision values can round a hair past the bound, which the server's own clip removes.
    """
    norm = update_norm(codec.decode(encoded, like, seed=seed), like)
    if norm <= max_norm:
        return list(encoded)
    factor = max_norm / norm
    return [np.asarray(np.asarray(e) * factor, np.asarray(e).dtype) if np.asarray(e).dtype.kind == "f"
            else np.asarray(e) for e in encoded]
