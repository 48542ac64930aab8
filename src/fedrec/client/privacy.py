"""Record-level DP on a client: calibrate once, refuse past the budget, ledger every release.

State lives in Flower's ``context.state`` (per node, for the whole run, in simulation and on a
SuperNode): the accountant history and the noise multipliers calibrated at the first round. The
ledger entry of each task's release is appended before the reply (and so the update) leaves.
With a ledger, the accountant is rebuilt from the client's own ledger lines every round: the
ledger outlives ``context.state`` (a restarted server or SuperNode starts with an empty one), so
a resumed run neither forgets nor double-counts a release. A reply already released for the same
round and global model is sent again, not retrained (client/replay.py).

A deployed client keeps a *site ledger* (``site``): one file for every run the site takes part
in. Its data is the same in every run, so its releases compose across runs: before each round
the client composes all the file's releases (every run) with the planned round and refuses past
its lifetime budget: the site's own (``fedrec client start --budget``, node config
``budget-epsilon``) or, without one, the run's ``privacy.epsilon``. Each run still calibrates
for its own plan and stays within the run's ``privacy.epsilon``; a later run also calibrates so
that the earlier runs plus its plan compose to at most the lifetime budget.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedrec.client.errors import PrivacyRefusal
from fedrec.client.local import RoundResult
from fedrec.client.replay import DIRNAME, ReleaseCache
from fedrec.config import FedrecConfig, fusion_reserve
from fedrec.privacy import (
    ClientPrivacyState,
    HistoryItem,
    Ledger,
    LedgerEntry,
    LedgerError,
    PrivacyError,
    calibrate_noise,
    epsilon_opacus,
    validate_budget,
    verify_chain,
)
from fedrec.privacy.accounting import history_item, smallest_delta
from fedrec.privacy.claims import Expected
from fedrec.privacy.entry import DISTRIBUTED
from fedrec.privacy.errors import check_epsilon
from fedrec.privacy.ledger import read_locked
from fedrec.strategies.records import arrays_digest
from fedrec.training import DPSGDParams, LocalData, sample_rate_for, steps_per_round

log = logging.getLogger(__name__)
STATE_KEY = "fedrec-privacy"
CALIBRATION_MARGIN = 0.999


@dataclass
class ClientPrivacy:
    cfg: FedrecConfig
    context: Context
    client: str
    plan: Mapping[str, tuple[float, int]]  # task -> (sample rate, steps per round)
    sigmas: dict[str, float]
    state: ClientPrivacyState
    ledger: Ledger | None
    seed: int
    released: frozenset[str] = frozenset()  # hashes of this client's ledger lines
    global_digest: str = ""  # of the global model this round trains from
    prior: list[HistoryItem] = field(default_factory=list)  # the site's releases in other runs
    budget: float | None = None  # the site's lifetime budget; None: the run's privacy.epsilon
    lifetime_delta: float | None = None  # the delta of the lifetime epsilon (lifetime_delta())

    @property
    def lifetime_budget(self) -> float:
        """The budget of the site's releases in all runs (this one included)."""
        return self.cfg.privacy.epsilon if self.budget is None else self.budget

    @property
    def cache(self) -> ReleaseCache | None:
        return ReleaseCache(self.ledger.path.parent / DIRNAME, self.client) if self.ledger else None

    def replay(self, server_round: int, arrays: ArrayRecord) -> RecordDict | None:
        """The reply this client already released for this round and global model, if any."""
        self.global_digest = arrays_digest(arrays)
        kept = self.cache.load(server_round, self.global_digest) if self.cache else None
        if kept is None:
            return None
        content, lines = kept
        if not all(json.loads(line).get("hash") in self.released for line in lines):
            log.warning(
                "%s: kept release of round %d is not in the ledger", self.client, server_round
            )
            return None
        if self.contributors > 0:
            # Under distributed noise the update holds only 1/contributors of the noise
            # variance; the sum hides it. Sent again into a sum over another set of clients
            # (some replied before the server died, some do not now), the server could subtract
            # the two sums and see this update nearly unnoised, which the ledger's one release
            # at the full multiplier does not account for. So this client sits the round out.
            raise PrivacyRefusal(
                f"client {self.client}: round {server_round} was already released under "
                "distributed noise; sending it again into another sum would expose it, so this "
                "client does not take part in the repeated round"
            )
        log.warning("%s: round %d already released; sending it again", self.client, server_round)
        return content

    def remember(self, server_round: int, content: RecordDict) -> None:
        """Keep the reply about to leave, in case the server dies before aggregating it."""
        if self.cache is not None and self.global_digest:
            self.cache.save(server_round, self.global_digest, content)

    def before_round(self, server_round: int) -> dict[str, DPSGDParams]:
        """The round's DP parameters, or PrivacyRefusal if it would exceed the budget."""
        p = self.cfg.privacy
        trial = copy.deepcopy(self.state)
        for task, (q, steps) in self.plan.items():
            trial.record(task, noise_multiplier=self.sigmas[task], sample_rate=q, steps=steps)
        spent = trial.composed_epsilon(delta=p.delta)
        if spent > p.epsilon:
            raise PrivacyRefusal(
                f"client {self.client}: round {server_round} would raise epsilon to {spent:.3f} "
                f"> budget {p.epsilon:g} (delta {p.delta:g}); refusing to train"
            )
        self._check_lifetime(server_round, trial)
        return {
            task: DPSGDParams(
                self.sigmas[task],
                p.clipping_norm,
                None if p.secure_rng else _noise_seed(self.seed, server_round, task),
                contributors=self.contributors,
                sample_rate=q if self.contributors else 0.0,
            )
            for task, (q, _) in self.plan.items()
        }

    @property
    def contributors(self) -> int:
        """Distributed noise: the fewest clients whose noise shares the released sum holds
        (each adds noise_multiplier / sqrt of it); 0 for local DP-SGD."""
        return self.cfg.privacy.noise_contributors

    def _check_lifetime(self, server_round: int, trial: ClientPrivacyState) -> None:
        """PrivacyRefusal if the site's releases in all runs plus this round exceed its budget."""
        p, budget = self.cfg.privacy, self.lifetime_budget
        delta = p.delta if self.lifetime_delta is None else self.lifetime_delta
        lifetime = lifetime_epsilon(self.prior, trial, self.cfg, budget, delta=delta)
        if lifetime is None:
            return
        if lifetime > budget:
            raise PrivacyRefusal(
                f"client {self.client}: round {server_round} would raise the site's lifetime "
                f"epsilon (all runs in {self.ledger.path if self.ledger else 'its ledger'}) to "
                f"{lifetime:.3f} > lifetime budget {budget:g} (delta {delta:g}); refusing to "
                "train"
            )
        log.info(
            "%s: lifetime epsilon after round %d (all runs): %.3f of %g",
            self.client,
            server_round,
            lifetime,
            budget,
        )

    def after_round(self, server_round: int, result: RoundResult) -> list[str]:
        """Record each task's release, append its ledger entry, persist the state."""
        p = self.cfg.privacy
        entries = []
        for task, stats in result.stats.items():
            self.state.record(
                task,
                noise_multiplier=self.sigmas[task],
                sample_rate=stats.sample_rate,
                steps=stats.steps,
            )
            entry = LedgerEntry.from_state(
                self.state,
                client=self.client,
                task=task,
                round=server_round,
                clipping_norm=p.clipping_norm,
                delta=p.delta,
                budget_epsilon=self.lifetime_budget,
                mechanism=DISTRIBUTED if self.contributors else "dp-sgd",
                noise_contributors=self.contributors or None,
            )
            written = self.ledger.append(entry) if self.ledger else entry.to_fields()
            entries.append(json.dumps(written, sort_keys=True))
        self._save()
        return entries

    def _save(self) -> None:
        self.context.state[STATE_KEY] = ConfigRecord(
            {"state": self.state.to_json(), "sigmas": json.dumps(self.sigmas)}
        )


