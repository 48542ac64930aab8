"""The server's work, independent of how it was started (simulation or a SuperLink).

Each round the sampled clients train all task models; the strategy aggregates each task's keys
into that task's global model; the server evaluates every global model on the validation users,
logs one metrics line per task, checkpoints (server/checkpoint.py; ``resume`` continues from the
last checkpoint, server/resume.py), and stops cleanly when too few clients are left to train.
Malformed updates are screened out before aggregation (strategies/screen.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig, fusion_fit_mode
from fedrec.rundir import RunDir, append_metrics
from fedrec.scoring import evaluate_model
from fedrec.secagg.params import SecAggConfig, SecAggError
from fedrec.server.checkpoint import Progress, mark_round_started, save_checkpoint
from fedrec.server.fusion import FederatedFusion, SiteDPFusion, federated_fusion, site_dp_fusion
from fedrec.server.prompt_grid import prompt
from fedrec.server.resume import resume_state
from fedrec.server.rounds import TooFewClients, run_rounds, wait_for_nodes
from fedrec.server.secure_grid import SecureAggregationGrid
from fedrec.strategies import Observed, RoundLog, make_screen, make_strategy
from fedrec.strategies.records import pack, unpack_into
from fedrec.workload import build_workload

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    models: dict
    rounds_completed: int  # rounds aggregated into the models (skipped ones not counted)
    stopped_early: str | None
    rounds: dict[int, RoundLog]
    seconds: float
    eval_seconds: float
    per_round: list[dict] = field(default_factory=list)
    fusion: FederatedFusion | None = None  # when cfg.fusion_fit == "federated"
    secure_rounds: dict[int, dict[str, float]] | None = None  # protocol metrics per round
    resumes: list[dict] = field(default_factory=list)  # one entry per resume (server/checkpoint.py)
    skipped_rounds: list[int] = field(default_factory=list)  # begun, never aggregated (resume.py)
    # {node id: registered user count} the screen capped weights at (deployed runs with counts, simulations with register_users;
    # in a resumed run, those of the resumed part)
    registered_users: dict[int, int] = field(default_factory=dict)
    # the DP fusion fit of a deployed record-level run: each site's own release (client/dp_fusion.py)
    site_fusion: SiteDPFusion | None = None


OnRound = Callable[[int, list[dict], RoundLog], None]


def run_federation(
    grid: Grid,
    cfg: FedrecConfig,
    run: RunDir,
    on_round: OnRound | None = None,
    *,
    resume: bool = False,
    registered: Callable[[Grid], Mapping[int, int]] | None = None,
    deployed: bool = False,
) -> FederationResult:
    """Train ``cfg.rounds`` rounds (from the run's last checkpoint when ``resume``).
    ``registered``: the grid's nodes -> their partners' registered user counts, which cap the
    FedAvg weight each reply states (deployed runs: ``fedrec.deploy.registry``).
    ``deployed``: the clients are partner sites keeping their own ledgers, so a DP fusion fit
    is their releases, asked for after the last round (``site_dp_fusion``)."""
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    grid = prompt(grid)  # replies seen within a second, not Flower's 3-s poll (deployed runs)
    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    strategy = Observed(
        make_strategy(cfg, work.partition.n_clients),
        screen=make_screen(cfg),
        # under secure aggregation every survivor's reply holds the same mean: no weight counts
        registered=None if cfg.secure_aggregation else registered,
    )
    train_config = ConfigRecord(
        {"fedrec": cfg.to_json(), "run-id": run.path.name, "ledger-path": str(run.ledger.resolve())}
    )
    user_ledger = (
        UserLevelLedger(cfg, strategy.inner, run, strategy) if cfg.privacy.mode == "user" else None
    )
    arrays, progress = pack(models), Progress()
    if resume:
        arrays, progress = resume_state(run, cfg, strategy, user_ledger, arrays)
        unpack_into(arrays, models)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> list[dict]:
        rlog = strategy.rounds.get(server_round, RoundLog(server_round))
        if rlog.replies < min(cfg.min_train_clients, work.partition.n_clients):
            raise TooFewClients(
                f"round {server_round}: only {rlog.replies} client(s) trained "
                f"({len(rlog.failures)} refused or failed, {len(rlog.rejected)} rejected); "
                f"at least {cfg.min_train_clients} needed"
            )
        if user_ledger is not None:
            user_ledger.after_round(server_round)
        t0 = time.perf_counter()
        unpack_into(arrays, models)
        rows = []
        for task, model in models.items():
            metrics = evaluate_model(model, work.valid, full_ranking=False)
            rows.append(
                {
                    "round": server_round,
                    "task": task,
                    "split": "valid",
                    "train_loss": rlog.metrics.get(f"{task}.loss"),
                    **metrics,
                }
            )
        progress.eval_seconds += time.perf_counter() - t0
        append_metrics(run, rows)
        return rows

    start, before = time.perf_counter(), progress.seconds

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        """Evaluate, then checkpoint, then report: a crash in ``on_round`` loses nothing."""
        rows = evaluate_fn(server_round, arrays)
        progress.round, progress.seconds = server_round, before + time.perf_counter() - start
        progress.rows.extend(rows)
        progress.rounds[server_round] = strategy.rounds[server_round]
        save_checkpoint(run, cfg, arrays, strategy, progress)
        if on_round is not None:
            on_round(server_round, rows, progress.rounds[server_round])

    stopped = None
    sgrid = secure_grid(grid, cfg, run) if cfg.secure_aggregation else None
    try:
        wait_for_nodes(grid, work.partition.n_clients, cfg.round_timeout)
        run_rounds(
            strategy,
            sgrid or grid,
            arrays,
            rounds=range(progress.round + 1, cfg.rounds + 1),
            timeout=cfg.round_timeout,
            train_config=train_config,
            after_round=after_round,
            before_round=lambda server_round: mark_round_started(run, server_round),
            min_nodes=min(cfg.min_train_clients, work.partition.n_clients),
        )
    except (TooFewClients, PrivacyBudgetExhausted, SecAggError) as err:
        # SecAggError: too few clients survived a round's protocol (dropouts; or, under
        # distributed noise, clients refusing a round they already released, which a resume
        # skips: server/resume.py): a clean stop, not a crash
        stopped = str(err)
        log.warning("federation stopped early: %s", err)
    seconds = before + time.perf_counter() - start
    fusion = None
    if fusion_fit_mode(cfg) == "federated" and progress.round > 0:
        fusion = federated_fusion(grid, cfg, models)
    site_fusion = None
    # the sites' own releases when they keep their ledgers (deployed: the run's stays empty);
    # `flwr run` on a local simulation writes the run's ledger, and the server fits there
    sites_keep_ledgers = not (run.ledger.exists() and run.ledger.stat().st_size > 0)
    if deployed and sites_keep_ledgers and fusion_fit_mode(cfg) == "dp" and progress.round > 0:
        site_fusion = site_dp_fusion(grid, cfg, models, run)
    skipped = [r for entry in progress.resumes for r in entry.get("skipped_rounds", [])]
    return FederationResult(
        models,
        progress.round - len(skipped),
        stopped,
        {**progress.rounds, **strategy.rounds},
        seconds,
        progress.eval_seconds,
        progress.rows,
        fusion,
        sgrid.rounds if sgrid else None,
        resumes=progress.resumes,
        skipped_rounds=skipped,
        registered_users=strategy.registered_counts,
        site_fusion=site_fusion,
    )


def secure_grid(grid: Grid, cfg: FedrecConfig, run: RunDir) -> SecureAggregationGrid:
    """The grid through which Flower's strategy gets only sums (fedrec.server.secure_grid)."""
    floor = cfg.privacy.noise_contributors
    return SecureAggregationGrid(grid, SecAggConfig(min_threshold=floor), run.path.name)


class UserLevelLedger:
    """The server's ledger of DP-FedAvg releases (user-level DP: the server adds the noise).

    One entry per round in which Flower's DP wrapper actually released a noised aggregate (its
    accountant counted it), with the cumulative epsilon of our accountant; Flower's own RDP
    accountant's figure is kept beside it for the summary. Under adaptive clipping the entry
    holds the round's effective noise multiplier (update and clipped-count noise together) and
    the norm that round clipped to (strategies/user_dp.py), and with client-side clipping the
    screen's bound on honest updates (``observed.screen``) follows that norm.
    """

    def __init__(self, cfg: FedrecConfig, wrapper, run: RunDir, observed=None) -> None:
        from fedrec.privacy import ClientPrivacyState, Ledger

        self.cfg, self.wrapper, self.observed = cfg, wrapper, observed
        from fedrec.strategies.user_dp import USER_LEVEL_ACCOUNTANT

        self.state = ClientPrivacyState(accountant=USER_LEVEL_ACCOUNTANT)
        self.ledger = Ledger(run.ledger, run.path.name)
        self.released = 0

    def after_round(self, server_round: int) -> None:
        from fedrec.privacy import LedgerEntry
        from fedrec.strategies.user_dp import release_of

        self.follow_clipping_norm()
        releases = self.wrapper.accountant.num_releases
        if releases == self.released:
            return
        self.released = releases
        p = self.cfg.privacy
        noise_multiplier, clipping_norm, mechanism = release_of(self.wrapper)
        self.state.record("all", noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
        self.ledger.append(
            LedgerEntry.from_state(
                self.state,
                client="federation",
                task="all",
                round=server_round,
                clipping_norm=clipping_norm,
                delta=p.delta,
                budget_epsilon=p.epsilon,
                mechanism=mechanism,
            )
        )

    def follow_clipping_norm(self) -> None:
        """Bound the next round's client-clipped updates by the norm it will clip to."""
        screen = getattr(self.observed, "screen", None)
        if self.cfg.privacy.clipping != "adaptive" or screen is None or screen.norm_bound is None:
            return
        self.observed.screen = replace(screen, norm_bound=self.wrapper.clipping_norm)
