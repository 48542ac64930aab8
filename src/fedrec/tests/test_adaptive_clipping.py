"""Adaptive clipping for user-level DP (issue 3): Flower's wrappers, accounted per Andrew et al.

Andrew et al. 2021, Thm 1: update noise z_D and clipped-count noise sigma_b make one Gaussian
mechanism with z = (z_D**-2 + (2 sigma_b)**-2) ** -0.5. Flower's ``noise_multiplier`` argument is
that z; the ledger must hold z (not Flower's z_D) and the norm each round clipped to.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from flwr.serverapp.strategy import dp_adaptive_clipping as flower_adaptive
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.mods import ADAPTIVE_CLIPPING_KEY, user_dp_clipping
from fedrec.config import ConfigError, load_config
from fedrec.privacy import audit_ledger, epsilon_dp_accounting, read_ledger
from fedrec.strategies import make_strategy
from fedrec.strategies.state import load_strategy_state, strategy_state
from fedrec.strategies.user_dp import (
    AdaptiveClientSide,
    AdaptiveClippingAccountant,
    AdaptiveServerSide,
    effective_noise,
    release_of,
    sampled_per_round,
    user_level_noise,
)

USER = {
    "dataset": "synthetic:merchants=2,users=30,items=300",
    "partition": "user",
    "rounds": 2,
    "fraction_train": 0.3,
    "privacy.mode": "user",
    "privacy.epsilon": 8.0,
    "privacy.delta": 1e-3,
    "privacy.clipping": "adaptive",
}
N_CLIENTS = 30  # partition "user" of 30 users


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Message() outside a running app needs them
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _cfg(**extra):
    return load_config(None, {**USER, **extra})


def test_effective_noise_known_answer() -> None:
    assert effective_noise(1.0, 0.5) == pytest.approx(2**-0.5)  # 2 sigma_b = z_D = 1
    assert effective_noise(1.0, 1e9) == pytest.approx(1.0)  # a noiseless count costs nothing more


@pytest.mark.parametrize("side", ["server", "client"])
def test_ledger_multiplier_is_the_configured_effective_one_flower_splits(side: str) -> None:
    cfg = _cfg(**{"privacy.clipping_side": side})
    wrapper = make_strategy(cfg, N_CLIENTS)
    z, k = user_level_noise(cfg, N_CLIENTS), sampled_per_round(cfg, N_CLIENTS)
    assert isinstance(wrapper, AdaptiveClientSide if side == "client" else AdaptiveServerSide)
    assert wrapper.clipped_count_stddev == pytest.approx(k / 20)  # the paper's default
    z_d = (z**-2 - (2 * wrapper.clipped_count_stddev) ** -2) ** -0.5  # solved independently
    assert wrapper.noise_multiplier == pytest.approx(z_d)  # Flower stores z_D, not z
    assert wrapper.noise_multiplier > z
    assert effective_noise(wrapper.noise_multiplier, wrapper.clipped_count_stddev) == (
        pytest.approx(z)
    )
    assert release_of(wrapper) == (z, cfg.privacy.clipping_norm, "dp-fedavg-adaptive")
    assert wrapper.target_clipped_quantile == pytest.approx(1 - 0.5)
    assert wrapper.clip_norm_lr == 0.2


def test_a_count_noise_too_small_for_the_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        make_strategy(_cfg(**{"privacy.clipped_count_stddev": 0.1}), N_CLIENTS)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"privacy.clipping": "auto"}, "privacy.clipping"),
        ({"privacy.mode": "record"}, "privacy.clipping"),
        ({"privacy.target_unclipped_quantile": 1.0}, "target_unclipped_quantile"),
        ({"privacy.target_unclipped_quantile": float("nan")}, "target_unclipped_quantile"),
        ({"privacy.clip_norm_lr": 0.0}, "clip_norm_lr"),
        ({"privacy.clipped_count_stddev": -1.0}, "clipped_count_stddev"),
    ],
)
def test_bad_adaptive_settings_are_refused(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _cfg(**bad)


def _wrapper() -> AdaptiveServerSide:
    """3 clients; the count noise is negligible (sigma_b 0.01, z 0.01)."""
    privacy = PrivacyConfig(
        target_delta=1e-3,
        population_size=10,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=1e6,
    )
    return AdaptiveServerSide(
        FedAvg(weighted_by_key="dp-weight", arrayrecord_key="arrays"),
        noise_multiplier=0.01,
        num_sampled_clients=3,
        initial_clipping_norm=1.0,
        target_clipped_quantile=0.5,
        clip_norm_lr=0.2,
        clipped_count_stddev=0.01,
        accountant=AdaptiveClippingAccountant(privacy, clipping_norm=1.0),
    )


def _replies(norm: float, n: int) -> tuple[ArrayRecord, list[Message]]:
    glob = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    out = []
    for i in range(n):
        sent = Message(RecordDict({"arrays": glob}), dst_node_id=i + 1, message_type="train")
        local = ArrayRecord({"w": Array(np.full(4, norm / 2, np.float32))})  # ||update|| = norm
        metrics = MetricRecord({"dp-weight": 1.0, "num-examples": 5})
        out.append(Message(RecordDict({"arrays": local, "metrics": metrics}), reply_to=sent))
    return glob, out


def _noise_stds(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    seen: list[float] = []
    real = flower_adaptive.add_gaussian_noise_inplace

    def spy(arrays, std):
        seen.append(std)
        real(arrays, std)

    monkeypatch.setattr(flower_adaptive, "add_gaussian_noise_inplace", spy)
    return seen


def test_all_clipped_grows_the_norm_and_the_noise_uses_the_norm_clipped_to(monkeypatch) -> None:
    stds = _noise_stds(monkeypatch)
    wrapper = _wrapper()
    wrapper.current_arrays, replies = _replies(norm=10.0, n=3)  # every update is clipped
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and KEY_NORM_BIT not in metrics
    assert stds == [pytest.approx(wrapper.noise_multiplier * 1.0 / 3)]  # C_t = 1, not C_t+1
    assert wrapper.round_clipping_norm == 1.0
    assert wrapper.clipping_norm == pytest.approx(math.exp(0.2 * 0.5), rel=0.01)  # grew
    assert wrapper.accountant.num_releases == 1
    assert wrapper.accountant.clipping_norm == wrapper.clipping_norm  # checkpointed with it


def test_flower_alone_still_moves_the_norm_the_wrong_way() -> None:
    """Canary: when Flower fixes its sign, drop the correction in ``_AndrewEtAl``."""
    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(weighted_by_key="dp-weight", arrayrecord_key="arrays"),
        noise_multiplier=0.01,
        num_sampled_clients=3,
        initial_clipping_norm=1.0,
        clipped_count_stddev=0.01,
    )
    flower.current_arrays, replies = _replies(norm=10.0, n=3)
    flower.aggregate_train(1, replies)
    assert flower.clipping_norm < 0.95  # all clipped, yet the norm shrank


def test_unclipped_updates_shrink_the_norm() -> None:
    wrapper = _wrapper()
    wrapper.current_arrays, replies = _replies(norm=0.1, n=3)
    wrapper.aggregate_train(1, replies)
    assert wrapper.clipping_norm == pytest.approx(math.exp(-0.2 * 0.5), rel=0.01)


def test_a_round_with_missing_replies_releases_nothing() -> None:
    wrapper = _wrapper()
    wrapper.current_arrays, replies = _replies(norm=10.0, n=2)  # 2 of 3 answered
    assert wrapper.aggregate_train(1, replies) == (None, None)
    assert wrapper.clipping_norm == 1.0 and wrapper.accountant.num_releases == 0


def test_the_adaptive_norm_survives_a_checkpoint() -> None:
    cfg = _cfg()
    wrapper = make_strategy(cfg, N_CLIENTS)
    wrapper.current_arrays, replies = _replies(norm=10.0, n=wrapper.num_sampled_clients)
    wrapper.aggregate_train(1, replies)
    arrays, meta = strategy_state(wrapper)
    fresh = make_strategy(cfg, N_CLIENTS)
    load_strategy_state(fresh, arrays, meta)
    assert fresh.clipping_norm == wrapper.clipping_norm != cfg.privacy.clipping_norm
    assert fresh.accountant.num_releases == 1


def test_the_screen_bounds_client_clipped_updates_by_the_adaptive_norm(tmp_path) -> None:
    """Honest clients clip to this round's norm, which may exceed privacy.clipping_norm."""
    from fedrec.rundir import RunDir
    from fedrec.server.federation import UserLevelLedger
    from fedrec.strategies import Observed, make_screen

    cfg = _cfg(**{"privacy.clipping_side": "client"})
    observed = Observed(make_strategy(cfg, N_CLIENTS), screen=make_screen(cfg))
    ledger = UserLevelLedger(cfg, observed.inner, RunDir(tmp_path), observed)
    observed.inner.clipping_norm = 1.7
    ledger.follow_clipping_norm()
    assert observed.screen is not None and observed.screen.norm_bound == 1.7


