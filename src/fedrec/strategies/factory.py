"""Build the server strategy from the config: Flower's strategies, never re-implemented.

All task models travel in one flattened ArrayRecord (see records.py), so each strategy aggregates
every task's parameters key by key: one global model per task, one round trip per round.
"""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedrec.config import FedrecConfig
from fedrec.strategies.records import ARRAYS_KEY, summed_metric
from fedrec.strategies.user_dp import UNIFORM_WEIGHT_KEY, wrap_user_dp


def make_strategy(cfg: FedrecConfig, n_clients: int) -> Strategy:
    """The named strategy (wrapped for user-level DP when configured)."""
    strategy = _base_strategy(cfg, n_clients)
    if cfg.privacy.mode == "user":
        return wrap_user_dp(strategy, cfg, n_clients)
    return strategy


def _base_strategy(cfg: FedrecConfig, n_clients: int) -> Strategy:
    """The named strategy, sampling ``fraction_train`` of ``n_clients`` each round.

    The server waits for all ``n_clients`` once, before its first round (server/rounds.py);
    after that a round needs only ``min_train_clients`` connected nodes, so a site that died
    mid-run does not stall the federation.
    """
    min_nodes = min(cfg.min_train_clients, n_clients)
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,  # evaluation is central in simulation (see server/federation.py)
        min_train_nodes=min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_nodes,  # not n_clients: a lost node must not block later rounds
        arrayrecord_key=ARRAYS_KEY,
        train_metrics_aggr_fn=aggregate_train_metrics,
        weighted_by_key=UNIFORM_WEIGHT_KEY if cfg.privacy.mode == "user" else "num-examples",
    )
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedavgm":
        return FedAvgM(**common, server_momentum=cfg.server_momentum)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.server_lr)
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=0.2)
    if cfg.strategy == "krum":
        return RepliesKrum(**common)
    raise ValueError(f"unknown strategy '{cfg.strategy}'")


class RepliesKrum(Krum):
    """Flower's Krum, assuming as many malicious nodes as the round's replies allow it to bear:
    ``(n - 3) // 4`` of ``n`` replies (half of the ``(n - 3) / 2`` Krum tolerates). Flower fixes
    the number when the strategy is built; from all the clients, a round that samples or loses
    some would compare each update only with its nearest neighbour, so two colluders sending
    one update would always be chosen."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        n = sum(1 for m in replies if not m.has_error())
        self.num_malicious_nodes = max(0, (n - 3) // 4)
        return super().aggregate_train(server_round, replies)


def aggregate_train_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted means of losses; sums of counts and seconds (total work done this round)."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    weights = [float(m[weighted_by_key]) for m in records]  # type: ignore[arg-type]
    out: dict[str, float] = {"clients": float(len(records))}
    for key in records[0]:
        values = [float(m[key]) for m in records]  # type: ignore[arg-type]
        if key == weighted_by_key or summed_metric(key):
            out[key] = sum(values)
        else:  # a loss is nan where a client's Poisson batches were all empty: skip it
            seen = [(w, v) for w, v in zip(weights, values, strict=True) if math.isfinite(v)]
            part = sum(w for w, _ in seen)
            out[key] = sum(w * v for w, v in seen) / part if part > 0 else math.nan
    return MetricRecord(out)  # type: ignore[arg-type]
