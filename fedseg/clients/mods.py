"""Client mods: Flower's SecAgg+, update compression and central-DP clipping, chosen once per run.

The ``ClientApp`` is a module-level object, but whether a run uses SecAgg+, a codec or client-level
DP is only known from ``context.run_config``; :func:`run_mods` looks up the run's parsed settings
(cached per run, ``fedseg.settings.settings_of``) and the mod chain built for them (:func:`mods_for`,
cached too), which for a training message is the chain of Flower's ``fl-dp-sa`` example plus the
update codec:

* SecAgg+: ``secaggplus_mod (packed on the wire) -> delta + codec + range check -> fixedclipping_mod
  -> client``;
* otherwise: ``compression_mod -> fixedclipping_mod -> client`` (no ``compression_mod`` for ``none``).

Clipping sees the weights it expects (it computes the update itself); the codec then turns the
clipped weights into the encoded update (``fedseg/clients/codecs.py``: why after clipping, and how the
clipping bound survives it), which SecAgg+ masks; the server decodes it and adds the global weights
back (``fedseg/server/codecs.py``, ``fedseg/server/secagg.py``). Flower's ``secaggplus_mod`` sends its masked
vector as int64 arrays; :func:`secure_aggregation_mod` packs them to the modulus' width for the
wire, and ``fedseg/server/secagg.py`` unpacks them before Flower's workflow reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import cast

from flwr.app import ArrayRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat

from fedseg.clients.codecs import compression_mod, encode_reply
from fedseg.privacy import CentralDPSpec
from fedseg.secagg import PACKED_RECORD, PACKED_SHAPES, SecAggSpec, check_secagg_range, pack_masked
from fedseg.settings import RunSettings, settings_of

Mod = Callable[[Message, Context, ClientAppCallable], Message]


@functools.lru_cache(maxsize=8)
def mods_for(settings: RunSettings) -> tuple[Mod, ...]:
    """The run's mods, outermost first: SecAgg+ (with the codec inside) or the codec, then clipping."""
    mods: list[Mod] = []
    if isinstance(settings.secagg, SecAggSpec):
        mods.append(secure_aggregation_mod)
    elif settings.compression.sends_update:
        mods.append(compression_mod)
    if isinstance(settings.privacy, CentralDPSpec):
        # The clipping norm comes from the server's DifferentialPrivacyClientSideFixedClipping wrapper.
        mods.append(fixedclipping_mod)
    return tuple(mods)


def chain(mods: Sequence[Mod], call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` wrapped by ``mods`` (the first one outermost), as Flower's ClientApp chains them."""
    for mod in reversed(mods):
        call_next = functools.partial(_call_mod, mod, call_next)
    return call_next


def _call_mod(mod: Mod, call_next: ClientAppCallable, msg: Message, ctxt: Context) -> Message:
    return mod(msg, ctxt, call_next)


def run_mods(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The one mod the ClientApp lists: the chain :func:`mods_for` built for this run."""
    return chain(mods_for(settings_of(ctxt.run_config)), call_next)(msg, ctxt)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer the four SecAgg+ stages with Flower's ``secaggplus_mod``, the delta codec inside it.

    Only the masked stage-2 vector carries the update; it is the codec's output, checked against the
    fixed-point range first, and travels packed (:func:`pack_masked_vector`). Non-training messages
    pass through.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)

    def encode_then_next(inner_msg: Message, inner_ctxt: Context) -> Message:
        return delta_encoding_mod(inner_msg, inner_ctxt, call_next)

    return pack_masked_vector(secaggplus_mod(msg, ctxt, encode_then_next), ctxt)


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


def delta_encoding_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Replace the vehicle's weights by the codec's encoding of ``weights - global`` (the update itself
    for ``none``) and refuse values SecAgg+ would clip.

    Runs inside ``secaggplus_mod`` (stage 2), whose state in ``ctxt.state`` holds this round's
    ``clipping_range`` and ``max_weight`` as the server sent them in stage 0. A vehicle that skipped
    training (privacy budget spent) joins with weight 0, so the secure sum equals the plain average
    over the vehicles that trained (the server's recorder leaves skipped vehicles out the same way).
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    if fitres.metrics.get("skipped"):
        fitres.num_examples = 0
    delta = encode_reply(settings_of(ctxt.run_config), ctxt, fitins, fitres)
    # secaggplus_mod's saved state (field names of Flower's SecAggPlusState): what stage 0 configured.
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]
    max_weight = float(cast(float, protocol["max_weight"]))
    clipping_range = float(cast(float, protocol["clipping_range"]))
    check_secagg_range(delta, examples=fitres.num_examples, max_weight=max_weight,
                       clipping_range=clipping_range)
    fitres.parameters = ndarrays_to_parameters(delta)
    out.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return out
