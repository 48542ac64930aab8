"""fedrec's Flower ClientApp: Messages in, plain calls (client/local.py), Messages out.

A client answers an error reply (never raises across the network) when its data is unusable or
its privacy budget would be exceeded; the strategy drops and logs such replies.

This module imports no torch, models or accountants at the top: the handlers that train or
score import them (``_train``, ``fusion``). On a partner site every message runs in a fresh
ClientApp process, and most of them need none of it: three of secure aggregation's four
messages a round (key exchange and unmasking), a site's refusals of a run (its budget or
ledger settings), evaluation. Importing this module takes about a tenth of what importing the
training stack does (0.45 s against 4.3 s: ``python benchmarks/clientapp_start.py``).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.client.errors import CLIENT_FAILURES, ERROR_CODE_FAILED, error_reply
from fedrec.client.mods import user_dp_clipping
from fedrec.client.secure import contributors_needed, secure_update
from fedrec.config import FedrecConfig, from_json, fusion_fit_mode
from fedrec.secagg.flower import MESSAGE_TYPE as SECAGG_MESSAGE_TYPE
from fedrec.secagg.flower import handle_secagg

if TYPE_CHECKING:
    from fedrec.training import LocalData
    from fedrec.workload import Workload

log = logging.getLogger(__name__)
app = ClientApp()


@app.train(mods=[user_dp_clipping])
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = _site_config(from_json(str(config["fedrec"])), context)
    server_round = int(config["server-round"])
    client = int(context.node_config["partition-id"])
    if (
        reason := _site_refusal(cfg, context)
        or _no_site_ledger(cfg, context)
        or _unmasked_share(cfg, msg)
    ):
        log.error("client %d refused round %d: %s", client, server_round, reason)
        return Message(Error(code=ERROR_CODE_FAILED, reason=reason), reply_to=msg)
    ledger_path = _ledger_path(config, context)
    try:
        with _release_lock(cfg, ledger_path, client):
            return _train(msg, context, cfg, server_round, client, ledger_path)
    except CLIENT_FAILURES as err:
        return error_reply(msg, err, f"client {client} failed in round {server_round}")


def _release_lock(
    cfg: FedrecConfig, ledger_path: str | None, client: int
) -> AbstractContextManager[object]:
    """Record-level DP: one release at a time per client, from reading its ledger to keeping
    its reply (``fedrec.client.replay.release_lock``); otherwise no lock."""
    if cfg.privacy.mode != "record" or ledger_path is None:
        return nullcontext()
    from fedrec.client.privacy import client_name
    from fedrec.client.replay import release_lock

    return release_lock(ledger_path, client_name(client))


def _train(
    msg: Message,
    context: Context,
    cfg: FedrecConfig,
    server_round: int,
    client: int,
    ledger_path: str | None,
) -> Message:
    import torch

    from fedrec.client.local import build_task_models, train_round
    from fedrec.client.privacy import client_privacy
    from fedrec.strategies.records import ARRAYS_KEY, pack, unpack_into
    from fedrec.workload import build_workload

    torch.set_num_threads(1)  # one simulated client per core
    config = msg.content["config"]
    work = build_workload(cfg)
    data = _local_data(work, client, context)
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    unpack_into(msg.content[ARRAYS_KEY], models)
    privacy = client_privacy(
        cfg,
        context,
        client,
        data,
        ledger_path=ledger_path,
        run_id=str(config.get("run-id", "")),
        site="ledger-path" in context.node_config,
        site_budget=_site_budget(context),
        deployed=_deployed(context),
    )
    kept = privacy.replay(server_round, msg.content[ARRAYS_KEY]) if privacy else None
    if kept is not None:  # released before the server died: send it again (client/replay.py)
        return Message(content=kept, reply_to=msg)
    dp = privacy.before_round(server_round) if privacy else None
    result = train_round(
        cfg,
        models,
        data,
        server_round=server_round,
        client_seed=cfg.seed * 100_003 + client,
        dp=dp,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    ledger = privacy.after_round(server_round, result) if privacy else []
    metrics = MetricRecord(
        {"num-examples": data.n_users, "dp-weight": 1.0, **result.metrics(loss=privacy is None)}
    )
    content = RecordDict({ARRAYS_KEY: pack(models), "metrics": metrics})
    content["ledger"] = ConfigRecord({"entries": [str(e) for e in ledger]})
    if privacy:
        privacy.remember(server_round, content)
    return Message(content=content, reply_to=msg)


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    """Secure aggregation (fedrec.secagg): the same training; only a masked delta leaves."""
    return handle_secagg(
        msg, context, partial(secure_update, train), min_survivors=contributors_needed
    )


@app.query("fusion")
def fusion(msg: Message, context: Context) -> Message:
    """Federated fusion fit: NDCG sums of candidate weightings on this client's validation users."""
    cfg = _site_config(from_json(str(msg.content["config"]["fedrec"])), context)
    client = int(context.node_config["partition-id"])
    reason = _site_refusal(cfg, context, fusion=True)
    if not reason and cfg.privacy.mode != "none" and fusion_fit_mode(cfg) != "federated":
        # under DP the sums are a release outside the ledger: answered only when the run's
        # config asks for the federated fit, which its summary and audit then disclose
        reason = "a DP run's config does not ask for the federated fusion fit; no sums sent"
    if reason:
        log.error("client %d refused a fusion query: %s", client, reason)
        return Message(Error(code=ERROR_CODE_FAILED, reason=reason), reply_to=msg)
    import torch

    from fedrec.client.fusion_query import fusion_reply

    torch.set_num_threads(1)
    try:
        return fusion_reply(msg, cfg, None if _deployed(context) else client)
    except ValueError as err:
        log.error("client %d cannot score fusions: %s", client, err)
        return Message(Error(code=ERROR_CODE_FAILED, reason=str(err)), reply_to=msg)


