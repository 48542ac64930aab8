"""A partner site's part in the DP fusion fit of a deployed record-level run.

In simulation the server holds every client's validation users and makes the fit one Gaussian
release ledgered for every client (``fedrec.fusion.dp``). Deployed, the users are on the sites
and each site keeps its own ledger, which the server cannot write. So each site makes the
release itself, on its own validation users:

* the candidates are the simulated fit's (each task model alone, and their equal-weight
  average; z-scores), G in all; each validation user adds their NDCG@10 under every candidate,
  a vector in [0, 1]^G of L2 norm at most sqrt(G);
* the site adds N(0, (sigma sqrt(G))^2) to each of its G sums (sigma = ``privacy.fusion_noise``),
  drawn here from OS entropy, and sends the noisy sums; the server adds the sites' noisy sums
  and keeps the argmax (post-processing).

Each site's release is the simulated fit's mechanism with the same ledger line (task
``fusion``, mechanism ``gaussian``, sample rate 1, one step, clipping norm sqrt(G)), private on
its own whatever the server or the other sites do. The price is noise: the server's total holds
sqrt(sites) times the noise of the central fit (README, "The fused model of a DP run is DP too",
measures the choice at that noise).

The order is a training release's: check the budget (the run's epsilon; the site's lifetime
budget over all its runs), draw, keep the noisy sums (durably, beside the site's kept training
replies, ``client/replay.py``), append the ledger line, reply. A repeated query of the same run (a
server that died and made its outputs again) gets the kept sums back, never a second draw: a
kept draw without its ledger line (a crash in between) is ledgered first; a ledgered release
whose kept sums are gone or damaged is refused, since drawing again would be a second release.
The calibration of the run's training set the release aside (``config.fusion_reserve``), so a
site that trained the planned rounds has room for it. The caller holds the site's release lock.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedrec.client.errors import PrivacyRefusal
from fedrec.client.privacy import (
    client_name,
    lifetime_delta,
    lifetime_epsilon,
    site_lines,
    split_lines,
)
from fedrec.client.replay import DIRNAME
from fedrec.config import FedrecConfig
from fedrec.errors import LedgerError
from fedrec.privacy import ClientPrivacyState, Ledger, LedgerEntry
from fedrec.privacy.accounting import history_item
from fedrec.rundir import write_json_atomic

SUMS_KEY = "dp-fusion-sums"  # the noisy sums, in the order of NAMES_KEY
NAMES_KEY = "dp-fusion-candidates"
LEDGER_KEY = "ledger"  # the release's ledger line, as training replies carry theirs


def kept_path(ledger_path: str | Path, client: str, run_id: str) -> Path:
    """Where a site keeps its noisy sums of run ``run_id``. The run id comes from the server,
    so the file is named by its hash, never by the text itself."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    return Path(ledger_path).parent / DIRNAME / f"{client}.fusion-{digest}.json"


def site_fusion_release(
    msg: Message,
    cfg: FedrecConfig,
    client: int,
    *,
    ledger_path: str,
    run_id: str,
    budget: float | None,
    exact_sums,
) -> Message:
    """This site's release of noisy validation sums for the DP fusion fit (module doc).

    ``exact_sums``: candidates -> {name: exact NDCG@10 sum over this site's validation users},
    called only when a new release is drawn. ``budget``: the site's lifetime epsilon (None: the
    run's ``privacy.epsilon``). Raises PrivacyRefusal past a budget, LedgerError on a damaged
    ledger or kept file."""
    from fedrec.fusion.dp import FUSION_TASK, candidates, expected_release

    p, name = cfg.privacy, client_name(client)
    tasks = [str(t) for t in msg.content["config"]["fusion-tasks"]]
    if not tasks or not set(tasks) <= set(cfg.tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"fusion-tasks {tasks} are not distinct tasks of the run {list(cfg.tasks)}")
    cands, fit = candidates(tasks), expected_release(cfg, tasks)
    lifetime_budget = p.epsilon if budget is None else budget
    ledger = Ledger(ledger_path, run_id, site=True)
    own, others = split_lines(site_lines(ledger), name, run_id)  # verified: LedgerError if broken
    prior = [history_item(e) for e in others]
    released = [e for e in own if e["task"] == FUSION_TASK]
    trained = [e for e in own if e["task"] != FUSION_TASK]
    _check_run(trained, cfg, lifetime_budget, name, run_id)
    path = kept_path(ledger_path, name, run_id)
    kept = _read_kept(path, cands)
    state = ClientPrivacyState.from_entries(own, accountant=p.accountant)
    if released and kept is None:
        raise PrivacyRefusal(
            f"{name}: this run's DP fusion release is in the site ledger but its kept sums "
            f"({path}) are gone; drawing the noise again would be a second release"
        )
    if kept is None:
        _check_budget(state, prior, fit.noise_multiplier, cfg, lifetime_budget, name,
                      lifetime_delta(cfg, others))
        sums = _draw(exact_sums(cands), fit.noise_multiplier * fit.clipping_norm)
        kept = (sums, fit.noise_multiplier, fit.clipping_norm)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"run_id": run_id, "noise_multiplier": fit.noise_multiplier,
                                 "sensitivity": fit.clipping_norm, "noisy_sums": sums})  # fmt: skip
    noisy, sigma, sensitivity = kept
    if released:
        entries = [json.dumps(e, sort_keys=True) for e in released]
    else:  # a new draw, or one kept by an attempt that died before its ledger line: ledgered as
        # drawn (the kept noise and sensitivity), whatever this query says
        state.record(FUSION_TASK, noise_multiplier=sigma, sample_rate=fit.sample_rate,
                     steps=fit.steps)  # fmt: skip
        entry = LedgerEntry.from_state(
            state, client=name, task=FUSION_TASK, round=max(int(e["round"]) for e in trained),
            clipping_norm=sensitivity, delta=p.delta, budget_epsilon=lifetime_budget,
            mechanism=fit.mechanism,
        )  # fmt: skip
        entries = [json.dumps(ledger.append(entry), sort_keys=True)]
    names = list(cands)
    content = RecordDict(
        {
            SUMS_KEY: ArrayRecord({SUMS_KEY: Array(np.array([noisy[n] for n in names]))}),
            NAMES_KEY: ConfigRecord({NAMES_KEY: names}),
            LEDGER_KEY: ConfigRecord({"entries": entries}),
        }
    )
    return Message(content=content, reply_to=msg)


