"""``fedrec recommend`` through its argparse wiring (the lead hooks add_parsers into fedrec.cli)."""

from __future__ import annotations

import argparse

import pytest

from fedrec.fusion.pipeline import RecommendError
from fedrec.recommend_cli import add_parsers
from fedrec.tests.test_fusion_run import small_run


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedrec")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_recommend_for_a_dataset_user_prints_a_table(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)  # a terminal: the table
    assert _run("recommend", str(small_run()), "--user", "user-0", "-k", "3") == 0
    out = capsys.readouterr().out
    assert "top 3 for user user-0" in out and "recall" in out and "personal" in out


def test_piped_recommendations_are_tab_separated_with_whole_ids(capsys):
    """The table cut long ids short ('item-1…'); piped output is for programs."""
    assert _run("recommend", str(small_run()), "--user", "user-0", "-k", "3") == 0
    header, *rows = capsys.readouterr().out.strip().split("\n")
    assert header.split("\t") == ["rank", "item", "title", "category", "score", "recall",
                                   "ranking", "personal"]
    assert len(rows) == 3 and all(r.split("\t")[1].startswith("item-") for r in rows)


def test_recommend_for_a_history_file_skips_blanks_and_comments(tmp_path, capsys):
    hist = tmp_path / "history.txt"
    hist.write_text("# my items\nitem-1\n\nitem-2  # a comment\n")
    assert _run("recommend", str(small_run()), "--history", str(hist), "--category",
                "kitchen", "-k", "2") == 0
    out = capsys.readouterr()
    assert "kitchen" in out.out and "2 items in the history" in " ".join(out.err.split())


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--user", "no-such-user"], "no-such-user"),
        (["--history", "missing.txt"], "missing.txt"),
    ],
)
def test_user_mistakes_raise_recommend_errors(argv, match):
    with pytest.raises(RecommendError, match=match):
        _run("recommend", str(small_run()), *argv)


def test_user_and_history_are_mutually_exclusive_and_one_is_required():
    with pytest.raises(SystemExit):
        _run("recommend", "run", "--user", "u", "--history", "h")
    with pytest.raises(SystemExit):
        _run("recommend", "run")


def test_a_dataset_users_history_holds_every_item_they_have_seen():
    """It held the training split only: the user's two latest items were missing from the
    input and came back among the recommendations."""
    from fedrec.fusion.pipeline import Recommender
    from fedrec.recommend_cli import _workload, user_history

    run = small_run()
    work = _workload(str(run))
    items, _ = user_history(work, "user-0")
    assert len(items) == int((work.dataset.interactions["user"] == 0).sum())
    latest = set(work.split.valid.query("user == 0")["item"]) | set(
        work.split.test.query("user == 0")["item"])
    assert latest and latest <= set(items)
    rows = Recommender.from_run_dir(str(run)).recommend(list(items), 50, exclude_seen=True)
    ids = work.dataset.items["item_id"].astype(str).tolist()
    assert not {ids[i] for i in set(items)} & {r["item"] for r in rows}


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_serve_refuses_a_port_outside_1_to_65535(port, capsys):
    with pytest.raises(SystemExit):  # 70000 wrapped around to 4464 silently
        _run("serve", "run", "--port", port)
    assert "not a port" in capsys.readouterr().err


def test_serving_refuses_data_that_changed_since_the_run(tmp_path):
    """Serving rebuilds the catalogue from the run's dataset: an item id renamed in the file
    shifted every index after it, and the models scored the wrong items without a word."""
    from fedrec.client.local import build_task_models
    from fedrec.config import load_config
    from fedrec.fusion.pipeline import Recommender, save_catalogue_digest
    from fedrec.models.registry import save_model
    from fedrec.tests.test_fusion_run import SMALL
    from fedrec.workload import build_workload

    csv = tmp_path / "events.csv"
    rows = [f"u{u},i{5 * u + k},{100 * u + k}" for u in range(40) for k in range(5)]
    csv.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = load_config(None, {**SMALL, "dataset": str(csv), "partition": "user", "out": str(run)})
    work = build_workload(cfg)
    for task, model in build_task_models(cfg, work.spec, 0).items():
        save_model(model, run / "models" / task)
    (run / "config.toml").write_text(cfg.to_toml())
    save_catalogue_digest(run, work.dataset.items["item_id"])
    assert Recommender.from_run_dir(run).recommend(["i1"], 3)  # the data it trained on
    csv.write_text(csv.read_text().replace("i13,", "i13b,"))
    from fedrec.workload import _build_cached

    _build_cached.cache_clear()  # a new process would read the file afresh
    with pytest.raises(RecommendError, match="serve it with the data it was trained on"):
        Recommender.from_run_dir(run)