@app.query("dpfusion")
def dp_fusion(msg: Message, context: Context) -> Message:
    """The DP fusion fit of a deployed record-level run: this site's noisy validation NDCG sums,
    its own Gaussian release, in its ledger before the reply leaves (fedrec.client.dp_fusion)."""
    config = msg.content["config"]
    cfg = _site_config(from_json(str(config["fedrec"])), context)
    client = int(context.node_config["partition-id"])
    reason = _site_refusal(cfg, context) or _no_site_ledger(cfg, context)
    if not reason and not (_deployed(context) and fusion_fit_mode(cfg) == "dp"):
        reason = ("only a partner site of a record-level DP run whose config asks for the DP "
                  "fusion fit releases DP fusion sums (a simulation fits it on the server)")  # fmt: skip
    if reason:
        log.error("client %d refused a DP fusion query: %s", client, reason)
        return Message(Error(code=ERROR_CODE_FAILED, reason=reason), reply_to=msg)
    ledger_path = _ledger_path(config, context)
    assert ledger_path is not None  # a deployed site without its own ledger was refused above
    try:
        with _release_lock(cfg, ledger_path, client):
            return _dp_fusion(msg, cfg, client, ledger_path, context)
    except (*CLIENT_FAILURES, KeyError, TypeError) as err:  # a malformed query, too
        return error_reply(msg, err, f"client {client} failed the DP fusion release")


def _dp_fusion(
    msg: Message, cfg: FedrecConfig, client: int, ledger_path: str, context: Context
) -> Message:
    import torch

    from fedrec.client.dp_fusion import site_fusion_release
    from fedrec.client.local import build_task_models
    from fedrec.fusion.dp import validation_sums
    from fedrec.privacy import PrivacyError
    from fedrec.strategies.records import ARRAYS_KEY, unpack_into
    from fedrec.workload import build_workload

    torch.set_num_threads(1)

    def exact_sums(cands):
        work = build_workload(cfg)
        if len(work.valid.users) == 0:
            raise ValueError(f"client {client} has no validation users to score fusions on")
        models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
        unpack_into(msg.content[ARRAYS_KEY], models)
        return validation_sums(models, work, cands)

    try:
        return site_fusion_release(
            msg, cfg, client, ledger_path=ledger_path,
            run_id=str(msg.content["config"].get("run-id", "")), budget=_site_budget(context),
            exact_sums=exact_sums,
        )  # fmt: skip
    except PrivacyError as err:  # e.g. a run id or a field the ledger refuses: nothing drawn
        raise ValueError(str(err)) from err


def _deployed(context: Context) -> bool:
    """A partner site's SuperNode (``fedrec client start`` names its data in the node config),
    not a simulated client."""
    return "data-path" in context.node_config


