"""Client mods: Flower's own, attached only when the round asks for them.

Flower's ``fixedclipping_mod`` and ``adaptiveclipping_mod`` reply with an error when the round's
ConfigRecord carries no clipping norm, so they cannot sit on ``@app.train`` unconditionally
(record-level and non-private runs send none). ``user_dp_clipping`` delegates to one of them
exactly when the server's client-side wrapper sent a norm, and is a no-op otherwise: to
``adaptiveclipping_mod`` (which also reports whether it clipped) when the round is marked
``ADAPTIVE_CLIPPING_KEY`` by fedrec's adaptive wrapper (strategies/user_dp.py), else to
``fixedclipping_mod``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

ADAPTIVE_CLIPPING_KEY = "dp-adaptive-clipping"


def user_dp_clipping(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update to the norm the server sent (client-side DP-FedAvg)."""
    configs = list(msg.content.config_records.values())
    if not any(KEY_CLIPPING_NORM in rec for rec in configs):
        return call_next(msg, ctxt)
    if any(rec.get(ADAPTIVE_CLIPPING_KEY) for rec in configs):
        return adaptiveclipping_mod(msg, ctxt, call_next)
    return fixedclipping_mod(msg, ctxt, call_next)
