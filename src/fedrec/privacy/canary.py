"""Empirical privacy audit with canary users in one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846. The DP unit of a
fedrec client is a *user* (their history), so the canaries are synthetic users. Canary ``i`` owns
two fresh items ``a_i``, ``b_i`` appended to the catalogue (no real user touches them) and its
history repeats the transition ``a_i -> b_i``. Each canary joins the client's training users
independently with probability 1/2; the task model is trained once with DP-SGD (``train_task``).

The membership score of canary ``i`` is how much training raised the model's log-probability of
``b_i`` over the whole catalogue given the one-item history ``[a_i]``: only a model that saw
canary ``i`` has a reason to link the two items. The auditor guesses the ``k_guess`` highest
scores "in", the ``k_guess`` lowest "out", and turns the number of right guesses into an epsilon
lower bound (``empirical.epsilon_lower_bound_from_scores``, the paper's main theorem).

A sound DP-SGD run gives a bound near 0; a broken one (noise off) gives a bound above its claim.
The bound can never exceed what ``m`` canaries allow (about 4.9 for m = 1000 and the default
400 guesses at delta = 1e-5). The audit retrains with the run's model, batch size, clipping and
(epsilon, delta): it tests the DP-SGD implementation, not the models the run released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedrec.config import FedrecConfig, TaskConfig
from fedrec.data.sequences import Sequences
from fedrec.models.base import ModelSpec, TaskModel
from fedrec.models.batching import make_user_batch
from fedrec.models.registry import build_model
from fedrec.privacy.accounting import calibrate_noise
from fedrec.privacy.empirical import epsilon_lower_bound_from_scores
from fedrec.privacy.errors import PrivacyError, check_count, check_delta, check_epsilon
from fedrec.training import DPSGDParams, LocalData, sample_rate_for, steps_per_round, train_task

log = logging.getLogger(__name__)

DEFAULT_CANARIES = 1000  # bound ceiling about 4.9 with the default guesses; a few s on CPU
BETA = 0.05  # the bound holds with confidence 1 - BETA
_SCORE_CHUNK = 128  # canaries scored per forward pass


@dataclass(frozen=True)
class AuditSettings:
    """How the audited run trains. DP-SGD's guarantee holds whatever these are, so epochs and lr
    are chosen to let a run without noise memorise its canaries; the model, clipping, sampling
    and batch size are the run's own."""

    epochs: int = 4  # passes over the users; 4 memorise nearly every canary when noise is off
    lr: float = 1e-2  # Adam; above the task default so memorisation is quick when allowed
    repeats: int = 3  # a canary's history is [a, b] * repeats
    guess_share: float = 0.2  # guesses on each side as a share of m, fixed before scoring
    max_len: int | None = None  # history positions; None = the run's (fewer is faster)
    negatives: int | None = None  # negatives per position; None = the task's (fewer is faster)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.repeats < 1:
            raise PrivacyError("audit settings need epochs >= 1, repeats >= 1 and lr > 0.")
        if self.max_len is not None and self.max_len < 2 * self.repeats:
            raise PrivacyError(f"max_len must hold a canary's {2 * self.repeats} items.")
        if self.negatives is not None and self.negatives < 1:
            raise PrivacyError("negatives must be at least 1 (or None for the task's).")
        if not 0 < self.guess_share <= 0.5:
            raise PrivacyError("guess_share must be in (0, 0.5]; 0.2 is a good default.")


@dataclass(frozen=True)
class CanaryAuditResult:
    """Outcome of one audit: the claim, the bound and what it rests on."""

    claimed_epsilon: float
    lower_bound: float  # with confidence 1 - BETA the run is not (eps, delta)-DP for eps below
    m: int  # canaries
    guesses: int  # k_pos + k_neg
    correct: int  # right guesses among them
    noise_multiplier: float  # used in training (0 = no noise: DP broken)
    delta: float
    steps: int  # DP-SGD steps of the audited run
    sample_rate: float
    seconds: float

    @property
    def violated(self) -> bool:
        """True if the run demonstrably leaks more than it claims."""
        return self.lower_bound > self.claimed_epsilon


@dataclass(frozen=True)
class Canaries:
    """``m`` canary users: canary ``i`` is the history ``[a_i, b_i] * repeats``."""

    first: np.ndarray  # int64 (m,) item a_i
    second: np.ndarray  # int64 (m,) item b_i, the item the model should predict after a_i
    included: np.ndarray  # bool (m,) trained on


def make_canaries(num_items: int, m: int, rng: np.random.Generator) -> Canaries:
    """Fresh items ``num_items .. num_items + 2m - 1``, two per canary, inclusion ~ Bernoulli(1/2)."""
    items = num_items + rng.permutation(2 * m)
    return Canaries(items[:m], items[m:], rng.random(m) < 0.5)


