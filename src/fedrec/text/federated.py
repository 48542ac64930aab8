"""Federated LoRA fine-tuning of the text encoder under DP-SGD: a Flower ClientApp and server loop.

Each round the server sends the global adapters (one ArrayRecord of the LoRA A/B arrays, nothing
else); each client loads them into its own frozen encoder, trains one round of
:class:`~fedrec.text.adapter.AdapterTrainer` on its users with per-user DP-SGD, appends a ledger
entry (task ``text-adapter``) and replies with its adapters and ``num-examples``; Flower's FedAvg
averages the replies. The encoder's own weights never leave a party: everyone loads the same
public model.

Privacy is the task models' record-level DP (fedrec.client.privacy): the noise multiplier is
calibrated once, at a client's first round, for all ``rounds`` planned rounds from its budget;
the accountant lives in ``context.state`` and is rebuilt from the ledger every round; a round
that would exceed the budget is refused with an error reply (code 4001).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrec.client.errors import CLIENT_FAILURES, ERROR_CODE_FAILED, error_reply
from fedrec.client.local import RoundResult
from fedrec.client.privacy import (
    ClientPrivacy,
    _noise_seed,
    privacy_controller,
)
from fedrec.config import FedrecConfig, from_json
from fedrec.text.adapt import (
    ADAPTER_TASK,
    AdaptConfig,
    LocalAdapter,
    as_tensors,
    local_adapter,
    train_local,
    user_histories,
)
from fedrec.text.adapter import load_adapter_state
from fedrec.text.items import item_texts
from fedrec.workload import build_workload

log = logging.getLogger(__name__)
ARRAYS_KEY = "arrays"  # FedAvg's default arrayrecord_key

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local adapter training; an error reply on refusal or unusable data."""
    if "data-path" in context.node_config:  # a partner site: there is no deployed adapter
        # stage, so this app neither reads its data nor bypasses its site ledger and budget
        reason = "the adapter stage does not run on partner sites"
        return Message(Error(code=ERROR_CODE_FAILED, reason=reason), reply_to=msg)
    torch.set_num_threads(1)  # one simulated client per core
    config = msg.content["config"]
    cfg, acfg = from_json(str(config["fedrec"])), AdaptConfig.from_json(str(config["adapter"]))
    server_round = int(str(config["server-round"]))
    client = int(str(context.node_config["partition-id"]))
    try:
        arrays, metrics = local_round(
            cfg,
            acfg,
            msg.content.array_records[ARRAYS_KEY],
            client=client,
            server_round=server_round,
            context=context,
            ledger_path=str(config["ledger-path"]) if "ledger-path" in config else None,
            run_id=str(config.get("run-id", "")),
        )
    except CLIENT_FAILURES as err:
        return error_reply(msg, err, f"client {client} failed in adapter round {server_round}")
    return Message(RecordDict({ARRAYS_KEY: arrays, "metrics": metrics}), reply_to=msg)


def local_round(
    cfg: FedrecConfig,
    acfg: AdaptConfig,
    arrays: ArrayRecord,
    *,
    client: int,
    server_round: int,
    context: Context,
    ledger_path: str | None,
    run_id: str,
) -> tuple[ArrayRecord, MetricRecord]:
    """Load the global adapters, train under DP (if ``cfg.privacy.mode`` is 'record'), ledger."""
    work = build_workload(cfg)
    histories = user_histories(work.client_data(client))
    local = local_adapter(cfg.text.model, acfg, tuple(item_texts(work.dataset)), cfg.seed)
    load_adapter_state(local.model, {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()})
    n_users = local.usable_users(histories)
    tcfg = acfg.train_config(n_users)
    privacy = adapter_privacy(
        cfg,
        context,
        client,
        (tcfg.sample_rate, tcfg.steps),
        n_users=n_users,
        ledger_path=ledger_path,
        run_id=run_id,
    )
    dp = privacy.before_round(server_round)[ADAPTER_TASK] if privacy else None
    seed = _noise_seed(cfg.seed * 100_003 + client, server_round, "text-adapter/batches")
    stats = train_local(local, histories, tcfg, seed=seed, dp=dp)
    if privacy:
        privacy.after_round(server_round, RoundResult({ADAPTER_TASK: stats}))
    metrics = MetricRecord(
        {
            "num-examples": stats.examples,
            "steps": float(stats.steps),
            "train-seconds": stats.seconds,
            # under DP the loss is an unnoised function of the users' data (client/local.py)
            **({} if privacy else {"loss": stats.loss}),
        }
    )
    return ArrayRecord(as_tensors(local.state())), metrics


