"""User-level DP (cross-device): DP-FedAvg through Flower's own wrappers and accountant.

A client is one device (one user), so clipping each client's update and adding Gaussian noise to
the average protects a user's whole history (McMahan et al. 2018, DP-FedAvg). We use Flower's
``DifferentialPrivacyServerSideFixedClipping`` with its ``RdpAccountant`` (dp-accounting) and
claim **no amplification by sampling**: Flower samples a fixed number of clients with
``random.sample``, not Poisson, so the accountant composes one full-participation Gaussian
mechanism per round (``SamplingMethod.NO_AMPLIFICATION``). Averaging is unweighted (every reply
carries weight 1), as the wrapper's sensitivity C / k requires.

``privacy.clipping_side = "client"`` uses ``DifferentialPrivacyClientSideFixedClipping``: each
client clips its own update (``fedrec.client.mods.user_dp_clipping``) so an unclipped update
never leaves the device; the server still adds the noise.

``privacy.clipping = "adaptive"`` uses Flower's ``DifferentialPrivacy{Server,Client}Side
AdaptiveClipping`` (client side with Flower's ``adaptiveclipping_mod``): the norm starts at
``privacy.clipping_norm`` and each round moves geometrically towards the
``target_unclipped_quantile`` of the update norms, estimated from a noised count of clipped
updates (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", Alg. 1).
The count is a release too. Andrew et al. Thm 1: update noise z_D and count noise sigma_b
(on the centred bits b - 1/2, sensitivity 1/2) together are one Gaussian mechanism with
``z = (z_D**-2 + (2 sigma_b)**-2) ** -0.5``. Flower's ``noise_multiplier`` argument *is* that
effective z (it derives z_D internally and stores z_D as ``.noise_multiplier``), so z is
calibrated to the budget exactly as with fixed clipping, accounted by an ``RdpAccountant``
that fedrec attaches, and written to the ledger as ``dp-fedavg-adaptive`` with the norm each
round clipped to. Flower 1.42's adaptive wrappers need three corrections to be that mechanism
(``_AndrewEtAl``): the norm moved the wrong way, the noise used the next round's norm, and
a round with missing replies was still released.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Final

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.exception import AggregationError, PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedrec.client.mods import ADAPTIVE_CLIPPING_KEY
from fedrec.config import ConfigError, FedrecConfig
from fedrec.privacy import calibrate_noise, validate_budget
from fedrec.privacy.claims import Expected

log = logging.getLogger(__name__)
USER_LEVEL_ACCOUNTANT: Final = "rdp"  # Flower's RdpAccountant enforces the budget; ours must agree
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


def expected_releases(cfg: FedrecConfig, n_clients: int) -> dict[tuple[str, str], Expected]:
    """What every ledger line of a user-level run with fixed clipping must carry (the server
    writes one per round: ``fedrec.server.federation``); ``fedrec.privacy.claims`` checks it.
    Adaptive clipping's norm is itself a DP output of each round: not a config value."""
    return {
        ("federation", "all"): Expected(
            mechanism="dp-fedavg",
            sample_rate=1.0,
            steps=1,
            clipping_norm=cfg.privacy.clipping_norm,
            noise_multiplier=user_level_noise(cfg, n_clients),
        )
    }


def effective_noise(update_noise: float, count_stddev: float) -> float:
    """Andrew et al. 2021, Thm 1: the one Gaussian mechanism a round of adaptive clipping is."""
    return (update_noise**-2 + (2.0 * count_stddev) ** -2) ** -0.5


def count_stddev(cfg: FedrecConfig, n_clients: int) -> float:
    """sigma_b: as configured, else the paper's expected clients per round / 20."""
    return cfg.privacy.clipped_count_stddev or sampled_per_round(cfg, n_clients) / 20


def wrap_user_dp(strategy: Strategy, cfg: FedrecConfig, n_clients: int) -> Strategy:
    p = cfg.privacy
    privacy = PrivacyConfig(
        target_delta=p.delta,
        population_size=n_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=p.epsilon,
    )
    z, k = user_level_noise(cfg, n_clients), sampled_per_round(cfg, n_clients)
    if p.clipping == "adaptive":
        return _adaptive(strategy, cfg, privacy, z, k, count_stddev(cfg, n_clients))
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if p.clipping_side == "client"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        strategy,
        noise_multiplier=z,
        clipping_norm=p.clipping_norm,
        num_sampled_clients=k,
        accountant=RdpAccountant(privacy),
    )


def _adaptive(
    strategy: Strategy, cfg: FedrecConfig, privacy: PrivacyConfig, z: float, k: int, sb: float
) -> Strategy:
    p = cfg.privacy
    if not 2 * sb > z:
        raise ConfigError(
            f"config field 'privacy.clipped_count_stddev' is {sb:g} (clients per round / 20 if "
            f"0), too small for the noise multiplier {z:.4g} the budget needs: the clipped count "
            f"alone would spend the whole round (Andrew et al. 2021, Thm 1 needs 2 x stddev > z). "
            f"Set it above {z / 2:.3g}, e.g. {max(z, 0.1):.3g}, or raise privacy.epsilon"
        )
    wrapper = AdaptiveClientSide if p.clipping_side == "client" else AdaptiveServerSide
    return wrapper(
        strategy,
        noise_multiplier=z,
        num_sampled_clients=k,
        initial_clipping_norm=p.clipping_norm,
        target_clipped_quantile=1.0 - p.target_unclipped_quantile,
        clip_norm_lr=p.clip_norm_lr,
        clipped_count_stddev=sb,
        accountant=AdaptiveClippingAccountant(privacy, clipping_norm=p.clipping_norm),
    )


