"""The base of every error whose message is for the user to act on.

Each subpackage keeps its own error class (``DataError``, ``PrivacyError``, ...) in a light
module; all derive from :class:`FedrecError`, so the CLI catches them all without importing
the heavy modules that raise them (``fedrec audit`` should not load torch models or a text
encoder to report a bad path).
"""

from __future__ import annotations


class FedrecError(ValueError):
    """A bad input, file or setting: the one-line message names it and says how to fix it. The
    CLI prints it and exits with code 2, without a traceback."""


class LedgerError(RuntimeError):
    """The ledger file does not verify, so nothing may be appended to it. (Here, not in
    ``fedrec.privacy.ledger``, which re-exports it, so that a ClientApp can catch it without
    importing the accountants.)"""