def _check_run(
    trained: Sequence[Mapping], cfg: FedrecConfig, lifetime_budget: float, name: str, run_id: str
) -> None:
    """PrivacyRefusal unless this site trained in run ``run_id`` under the settings the query
    states: a server may ask only for the fit of a run the site took part in, at the delta and
    budget its training lines carry (a query at another delta or budget would ledger a line
    the audit cannot compose with them)."""
    if not trained:
        raise PrivacyRefusal(
            f"{name}: this site made no training release in run {run_id!r}; no fusion sums for "
            "a run it did not train in"
        )
    last = trained[-1]
    if float(last["delta"]) != cfg.privacy.delta or float(last["budget_epsilon"]) != lifetime_budget:
        raise PrivacyRefusal(
            f"{name}: the fusion query states delta {cfg.privacy.delta:g} and budget "
            f"{lifetime_budget:g}; this run trained at delta {last['delta']:g} and budget "
            f"{last['budget_epsilon']:g}"
        )


def _check_budget(
    state: ClientPrivacyState,
    prior: Sequence,
    sigma: float,
    cfg: FedrecConfig,
    lifetime_budget: float,
    name: str,
    at_delta: float,
) -> None:
    """PrivacyRefusal if the release would take this run's or the site's lifetime epsilon
    past its budget (the checks ``ClientPrivacy.before_round`` makes before a round)."""
    from fedrec.fusion.dp import FUSION_TASK

    p = cfg.privacy
    trial = copy.deepcopy(state)
    trial.record(FUSION_TASK, noise_multiplier=sigma, sample_rate=1.0, steps=1)
    spent = trial.composed_epsilon(delta=p.delta)
    if spent > p.epsilon:
        raise PrivacyRefusal(
            f"{name}: the DP fusion release would raise this run's epsilon to {spent:.3f} > "
            f"budget {p.epsilon:g} (delta {p.delta:g}); no sums sent"
        )
    lifetime = lifetime_epsilon(prior, trial, cfg, lifetime_budget, delta=at_delta)
    if lifetime is not None and lifetime > lifetime_budget:
        raise PrivacyRefusal(
            f"{name}: the DP fusion release would raise the site's lifetime epsilon to "
            f"{lifetime:.3f} > its budget {lifetime_budget:g} (delta {at_delta:g}); no sums sent"
        )


def _draw(exact: Mapping[str, float], scale: float) -> dict[str, float]:
    """The exact sums plus Gaussian noise of std ``scale``, from OS entropy (a site's noise
    must not be a function of anything the server knows)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return {n: float(v) + float(rng.normal(0.0, scale)) for n, v in exact.items()}


def _read_kept(path: Path, cands: Mapping) -> tuple[dict[str, float], float, float] | None:
    """(noisy sums, noise multiplier, sensitivity) an earlier attempt kept (None: none kept);
    LedgerError if the file is damaged or holds other candidates: its noise was drawn and maybe
    seen, so neither a second draw nor ignoring it is safe."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        noisy = {str(k): float(v) for k, v in data["noisy_sums"].items()}
        sigma, sensitivity = float(data["noise_multiplier"]), float(data["sensitivity"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"kept DP fusion sums {path} are unreadable ({exc!r})") from exc
    if sorted(noisy) != sorted(cands):
        raise LedgerError(f"{path} holds candidates {sorted(noisy)}, not {sorted(cands)}")
    return noisy, sigma, sensitivity
