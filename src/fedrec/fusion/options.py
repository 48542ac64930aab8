"""What a recommendation request may ask for, importable without torch (the command line's
parser and error handling need these, not the models)."""

from __future__ import annotations

from typing import Literal

from fedrec.errors import FedrecError

AUTO_IVF_ITEMS = 50_000  # "auto" recall builds an IVF index from this catalogue size up
RECALL_INDEXES = ("exact", "ivf", "auto")
RecallIndex = Literal["exact", "ivf", "auto"]


class RecommendError(FedrecError):
    """A bad request (unknown item, category or feature, k out of range, no run directory)."""
