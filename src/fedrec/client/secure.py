"""A client's side of secure aggregation: train as usual, hand the protocol the delta.

``fedrec.secagg.flower.handle_secagg`` runs the protocol stages and calls ``secure_update``
in the masked-input stage. The update is trained (and, under DP, clipped and noised, with its
ledger lines written) exactly as in a plain round; what is masked is its difference from the
global model. Metrics and ledger lines travel in the clear beside the masked vector. Under
distributed DP noise the update is only private inside a sum of ``privacy.min_contributors``
clients: ``contributors_needed`` tells ``handle_secagg`` so, and a client whose round has a
lower threshold (below which no client unmasks) refuses it before training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Context, Message

from fedrec.config import from_json
from fedrec.secagg.flower import ClientUpdate


def update_delta(local: ArrayRecord, glob: ArrayRecord) -> dict[str, np.ndarray]:
    """Local minus global weights, per key (the vector the protocol sums)."""
    if list(local.keys()) != list(glob.keys()):
        raise ValueError("the trained model's keys differ from the global model's")
    return {k: local[k].numpy().astype(np.float64) - glob[k].numpy() for k in glob}


def secure_update(
    train: Callable[[Message, Context], Message], msg: Message, context: Context
) -> ClientUpdate:
    """Train on ``msg`` with the plain handler; a refusal or failure drops this client."""
    from fedrec.strategies.records import ARRAYS_KEY  # imports torch: only the training stage

    reply = train(msg, context)
    if reply.has_error():
        raise ValueError(f"not contributing this round: {reply.error.reason}")
    records = {k: reply.content[k] for k in ("metrics", "ledger") if k in reply.content}
    return ClientUpdate(update_delta(reply.content[ARRAYS_KEY], msg.content[ARRAYS_KEY]), records)


def contributors_needed(msg: Message) -> int:
    """The fewest updates a sum must hold for this client's to be private in it: the run's
    ``privacy.min_contributors`` under distributed DP noise, else 0 (no such need)."""
    config = msg.content.config_records.get("config")
    raw = config.get("fedrec") if config is not None else None
    if raw is None:  # not a fedrec training message (no run config): nothing shared
        return 0
    return from_json(str(raw)).privacy.noise_contributors