def _client_msg(config: dict) -> Message:
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _train(msg: Message, _ctx: Context) -> Message:
    local = ArrayRecord({"w": Array(np.full(4, 5.0, np.float32))})  # ||update|| = 10
    metrics = MetricRecord({"dp-weight": 1.0})
    return Message(RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_client_mod_reports_its_clipping_bit_only_when_adaptive(adaptive: bool) -> None:
    config = {KEY_CLIPPING_NORM: 0.5, "server-round": 1}
    if adaptive:
        config[ADAPTIVE_CLIPPING_KEY] = True
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = user_dp_clipping(_client_msg(config), ctx, _train)
    assert not reply.has_error()
    w = reply.content.array_records["arrays"]["w"].numpy()
    assert float(np.linalg.norm(w)) == pytest.approx(0.5, rel=1e-5)
    metrics = reply.content.metric_records["metrics"]
    assert (metrics.get(KEY_NORM_BIT) == 1) if adaptive else (KEY_NORM_BIT not in metrics)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_user_level_dp_is_accounted_in_the_ledger_end_to_end(tmp_path, side) -> None:
    from fedrec.simulation import simulate

    cfg = _cfg(**{"privacy.clipping_side": side, "out": str(tmp_path / "run")})
    z = user_level_noise(cfg, N_CLIENTS)
    run, summary = simulate(cfg, baselines=False)
    assert summary["rounds"] == 2 and not summary["stopped_early"]
    entries = read_ledger(run.ledger)
    assert [e["round"] for e in entries] == [1, 2]
    assert all(e["mechanism"] == "dp-fedavg-adaptive" for e in entries)
    assert all(e["noise_multiplier"] == z and e["sample_rate"] == 1.0 for e in entries)
    assert entries[0]["clipping_norm"] == cfg.privacy.clipping_norm
    assert entries[1]["clipping_norm"] != entries[0]["clipping_norm"]  # it adapted
    one, two = (epsilon_dp_accounting([(z, 1.0, n)], delta=1e-3, method="rdp") for n in (1, 2))
    assert entries[0]["epsilon"] == pytest.approx(one, rel=1e-3)
    assert entries[1]["epsilon"] == pytest.approx(two, rel=1e-3)  # cumulative, not per round
    assert one < two <= 8.0
    result = audit_ledger(run.ledger, run_id=run.path.name)
    assert result.ok, result.problems
    assert result.rows[-1].recomputed["dp-accounting-rdp"] == pytest.approx(two, rel=1e-3)
