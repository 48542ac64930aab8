"""Pure privacy accounting for Poisson-subsampled Gaussian DP-SGD (no state, no I/O).

A *history* is a sequence of ``(noise_multiplier, sample_rate, steps)`` triples, the format of
Opacus accountants' ``history``. Each triple is ``steps`` compositions of the sampled Gaussian
mechanism (Abadi et al. 2016, "Deep Learning with Differential Privacy"; Mironov, Talwar, Zhang
2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"). Composition is commutative,
so histories are canonicalised (equal mechanisms merged, sorted) before accounting: every caller
that holds the same multiset of steps gets bit-for-bit the same epsilon, whatever the order.

Two independent implementations are wrapped:

* Opacus: PRV (Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy") and
  RDP (Mironov 2017, with the conversion of Balle et al. 2020, "Hypothesis Testing
  Interpretations and Renyi Differential Privacy").
* Google's dp-accounting: PLD (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the Dots")
  and RDP.

Both RDP implementations use the same orders (dp-accounting's default grid, which extends
Opacus' grid to 1024) so they agree to about 1e-5 (relative) also when the optimal order is large.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as PLD
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as _opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedrec.privacy.errors import (
    PrivacyError,
    check_accountant,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive,
    check_sample_rate,
)

HistoryItem = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps) as in Opacus' accountant history."""
History = Sequence[HistoryItem]
Canonical = tuple[HistoryItem, ...]


def history_item(entry: Mapping[str, Any]) -> HistoryItem:
    """The accountant's item of one ledger line (its release's noise, sample rate and steps)."""
    return (entry["noise_multiplier"], entry["sample_rate"], entry["steps"])


def smallest_delta(entries: Iterable[Mapping[str, Any]], *deltas: float) -> float:
    """The delta a site's lifetime epsilon is stated at: the smallest of its ledger lines' and
    of ``deltas`` (a run about to release). At a larger delta the same releases look cheaper,
    and each run's delta is the server's to choose."""
    return min([*deltas, *(float(e["delta"]) for e in entries)])


PLD_DISCRETIZATION = 1e-4
"""dp-accounting's PLDAccountant default ``value_discretization_interval``, used by
``_epsilon_pld`` (tests compare it with the accountant's own figures)."""
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in DEFAULT_RDP_ORDERS)
MAX_NOISE_MULTIPLIER = 50.0
"""Beyond this the model learns nothing useful; a budget needing more is refused."""
CALIBRATION_TOLERANCE = 0.01
"""Epsilon precision of Opacus' per-task calibration (``get_noise_multiplier``)."""
SCALE_PRECISION = 1e-3
"""Relative precision of the common noise scale found by bisection."""

T = TypeVar("T")


def _memoise_opacus_rdp() -> None:
    """Cache Opacus' RDP of one sampled-Gaussian step, ``_compute_rdp(q, sigma, alpha)``.

    Opacus recomputes it for every order at every query: its RDP accountant, and the PRV
    accountant's domain sizing, which runs an RDP accountant over the whole history and again
    over each single step. At fractional orders and sample rates above about 0.3 each value is
    a 1000-term series: calibrating a small client (a bisection of PRV queries) and auditing a
    24-line ledger spent most of their time recomputing the same few (q, sigma, alpha); with
    this cache and ``_sampled_gaussian_pld`` they ran 1.8x and 2.4x faster
    (benchmarks/accounting_cost.py).
    The function is pure and its arguments are floats, so a cache returns bit-for-bit what
    Opacus computes (tests/test_privacy_accounting.py checks it against the uncached one).
    Opacus has no hook for this; it calls the module-level name, which is what is replaced.
    """
    fn = _opacus_rdp._compute_rdp
    if not hasattr(fn, "cache_info"):
        _opacus_rdp._compute_rdp = functools.lru_cache(maxsize=65536)(fn)


_memoise_opacus_rdp()


