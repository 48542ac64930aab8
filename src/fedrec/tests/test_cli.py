"""The command line: a user's mistake is one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest


def _fedrec(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["simulate", "--rounds", "0"], "rounds"),
        (["simulate", "--clients", "-3"], "clients"),
        (["simulate", "--dataset", "nowhere-data"], "nowhere-data"),
        (["simulate", "--config", "missing.toml"], "missing.toml"),
        (
            ["simulate", "--dataset", "synthetic", "--partition", "site", "--epsilon", "-1"],
            "epsilon",
        ),
        (["audit", "no-run-here"], "no-run-here"),
        # a long path is not broken across lines (copyable), brackets are not Rich markup
        (["audit", "runs/" + "r" * 150 + "[red]x"], "runs/" + "r" * 150 + "[red]x"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, args, needle):
    from fedrec.cli import main

    monkeypatch.chdir(tmp_path)  # in process: each case as a subprocess cost ~8 s of imports
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err
    assert not (tmp_path / "runs").exists()


def test_a_user_error_exits_the_real_process_with_code_2_and_no_traceback(tmp_path):
    proc = _fedrec("simulate", "--rounds", "0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "rounds" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_epsilon_keeps_the_dp_mode_a_config_file_chose(tmp_path):
    """--epsilon with a config file asking for user-level DP switched it to record-level, a
    different guarantee, without a word."""
    from fedrec.cli import _overrides, build_parser
    from fedrec.config import load_config

    toml = tmp_path / "user.toml"
    toml.write_text('[privacy]\nmode = "user"\n')
    parse = build_parser().parse_args
    for argv, mode in [
        (["simulate", "--config", str(toml), "--epsilon", "2"], "user"),
        (["simulate", "--config", str(toml), "--epsilon", "2", "--dp", "record"], "record"),
        (["simulate", "--epsilon", "2"], "record"),
    ]:
        args = parse(argv)
        cfg = load_config(args.config, _overrides(args))
        assert (cfg.privacy.mode, cfg.privacy.epsilon) == (mode, 2.0), argv


def test_a_relative_dataset_path_is_kept_absolute_in_the_run_config(tmp_path, monkeypatch):
    """fedrec recommend / serve rebuild the catalogue from the run's config.toml: a relative
    path there named nothing once read from another directory."""
    from fedrec.cli import _load, build_parser

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small.csv").write_text("user,item,timestamp\n1,2,3\n")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["simulate", "--dataset", "d/small.csv"])
    assert _load(args).dataset == str(tmp_path.resolve() / "d" / "small.csv")
    named = build_parser().parse_args(["simulate", "--dataset", "synthetic:users=50"])
    assert _load(named).dataset == "synthetic:users=50"
