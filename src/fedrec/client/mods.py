"""Client mods: Flower's own, attached only when the round asks for them.

Flower's ``fixedclipping_mod`` replies with an error when the round's ConfigRecord carries no
clipping norm, so it cannot sit on ``@app.train`` unconditionally (record-level and non-private
runs send none). ``user_dp_clipping`` delegates to it exactly when the server's
``DifferentialPrivacyClientSideFixedClipping`` wrapper sent a norm, and is a no-op otherwise.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def user_dp_clipping(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update to the norm the server sent (client-side DP-FedAvg)."""
    if any(KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values()):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