def lifetime_delta(cfg: FedrecConfig, others: Sequence[Mapping]) -> float:
    """The delta a site's lifetime epsilon is stated at: the smallest of this run's and of the
    site's earlier releases (``others``: their ledger lines). The server sets each run's delta;
    at a larger one the same releases look cheaper, so a run asking for one must not lower
    what the earlier runs count against the lifetime budget (``--budget-delta`` caps it too)."""
    return smallest_delta(others, cfg.privacy.delta)


def lifetime_epsilon(
    prior: Sequence[HistoryItem],
    trial: ClientPrivacyState,
    cfg: FedrecConfig,
    budget: float,
    *,
    delta: float,
) -> float | None:
    """Epsilon of a site's releases in other runs (``prior``) composed with this run's
    (``trial``, the next release recorded), at ``delta`` (``lifetime_delta``); None when
    nothing came before this run and the lifetime ``budget`` is at least the run's epsilon: the
    run's own budget check is then the tighter one."""
    p = cfg.privacy
    if not prior and budget >= p.epsilon:
        return None
    hist = [*prior, *trial.composed_history()]
    return epsilon_opacus(hist, delta=delta, accountant=trial.accountant)  # type: ignore[arg-type]


def client_privacy(
    cfg: FedrecConfig,
    context: Context,
    client: int,
    data: LocalData,
    *,
    ledger_path: str | None,
    run_id: str,
    site: bool = False,
    site_budget: float | None = None,
    deployed: bool = False,
) -> ClientPrivacy | None:
    """The client's DP controller for record-level DP; None when DP is off or server-side.

    ``site``: ``ledger_path`` is the site's own ledger of all its runs (a deployed client);
    ``site_budget`` is its lifetime epsilon budget (default: the run's ``privacy.epsilon``).
    """
    if cfg.privacy.mode != "record":
        return None
    plan = release_plan(cfg, data.n_users)
    shares = dict(zip(cfg.tasks, cfg.privacy.task_shares, strict=False))
    # the DP fusion fit releases once more on these users after the last round: on the server
    # in simulation (fedrec.fusion.dp), by each site itself when deployed (client/dp_fusion.py)
    reserve = fusion_reserve(cfg)
    return privacy_controller(
        cfg, context, client, plan, shares, n_users=data.n_users, ledger_path=ledger_path,
        run_id=run_id, site=site, site_budget=site_budget, deployed=deployed, reserve=reserve,
    )  # fmt: skip


