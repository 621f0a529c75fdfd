"""Client mods: Flower's SecAgg+ and central-DP clipping, switched on by the run config.

The ``ClientApp`` is a module-level object, but whether a run uses SecAgg+ or client-level DP is only
known from ``context.run_config`` when a message arrives; so each mod here reads the config and
either routes through Flower's own mod or calls the next one directly. Use them in this order::

    ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod, central_dp_clipping_mod])

which gives, for a training message, the chain of Flower's ``fl-dp-sa`` example plus the delta codec:
``secaggplus_mod -> delta encoding + range check -> fixedclipping_mod -> client``. Clipping sees the
weights it expects (it computes the update itself); the codec then turns the clipped weights into
the update that SecAgg+ masks (the server adds the global weights back: ``server/secagg.py``).
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedseg.config import from_run_config
from fedseg.fixedpoint import SecAggSpec, check_secagg_range, encode_delta


def _block(context: Context, name: str) -> dict[str, Any]:
    """One block of the run config (the flattened Hydra config), e.g. ``secagg`` or ``privacy``."""
    return dict(from_run_config(context.run_config).get(name) or {})


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Under ``secagg=secaggplus``, answer the four SecAgg+ stages with Flower's ``secaggplus_mod``.

    Only the masked stage-2 vector carries the update; it is the delta codec's output, checked
    against the fixed-point range first. Any other run, or any non-training message, passes through.
    """
    secagg = SecAggSpec.from_block(_block(ctxt, "secagg"))
    if msg.metadata.message_type != MessageType.TRAIN or secagg is None:
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


def central_dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Under ``privacy=central``, clip the vehicle's update with Flower's ``fixedclipping_mod``.

    The clipping norm comes from the server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper
    in each training message; with any other privacy setting this mod does nothing.
    """
    if _block(ctxt, "privacy").get("name") == "central":
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
