"""Aggregation: Flower's own Message-API strategies, chosen by name, plus an observing wrapper."""

from fedrec.strategies.factory import make_strategy
from fedrec.strategies.observed import Observed, RoundLog

__all__ = ["Observed", "RoundLog", "make_strategy"]