def release_plan(cfg: FedrecConfig, n_users: int) -> dict[str, tuple[float, int]]:
    """Each task's (sample rate, steps) per round for a record-level client of ``n_users``:
    what its calibration assumes and its ledger lines must carry (``expected_releases``)."""
    if cfg.privacy.distributed:  # one step per round, one rate at every client
        return dict.fromkeys(cfg.tasks, (cfg.privacy.sample_rate, 1))
    return {
        t: (sample_rate_for(c, n_users), steps_per_round(c, n_users)) for t, c in cfg.tasks.items()
    }


def expected_releases(
    cfg: FedrecConfig, client_users: Sequence[int], *, noise: bool = False
) -> dict[tuple[str, str], Expected]:
    """What each (client, task) training release of a simulated record-level run must carry,
    from the config and each client's users (``fedrec.privacy.claims``; ``fedrec audit`` checks
    it). ``noise``: also the noise multiplier, calibrated again as the client did (no other
    runs, the DP fusion fit set aside: ``client_privacy``); a few seconds per distinct size."""
    p = cfg.privacy
    shares = dict(zip(cfg.tasks, p.task_shares, strict=False))
    sigmas: dict[int, dict[str, float]] = {}
    problems: dict[int, str] = {}
    out = {}
    for c, n_users in enumerate(client_users):
        plan = release_plan(cfg, n_users)
        if noise and n_users not in sigmas:
            sigmas[n_users], problems[n_users] = {}, ""
            try:
                sigmas[n_users] = _calibrate(
                    cfg, plan, shares, client_name(c), [], p.epsilon, fusion_reserve(cfg)
                )
            except PrivacyError as err:  # such a client refused every round: no line is right
                problems[n_users] = f"its calibration fails, so it cannot have trained ({err})"
        for task, (q, steps) in plan.items():
            out[(client_name(c), task)] = Expected(
                mechanism=DISTRIBUTED if p.distributed else "dp-sgd",
                sample_rate=q,
                steps=steps,
                clipping_norm=p.clipping_norm,
                noise_multiplier=sigmas[n_users].get(task) if noise else None,
                noise_contributors=p.noise_contributors or None,
                problem=problems.get(n_users, ""),
            )
    return out