def canonical_history(history: History) -> Canonical:
    """Validate a history, merge equal mechanisms (summing steps), drop empty ones, sort."""
    steps: dict[tuple[float, float], int] = {}
    for i, item in enumerate(history):
        if len(item) != 3:
            raise PrivacyError(f"history[{i}] must be (noise_multiplier, sample_rate, steps).")
        sigma = check_noise_multiplier(item[0], name=f"history[{i}].noise_multiplier")
        q = check_sample_rate(item[1], name=f"history[{i}].sample_rate")
        n = check_count(item[2], name=f"history[{i}].steps", minimum=0)
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in steps.items() if n > 0))


def epsilon_opacus(
    history: History, *, delta: float, accountant: Literal["prv", "rdp"] = "prv"
) -> float:
    """Epsilon at ``delta`` of a history with Opacus' PRV or RDP accountant (0 if empty)."""
    canon = canonical_history(history)
    return _epsilon_opacus(canon, check_delta(delta), check_accountant(accountant))


@functools.lru_cache(maxsize=4096)
def _epsilon_opacus(canon: Canonical, delta: float, accountant: str) -> float:
    if not canon:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(canon)
    with warnings.catch_warnings():  # raised (also inside PRV's domain sizing) only for
        # noise so large that epsilon is negligible
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "prv":
            return float(acc.get_epsilon(delta=delta))
        return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def epsilon_dp_accounting(
    history: History, *, delta: float, method: Literal["pld", "rdp"] = "pld"
) -> float:
    """Epsilon at ``delta`` with Google's dp-accounting, an implementation independent of Opacus.

    Each history item becomes ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma)), steps)``; the items are composed with ``ComposedDpEvent``. Both
    accountants use the add-or-remove-one neighbouring relation, as Opacus does.
    """
    canon = canonical_history(history)
    return _epsilon_dp_accounting(
        canon, check_delta(delta), check_accountant(method, allowed=("pld", "rdp"))
    )


@functools.lru_cache(maxsize=4096)
def _epsilon_dp_accounting(canon: Canonical, delta: float, method: str) -> float:
    if not canon:
        return 0.0
    if method == "pld":
        return _epsilon_pld(canon, delta)
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(dp_event(canon))
    return float(acc.get_epsilon(delta))


