"""The vehicle's mods: Flower's SecAgg+ (its masked vector packed for the wire), the update encoding, and
Flower's central-DP clipping (fixed or adaptive).

``fedseg/clients/client_app.py`` lists them once, outermost first, in ``VEHICLE_MODS``, and Flower's
``ClientApp`` chains them. The ClientApp is a module-level object, but whether a run uses SecAgg+, a
codec or central DP is only known from ``context.run_config``: each mod is listed as
``when(applies, mod)``, where ``applies`` asks the run's settings (parsed once per run,
``fedseg.settings.settings_of``); in a run it does not apply to, the mod passes every message through.
For a training message that is the chain of Flower's ``fl-dp-sa`` example plus the update encoding:

* SecAgg+: ``secure_aggregation_mod (secaggplus_mod, packed on the wire) -> encode_update_mod (delta +
  codec + range check) -> fixedclipping_mod -> client``;
* otherwise: ``encode_update_mod (codec) -> fixedclipping_mod -> client`` (no encoding for ``none``);

``adaptiveclipping_mod`` takes ``fixedclipping_mod``'s place under ``privacy.clipping=adaptive``.

Clipping sees the weights it expects (it computes the update itself); the codec then turns the
clipped weights into the encoded update (``fedseg/clients/codecs.py``: why after clipping, and how the
clipping bound survives it), which SecAgg+ masks; the server decodes it and adds the global weights
back (``fedseg/server/codecs.py``, ``fedseg/server/secagg.py``). Flower's ``secaggplus_mod`` sends its masked
vector as int64 arrays; :func:`secure_aggregation_mod` packs them to the modulus' width for the
wire, and ``fedseg/server/secagg.py`` unpacks them before Flower's workflow reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import FitRes, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat

from fedseg.clients.codecs import encode_reply
from fedseg.compression import Arrays
from fedseg.packing import PACKED, pack_content, unpack_content
from fedseg.privacy import CentralDPSpec
from fedseg.secagg import PACKED_RECORD, PACKED_SHAPES, SecAggSpec, check_secagg_range, pack_masked
from fedseg.settings import RunSettings, settings_of


def packed_transport_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: a message whose arrays came packed (the server's ``PackingGrid``, :mod:`fedseg.packing`) is
    unpacked for everything inside, and its reply packed the same way."""
    if not msg.has_content() or PACKED not in msg.content.config_records:
        return call_next(msg, ctxt)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, ctxt)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def when(applies: Callable[[RunSettings], bool], mod: Mod) -> Mod:
    """``mod`` in the runs whose settings ``applies`` to; in any other run, a pass-through."""

    @functools.wraps(mod)
    def chosen(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if applies(settings_of(ctxt.run_config)):
            return mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    return chosen


def uses_secagg(settings: RunSettings) -> bool:
    """SecAgg+ runs: the vehicles answer Flower's four SecAgg+ stages."""
    return isinstance(settings.secagg, SecAggSpec)


def sends_encoded_update(settings: RunSettings) -> bool:
    """Runs whose vehicles send an encoded update, not their weights: SecAgg+ (whose sum is of deltas) or
    a codec that encodes."""
    return uses_secagg(settings) or settings.compression.sends_update


def uses_fixed_clipping(settings: RunSettings) -> bool:
    """Central-DP runs with a fixed norm: the server's DifferentialPrivacyClientSideFixedClipping sends it."""
    return isinstance(settings.privacy, CentralDPSpec) and settings.privacy.clipping == "fixed"


def uses_adaptive_clipping(settings: RunSettings) -> bool:
    """Central-DP runs with adaptive clipping: the server's ...AdaptiveClipping sends the round's norm, and
    the vehicle answers with its update clipped to it and whether it was within it."""
    return isinstance(settings.privacy, CentralDPSpec) and settings.privacy.clipping == "adaptive"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer the four SecAgg+ stages with Flower's ``secaggplus_mod``.

    Only stage 2 calls the mods inside it (the encoded update, checked against the fixed-point range
    first: :func:`encode_update_mod`); its masked vector travels packed (:func:`pack_masked_vector`).
    Non-training messages pass through.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    return pack_masked_vector(secaggplus_mod(msg, ctxt, call_next), ctxt)


def pack_masked_vector(reply: Message, ctxt: Context) -> Message:
    """Move a stage-2 reply's masked vector (Flower: a list of int64 ``.npy`` bytes in a config
    record) into one ArrayRecord array of the modulus' width, its shapes into the config record."""
    if reply.has_error() or not reply.has_content():
        return reply
    config = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if config is None or Key.MASKED_PARAMETERS not in config:
        return reply
    modulus = int(cast(int, ctxt.state.config_records[RECORD_KEY_STATE]["mod_range"]))
    vectors = [bytes_to_ndarray(b) for b in cast(list[bytes], config.pop(Key.MASKED_PARAMETERS))]
    packed, shapes = pack_masked(vectors, modulus)
    config[PACKED_SHAPES] = shapes
    reply.content.array_records[PACKED_RECORD] = ArrayRecord([packed])
    return reply


def encode_update_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Replace the vehicle's weights by the run's codec encoding of its update ``weights - global``
    (:func:`fedseg.clients.codecs.encode_reply`; the update itself for ``none`` under SecAgg+).

    Under SecAgg+ it runs inside ``secaggplus_mod`` (stage 2) and the encoding joins the secure sum
    (:func:`join_secure_sum`).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    settings = settings_of(ctxt.run_config)
    encoded = encode_reply(settings, ctxt, fitins, fitres)
    if uses_secagg(settings):
        # Flower quantizes a 0-d array to an int32 scalar and its sum comes out wrong (a BatchNorm step
        # counter moving by 1 unmasked as 130): 0-d arrays join as 1-element ones; the server reshapes.
        encoded = [np.atleast_1d(a) for a in encoded]
        join_secure_sum(ctxt, fitres, encoded)
    fitres.parameters = ndarrays_to_parameters(encoded)
    out.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return out


def join_secure_sum(ctxt: Context, fitres: FitRes, encoded: Arrays) -> None:
    """Refuse values SecAgg+ would clip; a vehicle that skipped training joins with weight 0.

    ``secaggplus_mod``'s state in ``ctxt.state`` holds this round's ``clipping_range`` and ``max_weight``
    as the server sent them in stage 0. With weight 0 for a vehicle whose privacy budget is spent,
    the secure sum equals the plain average over the vehicles that trained (the server's recorder
    leaves skipped vehicles out the same way).
    """
    if fitres.metrics.get("skipped"):
        fitres.num_examples = 0
    # secaggplus_mod's saved state (field names of Flower's SecAggPlusState): what stage 0 configured.
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]
    max_weight = float(cast(float, protocol["max_weight"]))
    clipping_range = float(cast(float, protocol["clipping_range"]))
    check_secagg_range(encoded, examples=fitres.num_examples, max_weight=max_weight,
                       clipping_range=clipping_range)
