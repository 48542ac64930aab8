"""User-level DP (cross-device): DP-FedAvg through Flower's own wrapper and accountant.

A client is one device (one user), so clipping each client's update and adding Gaussian noise to
the average protects a user's whole history (McMahan et al. 2018, DP-FedAvg). We use Flower's
``DifferentialPrivacyServerSideFixedClipping`` with its ``RdpAccountant`` (dp-accounting) and
claim **no amplification by sampling**: Flower samples a fixed number of clients with
``random.sample``, not Poisson, so the accountant composes one full-participation Gaussian
mechanism per round (``SamplingMethod.NO_AMPLIFICATION``). Averaging is unweighted (every reply
carries weight 1), as the wrapper's sensitivity C / k requires.

``privacy.clipping_side = "client"`` uses ``DifferentialPrivacyClientSideFixedClipping``: each
client clips its own update (``fedrec.client.mods.user_dp_clipping``) so an unclipped update
never leaves the device; the server still adds the noise. Adaptive clipping is not offered:
Flower 1.42's adaptive wrappers take no accountant, and an unaccounted epsilon is not reported.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedrec.config import FedrecConfig
from fedrec.privacy import calibrate_noise, validate_budget

USER_LEVEL_ACCOUNTANT = "rdp"  # Flower's RdpAccountant enforces the budget; ours must agree
UNIFORM_WEIGHT_KEY = "dp-weight"  # every client reports 1.0: unweighted averaging


def sampled_per_round(cfg: FedrecConfig, n_clients: int) -> int:
    """Clients Flower's FedAvg samples each round (its own formula)."""
    return max(int(n_clients * cfg.fraction_train), min(cfg.min_train_clients, n_clients))


def user_level_noise(cfg: FedrecConfig, n_clients: int) -> float:
    """Noise multiplier for the run's budget over all rounds, one release per round (q = 1)."""
    p = cfg.privacy
    validate_budget(epsilon=p.epsilon, delta=p.delta, min_records=n_clients)
    sigmas = calibrate_noise(  # RDP, as Flower's accountant; 1% margin for its RDP orders
        epsilon=p.epsilon * 0.99,
        delta=p.delta,
        sample_rate=1.0,
        steps_per_round=1,
        rounds=cfg.rounds,
        task_shares={"all": 1.0},
        accountant=USER_LEVEL_ACCOUNTANT,
    )
    return sigmas["all"]


def wrap_user_dp(strategy: Strategy, cfg: FedrecConfig, n_clients: int) -> Strategy:
    from flwr.serverapp import RdpAccountant

    p = cfg.privacy
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=p.delta,
            population_size=n_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=p.epsilon,
        )
    )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if p.clipping_side == "client"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        strategy,
        noise_multiplier=user_level_noise(cfg, n_clients),
        clipping_norm=p.clipping_norm,
        num_sampled_clients=sampled_per_round(cfg, n_clients),
        accountant=accountant,
    )
