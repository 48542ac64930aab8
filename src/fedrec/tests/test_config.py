import json
import tomllib
from dataclasses import replace

import pytest

from fedrec.config import ConfigError, FedrecConfig, from_dict, from_json, load_config


def test_toml_and_json_round_trip_keep_every_field():
    cfg = load_config(None, {"rounds": 3, "privacy.epsilon": 2.5, "tasks": {"recall": {"lr": 0.1}}})
    assert cfg.rounds == 3 and cfg.privacy.epsilon == 2.5 and cfg.tasks["recall"].lr == 0.1
    assert from_dict(tomllib.loads(cfg.to_toml())) == cfg
    assert from_json(cfg.to_json()) == cfg


def test_kebab_case_keys_from_flower_run_config_are_accepted():
    assert from_dict({"min-train-clients": 3}).min_train_clients == 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": -2}, "rounds"),
        ({"clients": -1}, "clients"),
        ({"strategy": "fedfoo"}, "strategy"),
        ({"reject_min_cosine": 1.0}, "reject_min_cosine"),
        ({"reject_min_cosine": -1.5}, "reject_min_cosine"),
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"strategy": "krum", "secure_aggregation": True}, "secure_aggregation"),
        ({"register_users": True, "secure_aggregation": True}, "register_users"),
        ({"register_users": True, "strategy": "krum"}, "register_users"),
        ({"register_users": True, "privacy.mode": "user"}, "register_users"),
        ({"privacy.epsilon": 0}, "privacy.epsilon"),
        ({"privacy.delta": 1.0}, "privacy.delta"),
        ({"tasks": {"recall": {"lr": -1}}}, "tasks.recall.lr"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_unknown_keys_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'roundz' is unknown"):
        from_dict({"roundz": 3})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_default_is_the_documented_ml100k_cross_silo_run():
    cfg = FedrecConfig()
    assert (cfg.dataset, cfg.partition, cfg.privacy.mode) == (
        "ml-100k",
        "column:occupation",
        "none",
    )


def test_fusion_under_dp_is_fitted_on_no_data_unless_asked_and_then_disclosed():
    from fedrec.config import fusion_fit_mode, fusion_reserve, releases_outside_ledger

    plain, dp = load_config(None, {}), load_config(None, {"privacy.mode": "record"})
    user = load_config(None, {"privacy.mode": "user"})
    assert (fusion_fit_mode(plain), releases_outside_ledger(plain)) == ("server", [])
    assert (fusion_fit_mode(dp), releases_outside_ledger(dp)) == ("dp", [])
    assert (fusion_fit_mode(user), releases_outside_ledger(user)) == ("fixed", [])
    assert fusion_reserve(dp) == [(8.0, 1.0, 1)] and fusion_reserve(user) == []
    with pytest.raises(ConfigError, match="record-level"):
        load_config(None, {"privacy.mode": "user", "fusion_fit": "dp"})
    for fit in ("server", "federated"):
        asked = load_config(None, {"privacy.mode": "user", "fusion_fit": fit})
        assert fusion_fit_mode(asked) == fit
        assert [f"fusion_fit = {fit}" in r for r in releases_outside_ledger(asked)] == [True]
        assert releases_outside_ledger(replace(asked, privacy=plain.privacy)) == []
    with pytest.raises(ConfigError, match="fusion_fit"):
        load_config(None, {"fusion_fit": "best"})


def test_a_field_added_later_is_written_only_when_set():
    """An unfinished run of an earlier fedrec hashes its config the same (it resumes) and an
    earlier partner site accepts the default config: register_users appears only when on."""
    from fedrec.config import from_json

    default = FedrecConfig()
    assert "register_users" not in default.to_dict() and "register_users" not in default.to_toml()
    assert from_json(default.to_json()) == default
    on = load_config(None, {"register_users": True})
    assert json.loads(on.to_json())["register_users"] is True
    assert from_json(on.to_json()) == on and on.to_json() != default.to_json()


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("privacy = 5", "'privacy' must be a table"),
        ('text = "beside"', "'text' must be a table"),
        ("[tasks]\nrecall = 3", "'tasks.recall' must be a table"),
        ("[privacy]\ntask_shares = 3", "task_shares' must be numbers"),
        ('[privacy]\ntask_shares = ["a", "b", "c"]', "task_shares' must be numbers"),
        ("[privacy]\ntask_shares = [1.0]", "task_shares' must be numbers"),
        ("rounds = 2.5", "'rounds' must be an integer"),
        ("rounds = true", "'rounds' must be an integer"),
        ("dataset = 5", "'dataset' must be a string"),
        ('secure_aggregation = "false"', "'secure_aggregation' must be true or false"),
        ("[tasks.recall]\ndim = 2.5", "'tasks.recall.dim' must be an integer"),
        ('[privacy]\nepsilon = "8"', "'privacy.epsilon' must be a number"),
    ],
)
def test_a_wrongly_shaped_or_typed_toml_value_is_a_config_error(tmp_path, toml, needle):
    """Each was a traceback, a truthy string ("false"), or a crash later in the run."""
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_task_shares_pair_with_the_tasks_the_run_trains(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text("[tasks.recall]\n[tasks.ranking]\n[privacy]\ntask_shares = [0.25, 0.75]\n")
    cfg = load_config(path)
    assert list(cfg.tasks) == ["recall", "ranking"] and cfg.privacy.task_shares == (0.25, 0.75)
    path.write_text("[tasks.recall]\n[tasks.ranking]\n[privacy]\ntask_shares = [1]\n")
    with pytest.raises(ConfigError, match=r"one per task of the run in order \['recall', 'ran"):
        load_config(path)
