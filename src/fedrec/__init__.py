"""fedrec: privacy-preserving federated recommenders on Flower and Opacus."""

__version__ = "0.1.0"
