"""The Flower app folder that `fedslip deploy` submits with `flwr run`: written into the workdir, not read from
a source checkout, and accepted by Flower's own validation, FAB build and FAB install. No process is started."""

from __future__ import annotations

import io
import tomllib
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")

from fedslip.federation.flower.loopback import APP_COMPONENTS, APP_CONFIG, APP_DIR_NAME, Loopback, write_app_dir

REPO = Path(__file__).resolve().parents[1]


def test_app_dir_holds_the_components_and_run_defaults(tmp_path):
    app = write_app_dir(tmp_path / APP_DIR_NAME)
    assert app == tmp_path / APP_DIR_NAME and not app.resolve().is_relative_to(REPO)
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    doc = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    flwr_app = doc["tool"]["flwr"]["app"]
    assert flwr_app["publisher"] == "fedslip" and doc["project"]["name"] == "fedslip"
    assert flwr_app["components"] == APP_COMPONENTS
    assert flwr_app["config"] == APP_CONFIG
    assert isinstance(flwr_app["config"]["round-timeout"], float) and flwr_app["config"]["min-available"] == 0


def test_flower_validates_builds_and_installs_the_app(tmp_path, monkeypatch):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import get_fab_metadata, load_and_validate
    from flwr.cli.install import install_from_fab
    from flwr.cli.utils import validate_project_name

    app = write_app_dir(tmp_path / APP_DIR_NAME)
    monkeypatch.chdir(tmp_path)  # outside the checkout: the components must come from the installed package
    validate_project_name(app.name, "The Flower App directory name")  # what `flwr build` checks
    config, warnings = load_and_validate(app / "pyproject.toml", check_module=True)  # what `flwr run` checks
    assert warnings == [] and config["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    fab = build_fab_from_disk(app)  # what `flwr run` submits
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == [".info/CONTENT", "pyproject.toml"]
    assert get_fab_metadata(fab)[0] == "fedslip/fedslip"
    installed = install_from_fab(fab, install_dir=tmp_path / "flwr-home", skip_prompt=True)  # what nodes do
    doc = tomllib.loads((installed / "pyproject.toml").read_text(encoding="utf-8"))
    assert doc["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    assert doc["tool"]["flwr"]["app"]["config"] == APP_CONFIG


def test_app_matches_the_repository_pyproject():
    """APP_COMPONENTS/APP_CONFIG are a copy of [tool.flwr.app] in pyproject.toml (`flwr run .` in a checkout)."""
    path = REPO / "pyproject.toml"
    if not path.is_file():
        pytest.skip("not a source checkout")
    flwr_app = tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    assert flwr_app["components"] == APP_COMPONENTS
    assert flwr_app["config"] == APP_CONFIG


def test_loopback_submits_the_app_written_into_its_workdir(tmp_path):
    lb = Loopback(tmp_path / "lb", 2, insecure=True)  # not started: nothing written yet
    assert lb.project == tmp_path / "lb" / APP_DIR_NAME and not (tmp_path / "lb").exists()
