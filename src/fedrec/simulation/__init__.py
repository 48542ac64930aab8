"""One-machine federations on Flower's simulation engine (the same ServerApp and ClientApp)."""

from fedrec.simulation.run import simulate

__all__ = ["simulate"]
