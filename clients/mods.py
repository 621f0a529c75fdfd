"""Client mods: Flower's SecAgg+ and central-DP clipping, chosen once per run from the run's settings.

The ``ClientApp`` is a module-level object, but whether a run uses SecAgg+ or client-level DP is only
known from ``context.run_config``; :func:`run_mods` looks up the run's parsed settings (cached per
run, ``fedseg.settings.settings_of``) and the mod chain built for them (:func:`mods_for`, cached
too), which for a training message is the chain of Flower's ``fl-dp-sa`` example plus the delta
codec: ``secaggplus_mod -> delta encoding + range check -> fixedclipping_mod -> client``. Clipping
sees the weights it expects (it computes the update itself); the codec then turns the clipped
weights into the update that SecAgg+ masks (the server adds the global weights back:
``server/secagg.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import cast

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedseg.fixedpoint import SecAggSpec, check_secagg_range, encode_delta
from fedseg.privacy import CentralDPSpec
from fedseg.settings import RunSettings, settings_of

Mod = Callable[[Message, Context, ClientAppCallable], Message]


@functools.lru_cache(maxsize=8)
def mods_for(settings: RunSettings) -> tuple[Mod, ...]:
    """The run's mods, outermost first: SecAgg+ (with the delta codec inside) then update clipping."""
    mods: list[Mod] = []
    if isinstance(settings.secagg, SecAggSpec):
        mods.append(secure_aggregation_mod)
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

    Only the masked stage-2 vector carries the update; it is the delta codec's output, checked
    against the fixed-point range first. Non-training messages pass through.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)

    def encode_then_next(inner_msg: Message, inner_ctxt: Context) -> Message:
        return delta_encoding_mod(inner_msg, inner_ctxt, call_next)

    return secaggplus_mod(msg, ctxt, encode_then_next)


def delta_encoding_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Replace the vehicle's weights by ``weights - global`` and refuse values SecAgg+ would clip.

    Runs inside ``secaggplus_mod`` (stage 2), whose state in ``ctxt.state`` holds this round's
    ``clipping_range`` and ``max_weight`` as the server sent them in stage 0. A vehicle that skipped
    training (privacy budget spent) joins with weight 0, so the secure sum equals the plain average
    over the vehicles that trained (the server's recorder leaves skipped vehicles out the same way).
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    if fitres.metrics.get("skipped"):
        fitres.num_examples = 0
    delta = encode_delta(parameters_to_ndarrays(fitres.parameters), global_arrays)
    # secaggplus_mod's saved state (field names of Flower's SecAggPlusState): what stage 0 configured.
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]
    max_weight = float(cast(float, protocol["max_weight"]))
    clipping_range = float(cast(float, protocol["clipping_range"]))
    check_secagg_range(delta, examples=fitres.num_examples, max_weight=max_weight,
                       clipping_range=clipping_range)
    fitres.parameters = ndarrays_to_parameters(delta)
    out.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return out
