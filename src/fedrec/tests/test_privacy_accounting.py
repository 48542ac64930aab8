"""Known answers and properties of the pure accounting functions (fedrec.privacy.accounting)."""

from __future__ import annotations

import math

import pytest

from fedrec.privacy import (
    PrivacyError,
    calibrate_noise,
    canonical_history,
    epsilon_dp_accounting,
    epsilon_opacus,
    validate_budget,
)

REF = [(1.1, 0.01, 1000)]  # NOTES.md: sigma=1.1, q=0.01, 1000 steps, delta=1e-5
SHARES = {"recall": 0.5, "ranking": 0.3, "personal": 0.2}


@pytest.mark.parametrize(
    ("fn", "kwargs", "expected", "places"),
    [
        (epsilon_opacus, {"accountant": "rdp"}, 1.7118, 4),
        (epsilon_dp_accounting, {"method": "rdp"}, 1.7118, 4),
        (epsilon_opacus, {"accountant": "prv"}, 1.5255, 3),
        (epsilon_dp_accounting, {"method": "pld"}, 1.5154, 3),
    ],
)
def test_reference_values(fn, kwargs, expected, places) -> None:
    assert fn(REF, delta=1e-5, **kwargs) == pytest.approx(expected, abs=10.0**-places)


def test_rdp_implementations_agree_on_mixed_history() -> None:
    hist = [(1.0, 0.02, 50), (1.5, 0.01, 80), (0.9, 0.02, 30), (1.0, 0.02, 50)]
    a = epsilon_opacus(hist, delta=1e-5, accountant="rdp")
    b = epsilon_dp_accounting(hist, delta=1e-5, method="rdp")
    assert a == pytest.approx(b, rel=1e-4)


def test_canonical_history_merges_and_ignores_order() -> None:
    hist = [(1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 2), (3.0, 0.2, 0)]
    assert canonical_history(hist) == ((1.0, 0.1, 5), (2.0, 0.1, 1))
    assert epsilon_opacus(hist, delta=1e-5) == epsilon_opacus(hist[::-1], delta=1e-5)


def test_empty_history_costs_nothing() -> None:
    assert epsilon_opacus([], delta=1e-5) == 0.0
    assert epsilon_dp_accounting([], delta=1e-5) == 0.0


@pytest.mark.parametrize(
    ("hist", "field"),
    [
        ([(0.0, 0.1, 10)], "noise_multiplier"),
        ([(1.0, 1.5, 10)], "sample_rate"),
        ([(1.0, 0.1, -1)], "steps"),
        ([(1.0, 0.1)], "history"),
    ],
)
def test_bad_history_names_the_field(hist, field) -> None:
    with pytest.raises(PrivacyError, match=field):
        epsilon_opacus(hist, delta=1e-5)


def test_gdp_is_refused() -> None:
    with pytest.raises(PrivacyError, match="accountant"):
        epsilon_opacus(REF, delta=1e-5, accountant="gdp")  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_meets_composed_budget(accountant) -> None:
    q, per_round, rounds = 64 / 5000, 40, 5
    sigmas = calibrate_noise(
        epsilon=3.0,
        delta=1e-5,
        sample_rate=q,
        steps_per_round=per_round,
        rounds=rounds,
        task_shares=SHARES,
        accountant=accountant,
    )
    assert set(sigmas) == set(SHARES)
    assert sigmas["recall"] < sigmas["ranking"] < sigmas["personal"]  # more share, less noise
    hist = [(s, q, per_round * rounds) for s in sigmas.values()]
    eps = epsilon_opacus(hist, delta=1e-5, accountant=accountant)
    assert 2.9 < eps <= 3.0  # in budget, and not wasting it
    assert epsilon_dp_accounting(hist, delta=1e-5, method="rdp") == pytest.approx(
        epsilon_opacus(hist, delta=1e-5, accountant="rdp"), rel=1e-4
    )