def canary_users(
    canaries: Canaries, rows: np.ndarray, *, repeats: int, max_len: int, n_feats: int
) -> LocalData:
    """The histories ``[a_i, b_i] * repeats`` of canaries ``rows``, right-padded to ``max_len``;
    features and context all 0 (a valid value for every categorical field)."""
    length = 2 * repeats
    pattern = np.stack([canaries.first[rows], canaries.second[rows]], 1)  # (n, 2)
    n = len(rows)
    items = np.zeros((n, max_len), dtype=np.int64)
    items[:, :length] = np.tile(pattern, repeats)
    mask = np.zeros((n, max_len), dtype=bool)
    mask[:, :length] = True
    seqs = Sequences(-1 - rows.astype(np.int64), items, mask, np.zeros((n, max_len, 2), np.int64))
    return LocalData(seqs, np.zeros((n, n_feats), dtype=np.int64))


def with_canary_items(spec: ModelSpec, m: int) -> ModelSpec:
    """``spec`` with ``2m`` canary items appended to the catalogue (category 0)."""
    extra = (0,) * (2 * m)
    return replace(spec, num_items=spec.num_items + 2 * m, item_category=spec.item_category + extra)


def concat_users(a: LocalData, b: LocalData) -> LocalData:
    """Rows of ``a`` then rows of ``b`` (same history length and features)."""
    s, t = a.seqs, b.seqs
    seqs = Sequences(
        *(
            np.concatenate([getattr(s, f), getattr(t, f)])
            for f in ("users", "items", "mask", "context")
        )
    )
    return LocalData(seqs, np.concatenate([a.feats, b.feats]))


@torch.no_grad()
def membership_scores(model: TaskModel, canaries: Canaries, n_feats: int) -> np.ndarray:
    """Float (m,): log-softmax over the whole catalogue of ``b_i`` given the history ``[a_i]``."""
    model.eval()
    num_items, n_ctx = model.spec.num_items, len(model.spec.context_cards)
    out = []
    for start in range(0, len(canaries.first), _SCORE_CHUNK):
        first = canaries.first[start : start + _SCORE_CHUNK]
        n = len(first)
        users = make_user_batch(
            first[:, None],
            np.ones((n, 1), bool),
            np.zeros((n, n_feats), np.int64),
            np.zeros((n, n_ctx), np.int64),
        )
        logits = model.score(users, torch.arange(num_items).expand(n, num_items))  # (n, I)
        target = torch.as_tensor(canaries.second[start : start + n])
        out.append(torch.log_softmax(logits, -1)[torch.arange(n), target])
    return torch.cat(out).numpy().astype(float)


def run_canary_audit(
    cfg: FedrecConfig,
    *,
    client: int = 0,
    task: str = "personal",
    m: int = DEFAULT_CANARIES,
    noise_multiplier: float | None = None,
    epsilon: float,
    delta: float,
    seed: int = 0,
    k_guess: int | None = None,
    clipping_norm: float | None = None,
    settings: AuditSettings = AuditSettings(),
) -> CanaryAuditResult:
    """Audit one DP-SGD training of ``task`` on ``client``'s users plus ``m`` canary users.

    The noise multiplier is calibrated with ``calibrate_noise`` (``cfg.privacy.accountant``) so
    that the run is (``epsilon``, ``delta``)-DP over its steps, unless ``noise_multiplier`` is
    given (0 switches the noise off, so the claim is false). ``clipping_norm`` defaults to
    ``cfg.privacy.clipping_norm``; ``k_guess``, the guesses on each side, to
    ``settings.guess_share * m``. Deterministic given ``seed`` (the DP noise is seeded too).
    The sample rate follows the realised number of users, as in Opacus: it reveals how many
    canaries were included, not which.
    """
    if task not in cfg.tasks:
        raise PrivacyError(f"task {task!r} is not in the run; audit one of {', '.join(cfg.tasks)}.")
    m = check_count(m, name="m", minimum=2)
    k = check_count(
        k_guess if k_guess is not None else max(1, int(settings.guess_share * m)), name="k_guess"
    )
    if 2 * k > m:
        raise PrivacyError(f"2 * k_guess = {2 * k} exceeds the {m} canaries; lower k_guess.")
    claimed, dlt = check_epsilon(epsilon), check_delta(delta)
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise PrivacyError(f"noise_multiplier must be >= 0 or None, got {noise_multiplier!r}.")
    start = time.perf_counter()
    data, canaries, spec = _audit_data(cfg, client, m, settings, np.random.default_rng(seed))
    tcfg = replace(cfg.tasks[task], lr=settings.lr, local_epochs=settings.epochs)
    if settings.negatives is not None:
        tcfg = replace(tcfg, negatives=settings.negatives)
    q, steps = sample_rate_for(tcfg, data.n_users), steps_per_round(tcfg, data.n_users)
    sigma = _noise(noise_multiplier, claimed, dlt, q, steps, cfg.privacy.accountant)
    clip = cfg.privacy.clipping_norm if clipping_norm is None else clipping_norm
    torch.manual_seed(seed)
    model = build_model(task, replace(spec, dim=tcfg.dim))
    dp = DPSGDParams(sigma, clip, noise_seed=seed + 1)
    scores = _train_and_score(model, data, canaries, tcfg, dp, seed)
    bound = epsilon_lower_bound_from_scores(
        scores, canaries.included, k_pos=k, k_neg=k, delta=dlt, beta=BETA
    )
    correct = _correct_guesses(scores, canaries.included, k)
    seconds = time.perf_counter() - start
    result = CanaryAuditResult(claimed, bound, m, 2 * k, correct, sigma, dlt, steps, q, seconds)
    log.info("%s", format_result(result))
    return result