def client_name(client: int) -> str:
    """The name a client's releases carry in the ledger and its release cache."""
    return f"client-{client}"


def privacy_controller(
    cfg: FedrecConfig,
    context: Context,
    client: int,
    plan: Mapping[str, tuple[float, int]],
    task_shares: Mapping[str, float],
    *,
    n_users: int,
    ledger_path: str | None,
    run_id: str,
    site: bool = False,
    site_budget: float | None = None,
    deployed: bool = False,
    reserve: Sequence[HistoryItem] = (),
) -> ClientPrivacy:
    """A record-level DP controller for any set of releases per round: ``plan`` maps each task
    (a model trained under DP-SGD) to its (sample rate, steps per round), ``task_shares`` splits
    the budget over them. The task models use it through ``client_privacy``; the text adapter
    stage (fedrec.text.federated) with its single task.

    ``reserve``: releases on the same users still to come after the last round (the DP
    fusion fit); the calibration keeps the planned rounds plus them within the budget.

    ``deployed``: a partner site's client. Its DP noise always comes from OS entropy, whatever
    ``privacy.secure_rng`` says: seeded noise (the simulation default, so runs reproduce) is a
    function of the run's seed, the client's number, the round and the task, all of which the
    server knows, and a server that can recompute the noise can subtract it."""
    if deployed and not cfg.privacy.secure_rng:
        cfg = replace(cfg, privacy=replace(cfg.privacy, secure_rng=True))
    p = cfg.privacy
    validate_budget(epsilon=p.epsilon, delta=p.delta, min_records=n_users)
    if p.distributed and p.min_contributors < 2:
        raise PrivacyError(
            "privacy.noise = 'distributed' needs privacy.min_contributors >= 2 (the fewest "
            "clients whose noise shares make up the full noise); set it in the run's config"
        )
    if site_budget is not None and not site:
        raise PrivacyError("a site budget bounds a site ledger: pass site=True with it.")
    budget = None if site_budget is None else check_epsilon(site_budget, name="site budget")
    name = client_name(client)
    ledger = Ledger(ledger_path, run_id, site=site) if ledger_path else None
    lines = site_lines(ledger) if site and ledger else ledger.read() if ledger else []
    own, others = split_lines(lines, name, run_id)
    prior = [history_item(e) for e in others] if site else []
    at_delta = lifetime_delta(cfg, others) if site else p.delta
    if changed := sorted({float(e["delta"]) for e in own} - {p.delta}):
        # one run, one delta: its epsilons are checked and reported at the run's delta, and a
        # server raising it mid-run would make this run's releases look cheaper
        raise PrivacyRefusal(
            f"{name}: this run's earlier releases are at delta {changed[0]:g}; this message "
            f"asks for privacy.delta {p.delta:g}; refusing to train at another delta"
        )
    if STATE_KEY in context.state:
        rec = context.state[STATE_KEY]
        state = ClientPrivacyState.from_json(str(rec["state"]))
        sigmas = json.loads(str(rec["sigmas"]))
    else:
        state = ClientPrivacyState(accountant=p.accountant)
        lifetime = p.epsilon if budget is None else budget
        sigmas = _calibrate(cfg, plan, task_shares, name, prior, lifetime, reserve, at_delta)
        log.info("%s: calibrated noise multipliers %s", name, sigmas)
    if ledger is not None:
        state = _state_from_ledger(own, state, name, p.accountant)
    ctl = ClientPrivacy(
        cfg,
        context,
        name,
        plan,
        sigmas,
        state,
        ledger,
        cfg.seed * 100_003 + client,
        released=frozenset(str(e.get("hash")) for e in own),
        prior=prior,
        budget=budget,
        lifetime_delta=at_delta,
    )
    ctl._save()
    return ctl