def test_calibration_beats_basic_composition() -> None:
    kw = {"epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.01, "steps_per_round": 50, "rounds": 4}
    equal = calibrate_noise(task_shares={"a": 1, "b": 1, "c": 1}, accountant="rdp", **kw)
    alone = calibrate_noise(task_shares={"a": 1}, accountant="rdp", **kw)
    basic = calibrate_noise(task_shares={"a": 1}, accountant="rdp", **{**kw, "epsilon": 1.0})
    assert alone["a"] < equal["a"] < basic["a"]


def test_calibration_per_task_sample_rates() -> None:
    sigmas = calibrate_noise(
        epsilon=4.0,
        delta=1e-5,
        sample_rate={"recall": 0.02, "ranking": 0.01},
        steps_per_round={"recall": 20, "ranking": 40},
        rounds=3,
        task_shares={"recall": 1, "ranking": 1},
        accountant="rdp",
    )
    hist = [(sigmas["recall"], 0.02, 60), (sigmas["ranking"], 0.01, 120)]
    assert epsilon_opacus(hist, delta=1e-5, accountant="rdp") <= 4.0


def test_budget_too_small_for_one_round() -> None:
    with pytest.raises(PrivacyError, match="even one round"):
        calibrate_noise(
            epsilon=0.01,
            delta=1e-5,
            sample_rate=0.5,
            steps_per_round=1000,
            rounds=10,
            task_shares=SHARES,
            accountant="rdp",
        )


def test_a_budget_the_reserve_eats_says_so() -> None:
    """With the DP fusion fit's reserve (one release at multiplier 8) an epsilon of 0.1 fails:
    the message must name the reserve, which no lower sample rate or fewer steps can free."""
    with pytest.raises(PrivacyError, match="0.307 is spent or set aside .*fusion_fit"):
        calibrate_noise(epsilon=0.1, delta=1e-3, sample_rate=0.3, steps_per_round=4,
                        rounds=12, task_shares=SHARES, accountant="rdp", spent=[(8.0, 1.0, 1)])
    with pytest.raises(PrivacyError, match=r"^epsilon=0.1 is too small"):  # not 0.0999
        calibrate_noise(epsilon=0.1, delta=1e-3, sample_rate=0.3, steps_per_round=4,
                        rounds=12, task_shares=SHARES, accountant="rdp", spent=[(8.0, 1.0, 1)],
                        margin=0.999)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"rounds": 0}, "rounds"),
        ({"task_shares": {}}, "task_shares"),
        ({"task_shares": {"a": -1.0}}, "task_shares"),
        ({"sample_rate": {"recall": 0.1}}, "no value for task"),
    ],
)
def test_calibration_validates(kwargs, match) -> None:
    base = {
        "epsilon": 3.0,
        "delta": 1e-5,
        "sample_rate": 0.01,
        "steps_per_round": 10,
        "rounds": 2,
        "task_shares": {"recall": 1.0, "ranking": 1.0},
    }
    with pytest.raises(PrivacyError, match=match):
        calibrate_noise(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1e-3}, "1/min_records"),
        ({"min_records": 0}, "min_records"),
    ],
)
def test_validate_budget(kwargs, match) -> None:
    base = {"epsilon": 1.0, "delta": 1e-5, "min_records": 5000}
    validate_budget(**base)
    with pytest.raises(PrivacyError, match=match):
        validate_budget(**{**base, **kwargs})


def test_privacy_error_is_value_error() -> None:
    assert issubclass(PrivacyError, ValueError)


def test_notes_rounds_table() -> None:
    # NOTES.md: 5000 users, batch 64, sigma 1, PRV, delta 1e-5; the figures reproduce with
    # q = 64/5000 and ceil(5000/64) = 79 steps per round.
    eps = [epsilon_opacus([(1.0, 64 / 5000, 79 * r)], delta=1e-5) for r in (1, 5, 10, 20, 50)]
    assert eps == pytest.approx([0.86, 1.56, 2.14, 3.02, 4.90], abs=0.005)


def test_memoised_opacus_rdp_gives_opacus_own_figures() -> None:
    """fedrec caches Opacus' per-step RDP (fedrec.privacy.accounting): the PRV and RDP epsilons
    of a mixed history, fractional orders and q = 0.4 included, equal bit for bit what Opacus
    computes in a process that never imported fedrec."""
    import subprocess
    import sys

    from opacus.accountants.analysis import rdp

    assert hasattr(rdp._compute_rdp, "cache_info")  # the cache is installed
    hist = [(1.3, 0.4, 7), (2.7, 0.05, 40)]
    code = (
        "from opacus.accountants import create_accountant\n"
        "from opacus.accountants.analysis import rdp\n"
        "assert not hasattr(rdp._compute_rdp, 'cache_info')\n"
        "for mech in ('prv', 'rdp'):\n"
        "    acc = create_accountant(mechanism=mech)\n"
        f"    acc.history = {hist!r}\n"
        "    print(repr(float(acc.get_epsilon(delta=1e-5))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    fresh = [float(x) for x in out.stdout.split()]
    from opacus.accountants import create_accountant

    mine = []
    for mech in ("prv", "rdp"):
        acc = create_accountant(mechanism=mech)
        acc.history = list(hist)
        mine.append(float(acc.get_epsilon(delta=1e-5)))
    assert mine == fresh
    assert rdp._compute_rdp.cache_info().hits > 0


def test_cached_pld_gives_dp_accountings_own_figures() -> None:
    """fedrec builds each sampled Gaussian's PLD once (fedrec.privacy.accounting._epsilon_pld):
    its epsilon equals dp-accounting's PLDAccountant's bit for bit, for single and mixed
    histories, also when the cached PLDs are reused across queries."""
    from dp_accounting.pld import PLDAccountant

    from fedrec.privacy.accounting import canonical_history, dp_event

    for hist in ([(1.3, 0.4, 7)], [(1.3, 0.4, 7), (2.7, 0.05, 40)], [(0.9, 1.0, 3), (1.3, 0.4, 2)]):
        canon = canonical_history(hist)
        acc = PLDAccountant()
        acc.compose(dp_event(canon))
        for delta in (1e-3, 1e-5):
            assert epsilon_dp_accounting(hist, delta=delta, method="pld") == acc.get_epsilon(delta)
