"""A partner site runs fedrec's own ClientApp, never code a run's app bundle ships (issue 5).

The bundles here are built by Flower's own ``flwr build`` code from real app folders.
"""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import tomli_w
from flwr.cli.build import build_fab_from_disk

from fedrec.config import load_config
from fedrec.deploy import launch
from fedrec.deploy.client import Partner, guard_dir
from fedrec.deploy.guard import KINDS, check_fab, write_shims


def _fab(tmp_path: Path, pyproject: dict, files: dict[str, str] | None = None) -> bytes:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    for name, text in (files or {}).items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return build_fab_from_disk(app)


def _fedrecs() -> dict:
    return launch.app_pyproject(load_config(None, {"rounds": 2}))


def test_fedrecs_own_bundle_passes(tmp_path):
    content = _fab(tmp_path, _fedrecs())
    assert set(zipfile.ZipFile(io.BytesIO(content)).namelist()) == {
        "pyproject.toml", ".info/CONTENT"
    }
    assert check_fab(content) == ""


@pytest.mark.parametrize(
    ("change", "files", "problem"),
    [
        # code beside the real references: it would be first on sys.path and shadow fedrec
        (None, {"fedrec/client/app.py": "import os\napp = None\n"}, "files besides"),
        (None, {"evil.py": "app = None\n"}, "files besides"),
        ({"clientapp": "evil:app"}, {"evil.py": "app = None\n"}, "files besides"),
        ({"clientapp": "os:system"}, None, "names the apps"),  # no file, another module
        ({"serverapp": "fedrec.server.app:app"}, None, ""),  # unchanged: passes
    ],
)
def test_a_bundle_with_code_or_other_apps_is_refused(tmp_path, change, files, problem):
    pyproject = _fedrecs()
    pyproject["tool"]["flwr"]["app"]["components"].update(change or {})
    reason = check_fab(_fab(tmp_path, pyproject, files))
    assert (problem in reason and reason) if problem else reason == ""


def test_a_bundle_asking_for_dependencies_or_not_a_zip_is_refused(tmp_path):
    pyproject = _fedrecs()
    pyproject["project"]["dependencies"] = ["evil-package"]
    assert "dependencies" in check_fab(_fab(tmp_path, pyproject))
    assert "cannot be read" in check_fab(b"not a zip")
    only_manifest = io.BytesIO()
    with zipfile.ZipFile(only_manifest, "w") as z:
        z.writestr(".info/CONTENT", "")
    assert "no pyproject.toml" in check_fab(only_manifest.getvalue())


def test_the_supernode_finds_the_guard_before_flowers_task_processes(tmp_path):
    partner = Partner("127.0.0.1:9092", tmp_path / "d", None, None, 0, flwr_home=tmp_path / "h")
    shims = guard_dir(partner)
    assert shims == tmp_path / "h" / "fedrec-guard"
    env = launch.child_env(os.environ, flwr_home=partner.flwr_home, bins=launch.bin_dir(),
                           guard=shims)  # fmt: skip
    for name in KINDS.values():  # what Flower's SuperExec starts, resolved as it resolves it
        found = subprocess.run(["sh", "-c", f"command -v {name}"], env=env, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        assert found == str(shims / name) and os.access(found, os.X_OK)
    # a shim runs the guard module in isolated mode, whatever the working folder holds
    (tmp_path / "fedrec").mkdir()
    (tmp_path / "fedrec" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    out = subprocess.run([str(shims / "flwr-clientapp"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "guard" in out.stdout, out.stderr[-500:]


def test_shims_are_rewritten_for_this_python(tmp_path):
    folder = write_shims(tmp_path / "g", python="/opt/py/bin/python3")
    text = (folder / "flwr-agentapp").read_text()
    assert text.startswith("#!/bin/sh\n") and "'/opt/py/bin/python3' -I -m fedrec.deploy.guard " \
        "agentapp" in text
