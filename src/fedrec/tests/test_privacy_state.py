"""ClientPrivacyState: cumulative, composed, serialisable (fedrec.privacy.state)."""

from __future__ import annotations

import json

import pytest

from fedrec.privacy import ClientPrivacyState, PrivacyError, epsilon_opacus

DELTA = 1e-5


def _state(accountant: str = "rdp", rounds: int = 3) -> ClientPrivacyState:
    state = ClientPrivacyState(accountant=accountant)  # type: ignore[arg-type]
    for _ in range(rounds):
        state.record("recall", noise_multiplier=1.0, sample_rate=0.02, steps=50)
        state.record("ranking", noise_multiplier=1.3, sample_rate=0.02, steps=50)
    return state


def test_epsilon_is_cumulative_over_rounds() -> None:
    state = _state(rounds=3)
    assert state.epsilon("recall", delta=DELTA) == pytest.approx(
        epsilon_opacus([(1.0, 0.02, 150)], delta=DELTA, accountant="rdp")
    )
    assert state.epsilon("recall", delta=DELTA) > _state(rounds=1).epsilon("recall", delta=DELTA)
    assert state.epsilon("personal", delta=DELTA) == 0.0


def test_composed_epsilon_composes_all_tasks() -> None:
    state = _state()
    composed = state.composed_epsilon(delta=DELTA)
    expected = epsilon_opacus([(1.0, 0.02, 150), (1.3, 0.02, 150)], delta=DELTA, accountant="rdp")
    assert composed == pytest.approx(expected)
    parts = [state.epsilon(t, delta=DELTA) for t in state.tasks]
    assert max(parts) < composed < sum(parts)  # tighter than basic composition


def test_upto_gives_the_prefix() -> None:
    state = _state(rounds=2)
    assert state.composed_epsilon(delta=DELTA, upto=1) == pytest.approx(
        state.epsilon("recall", delta=DELTA, upto=1)
    )
    assert state.history("ranking", upto=3) == [(1.3, 0.02, 50)]
    assert state.last_index("ranking") == 3
    with pytest.raises(PrivacyError, match="no record"):
        state.last_index("personal")


def test_would_exceed_checks_the_composed_epsilon() -> None:
    state = _state()
    composed_now = state.composed_epsilon(delta=DELTA)
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 50, "delta": DELTA}
    assert state.would_exceed("personal", budget=composed_now, **plan)
    assert not state.would_exceed("personal", budget=composed_now + 5.0, **plan)
    # alone the new task is far below the budget: only composition shows the excess
    assert epsilon_opacus([(1.0, 0.02, 50)], delta=DELTA, accountant="rdp") < composed_now
    assert len(state) == 6  # would_exceed records nothing


def test_json_roundtrip() -> None:
    state = _state(accountant="prv")
    text = state.to_json()
    assert json.loads(text)["accountant"] == "prv"
    restored = ClientPrivacyState.from_json(text)
    assert restored == state
    assert restored.composed_epsilon(delta=DELTA) == state.composed_epsilon(delta=DELTA)


def test_from_dict_refuses_other_versions() -> None:
    data = _state().to_dict() | {"version": 99}
    with pytest.raises(PrivacyError, match="version"):
        ClientPrivacyState.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sample_rate": 2.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
    ],
)
def test_record_validates(kwargs, match) -> None:
    base = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}
    with pytest.raises(PrivacyError, match=match):
        ClientPrivacyState().record("recall", **{**base, **kwargs})


def test_unknown_accountant_refused() -> None:
    with pytest.raises(PrivacyError, match="accountant"):
        ClientPrivacyState(accountant="gdp")  # type: ignore[arg-type]
