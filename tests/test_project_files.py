"""The project's own files (issue 14, item 6): licence, citation, changelog and home URL agree with
pyproject, the package version, the Nextflow manifest and every module's metadata."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from exllsm_neuronseg import __version__

ROOT = Path(__file__).resolve().parents[1]
HOME = "https://github.com/JaneliaSciComp/exllsm-neuronseg"


def test_licence_matches_pyproject():
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "neuron_2021.h5" in text  # the model's own licence named


def test_citation_cites_this_project_and_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "BSD-3-Clause"
    assert cff["repository-code"] == HOME
    assert any(ref.get("doi") == "10.7554/eLife.81248" for ref in cff["references"])


def test_changelog_has_the_current_version():
    assert re.search(rf"^## {re.escape(__version__)} ", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_the_projects_own_url_everywhere():
    config = (ROOT / "nextflow.config").read_text()
    assert f"homePage        = '{HOME}'" in config and f"version         = '{__version__}'" in config
    for meta in sorted((ROOT / "modules" / "local").glob("*/meta.yml")):
        tools = yaml.safe_load(meta.read_text())["tools"]
        for tool in tools:
            (entry,) = tool.values()
            assert entry["homepage"] == HOME, meta
    readme = (ROOT / "README.md").read_text()
    assert HOME in readme and "docs/images/demo-neurons.png" in readme and (ROOT / "docs/images/demo-neurons.png").is_file()