def _calibrate(
    cfg: FedrecConfig,
    plan: Mapping[str, tuple[float, int]],
    task_shares: Mapping[str, float],
    client: str,
    prior: list[HistoryItem],
    budget: float,
    reserve: Sequence[HistoryItem] = (),
    at_delta: float | None = None,
) -> dict[str, float]:
    """Noise for this run's plan within the run's epsilon and, with the site's releases in other
    runs (``prior``), within the lifetime ``budget`` at ``at_delta`` (default the run's delta).
    Epsilon decreases in every task's noise, so the larger multiplier per task of the two
    calibrations meets both budgets."""
    p = cfg.privacy
    at_delta = p.delta if at_delta is None else at_delta

    def calibrate(epsilon: float, spent: list[HistoryItem], delta: float) -> dict[str, float]:
        return calibrate_noise(  # a hair under budget so float noise never refuses a planned round
            epsilon=epsilon,
            margin=CALIBRATION_MARGIN,
            delta=delta,
            sample_rate={t: q for t, (q, _) in plan.items()},
            steps_per_round={t: s for t, (_, s) in plan.items()},
            rounds=cfg.rounds,
            task_shares=task_shares,
            accountant=p.accountant,  # type: ignore[arg-type]
            spent=spent,
        )

    sigmas = calibrate(p.epsilon, list(reserve), p.delta)
    if not prior and budget >= p.epsilon:
        return sigmas
    if p.distributed:  # every client must add the same share: refusals guard the
        return sigmas  # site's lifetime budget (before_round), more noise here would not count
    spent = epsilon_opacus(prior, delta=at_delta, accountant=p.accountant)  # type: ignore[arg-type]
    try:
        lifetime = calibrate(budget, [*prior, *reserve], at_delta)
    except PrivacyError as err:
        raise PrivacyRefusal(
            f"{client}: the site's earlier runs spent lifetime epsilon {spent:.3f} of its "
            f"lifetime budget {budget:g} (delta {at_delta:g}); what remains cannot cover this "
            f"run's {cfg.rounds} rounds: {err}"
        ) from err
    log.info("%s: earlier runs spent lifetime epsilon %.3f of %g", client, spent, budget)
    return {t: max(s, lifetime[t]) for t, s in sigmas.items()}


def site_lines(ledger: Ledger) -> list[dict]:
    """Every line of a site ledger (all runs), verified; LedgerError if the chain is broken."""
    if not ledger.path.exists():
        return []
    report = verify_chain(read_locked(ledger.path), site=True)
    if not report.ok:
        raise LedgerError(
            f"site ledger {ledger.path} does not verify: "
            + "; ".join(report.problems[:5])
            + "; refusing to train"
        )
    return report.entries


def split_lines(lines: list[dict], client: str, run_id: str) -> tuple[list[dict], list[dict]]:
    """(``client``'s lines of run ``run_id``, every other line: on a site ledger, the site's
    earlier runs, which its lifetime budget composes with)."""
    own: list[dict] = []
    others: list[dict] = []
    for e in lines:
        (own if e.get("client") == client and e.get("run_id") == run_id else others).append(e)
    return own, others


def _state_from_ledger(
    entries: list[dict], kept: ClientPrivacyState, client: str, accountant: str
) -> ClientPrivacyState:
    """The accountant the ledger describes; LedgerError if the ledger lost releases."""
    state = ClientPrivacyState.from_entries(entries, accountant=accountant)
    if len(kept) > len(state):
        raise LedgerError(
            f"{client}: the ledger holds {len(state)} of this client's releases, its state "
            f"{len(kept)}: ledger lines were removed; refusing to train"
        )
    return state


def _noise_seed(seed: int, server_round: int, task: str) -> int:
    """Reproducible across processes (``hash()`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**62 - 1)
