"""The packaging files agree with each other and with the README."""

from __future__ import annotations

import re

import tomllib
import yaml

from conftest import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    project = _pyproject()["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_torch_is_pinned_to_the_releases_on_this_machine():
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with the main-job and the test commands"
    test_command = blocks[1].strip().splitlines()[-1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_console_script_points_at_main():
    assert _pyproject()["project"]["scripts"]["anomalib-study"] == "anomalib_study.cli:main"