def adapter_privacy(
    cfg: FedrecConfig,
    context: Context,
    client: int,
    plan: tuple[float, int],
    *,
    n_users: int,
    ledger_path: str | None,
    run_id: str,
) -> ClientPrivacy | None:
    """The client's DP controller for the adapter task (fedrec.client.privacy's, one task)."""
    if cfg.privacy.mode != "record":
        return None
    return privacy_controller(
        cfg, context, client, {ADAPTER_TASK: plan}, {ADAPTER_TASK: 1.0}, n_users=n_users,
        ledger_path=ledger_path, run_id=run_id,
    )  # fmt: skip


@dataclass
class AdapterRound:
    """What the server saw in one round: who replied, what travelled, the weighted loss."""

    round: int
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # array names sent to clients
    received: list[str] = field(default_factory=list)  # array names in the replies
    loss: float | None = None
    seconds: float = 0.0  # from sending the global adapters to aggregating the replies
    started: float = field(default=0.0, repr=False)


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg, noting each round's replies and array names for the summary."""

    def __init__(self, n_clients: int) -> None:
        super().__init__(
            fraction_evaluate=0.0, min_train_nodes=n_clients, min_available_nodes=n_clients
        )
        self.rounds: dict[int, AdapterRound] = {}

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.rounds[server_round] = AdapterRound(
            server_round, sent=sorted(arrays), started=time.perf_counter()
        )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        rnd = self.rounds.setdefault(server_round, AdapterRound(server_round))
        ok = [m for m in replies if not m.has_error()]
        rnd.replies = len(ok)
        rnd.failures = [m.error.reason for m in replies if m.has_error()]
        rnd.received = sorted({k for m in ok for k in m.content[ARRAYS_KEY]})
        arrays, metrics = super().aggregate_train(server_round, replies)
        rnd.seconds = time.perf_counter() - rnd.started if rnd.started else 0.0
        if metrics is not None and "loss" in metrics:
            rnd.loss = float(metrics["loss"])  # type: ignore[arg-type]
        return arrays, metrics


OnAdapterRound = Callable[[AdapterRound], None]


def run_adapter_rounds(
    grid: Grid,
    cfg: FedrecConfig,
    acfg: AdaptConfig,
    local: LocalAdapter,
    *,
    n_clients: int,
    run_id: str,
    ledger_path: str,
    on_round: OnAdapterRound | None = None,
) -> tuple[ArrayRecord, AdapterFedAvg]:
    """``cfg.rounds`` rounds of FedAvg over the adapters, from ``local``'s (B = 0: the frozen
    encoder); returns the final global adapters and the strategy's per-round notes."""
    strategy = AdapterFedAvg(n_clients)
    train_config = ConfigRecord(
        {
            "fedrec": cfg.to_json(),
            "adapter": acfg.to_json(),
            "run-id": run_id,
            "ledger-path": ledger_path,
        }
    )

    def after(server_round: int, _: ArrayRecord) -> None:
        if server_round > 0 and on_round is not None:
            on_round(strategy.rounds[server_round])

    initial = ArrayRecord(as_tensors(local.state()))
    result = strategy.start(
        grid,
        initial,
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout,
        train_config=train_config,
        evaluate_fn=lambda r, a: after(r, a),  # type: ignore[func-returns-value]
    )
    return (
        result.arrays if len(result.arrays) else initial
    ), strategy  # empty: no round aggregated