def dp_event(canon: Canonical) -> dp_accounting.DpEvent:
    """The history as one dp-accounting event: each item is ``SelfComposedDpEvent(
    PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``, composed in order."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
            )
            for sigma, q, n in canon
        ]
    )


def _epsilon_pld(canon: Canonical, delta: float) -> float:
    """What ``PLDAccountant().compose(dp_event(canon))`` computes (tests check bit for bit),
    with each sampled Gaussian's PLD built once per (sigma, q) instead of once per query.

    Building that PLD was about half of an audit: every cumulative line, and every client's
    per-task and composed epsilon, rebuilt the same few. The steps the accountant takes for a
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), n)`` are repeated
    here in its order: identity, then ``compose(pld(sigma, q).self_compose(n))`` per item."""
    pld = PLD.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, n in canon:
        pld = pld.compose(_sampled_gaussian_pld(sigma, q).self_compose(n))
    return float(pld.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=1024)
def _sampled_gaussian_pld(sigma: float, q: float) -> PLD.PrivacyLossDistribution:
    return PLD.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def validate_budget(*, epsilon: float, delta: float, min_records: int) -> None:
    """Refuse a budget that protects nothing: epsilon <= 0, delta <= 0, or delta >= 1/n.

    With delta >= 1/n a mechanism that publishes one random user's data verbatim is
    (0, delta)-DP (Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy",
    Sec. 2.3), so delta must be well below 1/n for the n protected units (users) at a client.
    """
    check_epsilon(epsilon)
    d = check_delta(delta)
    n = check_count(min_records, name="min_records")
    if d >= 1.0 / n:
        suggestion = 10.0 ** math.floor(math.log10(0.1 / n))
        raise PrivacyError(
            f"delta={d:g} must be < 1/min_records = {1.0 / n:g}: a delta this large allows "
            f"leaking a whole user; set delta well below 1/{n} (e.g. {suggestion:g})."
        )


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float | Mapping[str, float],
    steps_per_round: int | Mapping[str, int],
    rounds: int,
    task_shares: Mapping[str, float],
    accountant: Literal["prv", "rdp"] = "prv",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    spent: History = (),
    margin: float = 1.0,
) -> dict[str, float]:
    """Noise multiplier per task so that all tasks over all rounds together stay in budget.

    The budget (epsilon, delta) covers every task of the client: the tasks train on the same
    users, so their mechanisms compose. The calibration has two steps:

    1. Shares set the relative noise. Task ``t`` alone is calibrated with Opacus'
       ``get_noise_multiplier`` (RDP, a valid upper bound and fast) to
       ``(share_t * epsilon, share_t * delta)`` over its ``steps_per_round * rounds`` steps. By
       basic composition (Dwork & Roth 2014, Thm 3.16) these sigmas already meet
       (epsilon, delta) together.
    2. Basic composition is loose, so one common factor ``c`` multiplies all sigmas; bisection
       finds the smallest ``c`` for which the *composed* epsilon of all tasks' histories in one
       ``accountant`` is <= epsilon at delta. The result is checked once more before returning,
       so the guarantee rests on the composed accounting alone, never on step 1.

    ``task_shares`` are positive weights (normalised to sum 1). ``sample_rate`` and
    ``steps_per_round`` may be per task. Raises ``PrivacyError`` if any task would need a noise
    multiplier above ``max_noise_multiplier``.

    ``spent``: releases already made on the same records (e.g. a site's earlier runs). It is
    composed into every evaluation, so ``spent`` plus the planned rounds stay within (epsilon,
    delta) together: tight composition of the whole history, not ``epsilon - eps(spent)``.

    ``margin`` (at most 1): calibrate to ``margin * epsilon``, a hair under the budget, while
    errors state the budget as given.
    """
    stated, dlt = check_epsilon(epsilon), check_delta(delta)
    eps = stated * margin
    n_rounds = check_count(rounds, name="rounds")
    acct = check_accountant(accountant)
    cap = check_positive("max_noise_multiplier", max_noise_multiplier, fix="use e.g. 50")
    shares = _normalised_shares(task_shares)
    rates = _per_task(sample_rate, shares, "sample_rate", check_sample_rate)
    per_round = _per_task(
        steps_per_round, shares, "steps_per_round", lambda v, name: check_count(v, name=name)
    )

    prior = list(canonical_history(spent))

    def composed(sigmas: Mapping[str, float], n: int) -> float:
        hist = [*prior, *((sigmas[t], rates[t], per_round[t] * n) for t in shares)]
        return epsilon_opacus(hist, delta=dlt, accountant=acct)  # type: ignore[arg-type]

    _refuse_if_infeasible(
        eps, cap, n_rounds, lambda n: composed({t: cap for t in shares}, n),
        epsilon_opacus(prior, delta=dlt, accountant=acct) if prior else 0.0,  # type: ignore[arg-type]
        stated,
    )
    base = {
        t: _sigma_alone(eps * s, dlt * s, rates[t], per_round[t] * n_rounds)
        for t, s in shares.items()
    }
    scale = _smallest_scale(lambda c: composed({t: c * b for t, b in base.items()}, n_rounds), eps)
    sigmas = {t: scale * b for t, b in base.items()}
    if composed(sigmas, n_rounds) > eps:
        raise PrivacyError("internal: calibrated noise does not meet the budget; please report.")
    worst = max(sigmas, key=lambda t: sigmas[t])
    if sigmas[worst] > cap:
        raise PrivacyError(
            f"task {worst!r} needs noise multiplier {sigmas[worst]:.3g} > {cap:g}; raise epsilon, "
            "train fewer rounds or steps per round, lower the sample rate, or give the task a "
            "larger share."
        )
    return sigmas


def _normalised_shares(task_shares: Mapping[str, float]) -> dict[str, float]:
    if not task_shares:
        raise PrivacyError("task_shares is empty; give each task a positive share of the budget.")
    for task, share in task_shares.items():
        check_positive(f"task_shares[{task!r}]", share, fix="give every task a positive share")
    total = float(sum(task_shares.values()))
    return {task: float(share) / total for task, share in task_shares.items()}


def _per_task(
    value: T | Mapping[str, T],
    shares: Mapping[str, float],
    name: str,
    check: Callable[..., T],
) -> dict[str, T]:
    if not isinstance(value, Mapping):
        return {t: check(value, name=name) for t in shares}
    missing = sorted(set(shares) - set(value))
    if missing:
        raise PrivacyError(f"{name} has no value for task(s) {missing}; give one per task.")
    return {t: check(value[t], name=f"{name}[{t!r}]") for t in shares}


def _refuse_if_infeasible(
    eps: float,
    cap: float,
    rounds: int,
    eps_at_cap: Callable[[int], float],
    spent_eps: float = 0.0,
    stated: float | None = None,
) -> None:
    shown = eps if stated is None else stated  # the budget as the user gave it
    spent = (
        f" Of that, {spent_eps:.3g} is spent or set aside before any round (a site's "
        "earlier runs, or the DP fusion fit's reserve, which fusion_fit = 'fixed' or a larger "
        "privacy.fusion_noise frees)."
        if spent_eps > 0 else ""
    )
    one = eps_at_cap(1)
    if one > eps:
        raise PrivacyError(
            f"epsilon={shown:g} is too small for even one round: with noise multiplier {cap:g} on "
            f"every task one round already costs epsilon {one:.3g}.{spent} Raise epsilon, or "
            "lower the sample rate or the steps per round."
        )
    total = eps_at_cap(rounds)
    if total > eps:
        raise PrivacyError(
            f"epsilon={shown:g} is too small for {rounds} rounds: with noise multiplier {cap:g} "
            f"on every task they cost epsilon {total:.3g}.{spent} Raise epsilon or train fewer "
            "rounds."
        )


@functools.lru_cache(maxsize=256)
def _sigma_alone(eps: float, delta: float, q: float, steps: int) -> float:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=eps,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant="rdp",
                    epsilon_tolerance=CALIBRATION_TOLERANCE,
                )
            )
    except ValueError as err:
        raise PrivacyError(
            f"no noise multiplier reaches epsilon={eps:g} at delta={delta:g} for one task; raise "
            "epsilon or give the task a larger share."
        ) from err


def _smallest_scale(eps_at: Callable[[float], float], target: float) -> float:
    """Smallest c (to SCALE_PRECISION) with eps_at(c) <= target; eps_at decreases in c.

    A bracket lo < hi with eps_at(lo) > target >= eps_at(hi) is found by halving or doubling
    from c = 1 (basic composition), then narrowed by the Illinois variant of regula falsi on
    log(eps) against log(c), a smooth monotone curve: about 5 accountant calls, not 12.
    """
    hi = 1.0
    while (f_hi := _log_gap(eps_at, hi, target)) > 0:
        hi *= 2.0
        if hi > 1e6:
            raise PrivacyError("internal: no noise scale meets the budget; please report.")
    lo = hi / 2.0
    while (f_lo := _log_gap(eps_at, lo, target)) <= 0:
        hi, f_hi, lo = lo, f_lo, lo / 2.0
    side = 0
    while hi - lo > SCALE_PRECISION * hi:
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        c = min(max(math.exp(x), lo + 0.5 * SCALE_PRECISION * hi), hi - 0.5 * SCALE_PRECISION * hi)
        f = _log_gap(eps_at, c, target)
        if f <= 0:
            hi, f_hi = c, f
            f_lo, side = (f_lo / 2.0 if side == 1 else f_lo), 1
        else:
            lo, f_lo = c, f
            f_hi, side = (f_hi / 2.0 if side == -1 else f_hi), -1
    return hi


def _log_gap(eps_at: Callable[[float], float], c: float, target: float) -> float:
    return math.log(max(eps_at(c), 1e-300)) - math.log(target)
