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


def test_recommend_for_a_dataset_user_prints_a_table(capsys):
    assert _run("recommend", str(small_run()), "--user", "user-0", "-k", "3") == 0
    out = capsys.readouterr().out
    assert "top 3 for user user-0" in out and "recall" in out and "personal" in out


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