def _train_and_score(
    model: TaskModel,
    data: LocalData,
    canaries: Canaries,
    cfg: TaskConfig,
    dp: DPSGDParams,
    seed: int,
) -> np.ndarray:
    """Train ``model`` in place with DP-SGD; return each canary's score gain (after - before)."""
    n_feats = data.feats.shape[1]
    before = membership_scores(model, canaries, n_feats)
    train_task(model, data, cfg, seed=seed, dp=dp)
    return membership_scores(model, canaries, n_feats) - before


def _audit_data(
    cfg: FedrecConfig, client: int, m: int, settings: AuditSettings, rng: np.random.Generator
) -> tuple[LocalData, Canaries, ModelSpec]:
    """The client's real users (histories cut to ``settings.max_len``) plus the included
    canaries, the canaries, and the model spec with the canary items appended."""
    from fedrec.workload import build_workload  # heavy (pandas, data loaders): import on use

    max_len = settings.max_len or cfg.max_len
    if max_len < 2 * settings.repeats:
        raise PrivacyError(
            f"max_len {max_len} cannot hold a canary's {2 * settings.repeats} items."
        )
    work = build_workload(replace(cfg, max_len=max_len))
    if not 0 <= client < work.partition.n_clients:
        raise PrivacyError(
            f"client {client} does not exist; the run has clients 0..{work.partition.n_clients - 1}."
        )
    real = work.client_data(client)
    canaries = make_canaries(work.spec.num_items, m, rng)
    fake = canary_users(
        canaries,
        np.flatnonzero(canaries.included),
        repeats=settings.repeats,
        max_len=max_len,
        n_feats=real.feats.shape[1],
    )
    return concat_users(real, fake), canaries, with_canary_items(work.spec, m)


def _noise(
    given: float | None, epsilon: float, delta: float, q: float, steps: int, accountant: str
) -> float:
    """``given`` if set, else the multiplier that makes the run (epsilon, delta)-DP."""
    if given is not None:
        return float(given)
    sigmas = calibrate_noise(
        epsilon=epsilon,
        delta=delta,
        sample_rate=q,
        steps_per_round=steps,
        rounds=1,
        task_shares={"audit": 1.0},
        accountant=accountant,  # type: ignore[arg-type]
    )
    return sigmas["audit"]


def _correct_guesses(scores: np.ndarray, included: np.ndarray, k: int) -> int:
    """Right guesses of the top-``k`` "in", bottom-``k`` "out" rule (ties as in ``empirical``)."""
    order = np.argsort(-scores, kind="stable")
    return int(included[order[:k]].sum() + (~included[order[len(order) - k :]]).sum())


def format_result(result: CanaryAuditResult) -> str:
    """One paragraph for the CLI."""
    verdict = (
        "VIOLATED: the run leaks more than it claims"
        if result.violated
        else "consistent with the claim (an audit cannot prove DP, only refute it)"
    )
    return (
        f"Canary audit (Steinke, Nasr & Jagielski 2023): {result.m} canary users, "
        f"{result.correct}/{result.guesses} membership guesses right; empirical epsilon lower "
        f"bound {result.lower_bound:.2f} at {1 - BETA:.0%} confidence vs claimed "
        f"{result.claimed_epsilon:g} (delta {result.delta:g}, noise multiplier "
        f"{result.noise_multiplier:.3g}, {result.steps} steps at sample rate "
        f"{result.sample_rate:.3g}, {result.seconds:.0f} s): {verdict}."
    )
