"""Aggregation: Flower's own Message-API strategies, chosen by name, plus an observing wrapper."""

from fedrec.strategies.factory import make_strategy
from fedrec.strategies.observed import Observed, RoundLog
from fedrec.strategies.screen import UpdateScreen, make_screen

__all__ = ["Observed", "RoundLog", "UpdateScreen", "make_screen", "make_strategy"]