def _site_config(cfg: FedrecConfig, context: Context) -> FedrecConfig:
    """A deployed client reads its own data (node config 'data-path', never in the app bundle)."""
    if _deployed(context):
        return replace(cfg, dataset=str(context.node_config["data-path"]))
    return cfg


def _local_data(work: Workload, client: int, context: Context) -> LocalData:
    """Deployed, a client trains on its whole file ('partition-id' only names it: seed, ledger);
    simulated, on its partition of the shared dataset."""
    if _deployed(context):
        return work.central_data()
    return work.client_data(client)


def _ledger_path(config: ConfigRecord, context: Context) -> str | None:
    """A deployed client keeps its own site ledger of all its runs (node config), never a path
    the server names; in simulation, the run's ledger."""
    if "ledger-path" in context.node_config:
        return str(context.node_config["ledger-path"])
    if _deployed(context):  # the message's path is the server's choice
        return None
    return str(config["ledger-path"]) if "ledger-path" in config else None


def _site_refusal(cfg: FedrecConfig, context: Context, *, fusion: bool = False) -> str:
    """Why a site with a lifetime budget (``fedrec client start --budget``) refuses this
    message, or "". The run's config comes from the server; a site's budget is its own, and
    only record-level DP releases are in its ledger, under it: a run without DP (an unbounded
    epsilon) or with user-level DP (noise the server adds) is refused, and so is every fusion
    query of the non-private fits (sums no ledgered mechanism covers), whatever the run's
    config asks; the DP fusion fit's query is a ledgered release (``dp_fusion``)."""
    budget, site_delta = _site_budget(context), _site_delta(context)
    if site_delta is not None and cfg.privacy.delta > site_delta:
        # at a delta at most the site's, every epsilon the client checks is at least the one at
        # the site's delta: the lifetime (budget, site delta) holds whatever the runs' deltas
        return (
            f"this site's privacy budget is at delta {site_delta:g}; this run asks for "
            f"privacy.delta {cfg.privacy.delta:g}, above it"
        )
    if budget is None:
        return ""
    if fusion:
        return (f"this site keeps a lifetime epsilon budget ({budget:g}) and sends nothing its "
                f"ledger does not account, such as fusion sums")  # fmt: skip
    if cfg.privacy.mode != "record":
        return (f"this site keeps a lifetime epsilon budget ({budget:g}) and takes part only "
                f"in record-level DP runs, whose releases its ledger accounts; this run asks "
                f"for privacy.mode '{cfg.privacy.mode}'")  # fmt: skip
    return ""


def _no_site_ledger(cfg: FedrecConfig, context: Context) -> str:
    """Why a deployed site without a ledger of its own must not train this record-level DP run
    (it never writes at a path the server names: ``_ledger_path``), or ""."""
    own = "ledger-path" in context.node_config
    if cfg.privacy.mode == "record" and _deployed(context) and not own:
        return (
            "this site keeps no privacy ledger of its own (node config 'ledger-path'; "
            "fedrec client start --ledger) and takes part in no record-level DP run "
            "without one"
        )
    return ""


def _unmasked_share(cfg: FedrecConfig, msg: Message) -> str:
    """Why this round must not train: a distributed-noise update carries only a share of the
    noise its ledger line claims, so it may leave only masked, inside a secure sum (message
    type ``train.secagg``), whatever a server sends; "" otherwise."""
    if cfg.privacy.distributed and msg.metadata.message_type != SECAGG_MESSAGE_TYPE:
        return ("the run asks for distributed DP noise, whose update may leave only inside a "
                "secure sum, but this round's message is not secure aggregation")  # fmt: skip
    return ""


def _site_budget(context: Context) -> float | None:
    """The site's lifetime epsilon over all its runs (node config 'budget-epsilon', from
    ``fedrec client start --budget``); None: each run's ``privacy.epsilon`` bounds it."""
    return _node_float(context, "budget-epsilon")


def _site_delta(context: Context) -> float | None:
    """The largest delta the site accepts (node config 'budget-delta', from ``fedrec client
    start --budget-delta``); None: the run's ``privacy.delta``."""
    return _node_float(context, "budget-delta")


def _node_float(context: Context, key: str) -> float | None:
    """A number the site's launcher passed as text in the node config (None if absent)."""
    value = context.node_config.get(key)
    return None if value is None else float(str(value))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation is not used in simulation (the server evaluates centrally)."""
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)


__all__ = ["app"]
