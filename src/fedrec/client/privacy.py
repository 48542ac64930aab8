"""Placeholder replaced by the DP wiring (issue 3)."""

from __future__ import annotations


class PrivacyRefusal(RuntimeError):
    """The client's next round would exceed its privacy budget: it refuses to train."""


def client_privacy(cfg, context, client, data, ledger_path=None):
    if cfg.privacy.mode != "none":
        raise ValueError(f"privacy mode '{cfg.privacy.mode}' is not available yet")
    return None