class AdaptiveClippingAccountant(RdpAccountant):
    """Flower's RdpAccountant that also holds the adaptive clipping norm, itself a DP output:
    checkpoints save accountants' ``state_dict`` (strategies/state.py), so a resumed run clips
    with the norm its last checkpointed round produced."""

    def __init__(self, config: PrivacyConfig, *, clipping_norm: float) -> None:
        super().__init__(config)
        self.clipping_norm = clipping_norm

    def state_dict(self) -> dict[str, object]:
        return {**super().state_dict(), "clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: dict[str, object]) -> None:
        state = dict(state)
        norm = state.pop("clipping_norm", None)
        super().load_state_dict(state)
        if not isinstance(norm, (int, float)) or not norm > 0:
            raise ValueError(f"the saved adaptive clipping norm {norm!r} is not positive")
        self.clipping_norm = float(norm)


class _AndrewEtAl:
    """Makes Flower 1.42's adaptive wrappers the mechanism of Andrew et al. (Alg. 1), accounted.

    Flower's wrappers take no accountant, so this one keeps an ``RdpAccountant`` of the effective
    multiplier, refuses a round that would exceed the budget (as Flower's fixed wrappers do),
    and fixes three departures from the paper that break the accounting or the adaptation:

    * Flower counts *clipped* updates and sets ``C *= exp(-lr (clipped - target))``: more
      clipping shrinks the norm further, so it runs off to 0 or infinity. The paper's
      ``C *= exp(-lr (unclipped - gamma))`` is ``C *= exp(lr (clipped - (1 - gamma)))``.
    * Flower updates the norm before adding the noise, so the noise scaled with the next
      round's norm, not the one this round clipped to: a shrinking norm under-noised the
      release. The update is deferred until the noise is added.
    * Flower releases rounds with fewer replies than sampled; the count is taken over the
      public k = ``num_sampled_clients`` and centred (sum of b - 1/2, sensitivity 1/2, as Thm 1
      needs), so a round is released only with exactly k replies, as Flower's accounted fixed
      wrappers require.
    """

    accountant: AdaptiveClippingAccountant
    noise_multiplier: float
    num_sampled_clients: int
    clipped_count_stddev: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def __init__(self, *args, accountant: AdaptiveClippingAccountant, **kwargs) -> None:
        self.accountant = accountant  # first: Flower's __init__ sets clipping_norm (below)
        self.effective_noise_multiplier = float(kwargs["noise_multiplier"])
        self.round_clipping_norm = accountant.clipping_norm  # the latest release's norm
        self._next_norm: float | None = None
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    @property
    def clipping_norm(self) -> float:
        return self.accountant.clipping_norm

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self.accountant.clipping_norm = float(value)

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self.effective_noise_multiplier,
            sample_size=self.num_sampled_clients,
            population_size=self.accountant.config.population_size,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.accountant.would_exceed(self._event()):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(
                f"the next private release would exceed max_epsilon (current epsilon: "
                f"{spent.epsilon}, delta: {spent.delta})"
            )
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not validate_replies(replies, self.num_sampled_clients, strict=True):
            return None, None
        self._next_norm = None
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        except AggregationError as err:  # a client-side reply without its clipping bit
            log.warning("round %d: nothing released: %s", server_round, err)
            return None, None
        if metrics is not None and KEY_NORM_BIT in metrics:
            del metrics[KEY_NORM_BIT]  # the exact clipped fraction is not a DP output
        if not arrays or self._next_norm is None:
            return None, metrics  # nothing released: the norm and its count stay private
        self.accountant.compose(self._event())
        self.round_clipping_norm, self.clipping_norm = self.clipping_norm, self._next_norm
        return arrays, metrics

    def _noisy_fraction(self, count: int, total: int) -> float:
        noise = float(np.random.normal(0.0, self.clipped_count_stddev))
        return 0.5 + (count - total / 2 + noise) / self.num_sampled_clients

    def _geometric_update(self, clipped_fraction: float) -> None:
        step = self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile)
        self._next_norm = self.clipping_norm * math.exp(step)


class AdaptiveServerSide(_AndrewEtAl, DifferentialPrivacyServerSideAdaptiveClipping):
    """The server clips each reply to the round's adaptive norm (see ``_AndrewEtAl``)."""


class AdaptiveClientSide(_AndrewEtAl, DifferentialPrivacyClientSideAdaptiveClipping):
    """Each client clips its own update with Flower's ``adaptiveclipping_mod`` and reports
    whether it clipped; the server adds the noise (see ``_AndrewEtAl``)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ADAPTIVE_CLIPPING_KEY] = True  # fedrec.client.mods picks adaptiveclipping_mod
        return super().configure_train(server_round, arrays, config, grid)


def release_of(wrapper: Strategy) -> tuple[float, float, str]:
    """(noise multiplier to account, clipping norm used, ledger mechanism) of the latest release.

    Never the adaptive wrappers' ``noise_multiplier``: that is z_D, the update's share only.
    """
    if isinstance(wrapper, _AndrewEtAl):
        return (
            wrapper.effective_noise_multiplier,
            wrapper.round_clipping_norm,
            "dp-fedavg-adaptive",
        )
    return wrapper.noise_multiplier, wrapper.clipping_norm, "dp-fedavg"  # type: ignore[attr-defined]
