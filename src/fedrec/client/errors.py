"""How a ClientApp answers a round it cannot train: an error reply the server records.

A privacy refusal (the round would exceed the budget) is deliberate and logged as a warning; a
failure on bad data or a broken ledger is logged as an error. Both leave the round to the other
clients. Shared by the task models' ClientApp and the text-adapter stage's.
"""

from __future__ import annotations

import logging

from flwr.app import Error, Message

from fedrec.errors import LedgerError

log = logging.getLogger(__name__)


class PrivacyRefusal(RuntimeError):
    """The client's next round would exceed its privacy budget: it refuses to train."""


ERROR_CODE_REFUSED = 4001  # budget exhausted: a deliberate refusal, not a crash
ERROR_CODE_FAILED = 4002
CLIENT_FAILURES = (PrivacyRefusal, ValueError, FloatingPointError, LedgerError)
"""What a round may raise that becomes an error reply instead of crashing the ClientApp."""


def error_reply(msg: Message, err: Exception, what: str) -> Message:
    """The error reply to ``msg`` for ``err`` (one of CLIENT_FAILURES); ``what`` names the
    client and round for the log."""
    if isinstance(err, PrivacyRefusal):
        log.warning("%s", err)
        return Message(Error(code=ERROR_CODE_REFUSED, reason=str(err)), reply_to=msg)
    log.error("%s: %s", what, err)
    return Message(Error(code=ERROR_CODE_FAILED, reason=str(err)), reply_to=msg)
