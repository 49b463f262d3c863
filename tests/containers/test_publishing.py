"""How the images are built and published, checked without a container engine: containers/build.sh
names the images as the modules do, the tag workflow (.github/workflows/images.yml) lints clean with
actionlint and builds and pushes every stage, the build context leaves the venv and data out, and
every documented `docker run` runs as the calling user.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/exllsm_neuronseg/__init__.py").read_text()).group(1)
STAGES = sorted(p.parent.name for p in CONTAINERS.glob("*/Dockerfile"))
USER = '-u "$(id -u):$(id -g)"'


def build_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CONTAINERS / "build.sh"), *args], capture_output=True, text=True)


def module_images() -> set[str]:
    """The default image of every module's container directive."""
    found = set()
    for main in sorted((ROOT / "modules").rglob("main.nf")):
        for line in main.read_text().splitlines():
            if re.match(r"\s*container\s", line):
                found |= set(re.findall(r"'(ghcr\.io/[^']+)'", line))
    return found


def test_build_script_names_the_images_as_the_modules_do():
    proc = build_sh("--list")
    assert proc.returncode == 0, proc.stderr
    listed = dict(line.split() for line in proc.stdout.splitlines())
    assert sorted(listed) == STAGES
    for stage, image in listed.items():
        assert image == f"ghcr.io/janeliascicomp/exllsm-{stage.replace('_', '-')}:{VERSION}"
    # every image a module runs is one that build.sh builds, and every stage is used by a module
    assert module_images() == set(listed.values())
    # one stage, help, and errors
    assert build_sh("--list", "scaling_factor").stdout.split() == ["scaling_factor", listed["scaling_factor"]]
    assert build_sh("--help").returncode == 0 and "Usage:" in build_sh("--help").stdout
    for args in (["--list", "no_such_stage"], ["--bogus"]):
        proc = build_sh(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc


def _actionlint() -> str:
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if exe is None:
        pytest.fail("actionlint is required: install the test extra (pip install -e '.[test]')")
    return exe


def test_publish_workflow_lints_clean(tmp_path):
    exe = _actionlint()
    # the gate works: a workflow with a script injection and an unknown input is flagged
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.event.head_commit.message }}\n"
        "      - uses: actions/checkout@v6\n        with:\n          bogus: 1\n"
    )
    proc = subprocess.run([exe, "-no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "untrusted" in proc.stdout and "bogus" in proc.stdout, proc
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
    assert WORKFLOW in workflows
    proc = subprocess.run([exe, "-no-color", *map(str, workflows)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"actionlint findings:\n{proc.stdout}{proc.stderr}"


def test_publish_workflow_pushes_every_stage_under_the_module_names():
    import yaml

    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers == {"push": {"tags": ["v*"]}}, triggers
    assert flow["permissions"]["packages"] == "write"
    (job,) = flow["jobs"].values()
    assert sorted(job["strategy"]["matrix"]["stage"]) == STAGES, "the workflow must build every containers/<stage>"
    steps = job["steps"]
    uses = {step["uses"].split("@")[0]: step for step in steps if "uses" in step}
    login = uses["docker/login-action"]["with"]
    assert login["registry"] == "ghcr.io" and login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    push = uses["docker/build-push-action"]["with"]
    assert push["push"] is True and push["context"] == "."
    assert push["file"] == "containers/${{ matrix.stage }}/Dockerfile"
    # published images name their commit in provenance records, as build.sh's do
    assert push["build-args"].strip().splitlines() == ["EXLLSM_COMMIT=${{ github.sha }}"]
    # the tag is the name build.sh gives (= the modules'), and the git tag must be the package version
    naming = next(step for step in steps if step.get("id") == push["tags"].split(".")[1])
    assert 'containers/build.sh --list "$STAGE"' in naming["run"] and job["env"]["STAGE"] == "${{ matrix.stage }}"
    assert '"v$version" != "$GITHUB_REF_NAME"' in naming["run"] and "__version__" in naming["run"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified to what .dockerignore uses: a pattern matches the path or a parent."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(Path(prefix).name, bare):
                return True
    return False


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)
    kept_out = (
        ".venv/bin/python .git/HEAD results/test/x.n5 work/ab/cd .tools/x model.h5 bench/results/r.json "
        "src/exllsm_neuronseg/__pycache__/x.pyc data/brain.n5/attributes.json"
    )
    for path in kept_out.split():
        assert _ignored(path, patterns), f".dockerignore lets {path} into the build context"
    for stage in STAGES:
        text = (CONTAINERS / stage / "Dockerfile").read_text().replace("\\\n", " ")
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["COPY"]:
                for source in words[1:-1]:
                    assert (ROOT / source).exists(), f"{stage}: COPY {source} does not exist"
                    assert not _ignored(source, patterns), f"{stage}: .dockerignore hides COPY {source}"
                    if (ROOT / source).is_dir():
                        for inner in (ROOT / source).rglob("*.py"):
                            if "__pycache__" not in inner.parts:
                                rel = str(inner.relative_to(ROOT))
                                assert not _ignored(rel, patterns), f"{stage}: .dockerignore hides {rel}"


def test_documented_docker_runs_pass_the_user():
    """A container run as root leaves root-owned chunks that a later `-u` run cannot write."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(CONTAINERS.glob("*/Dockerfile"))]
    runs = 0
    for document in documents:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            for match in re.finditer(r"docker run\b[^`\n]*", line):
                if match.group(0).strip() == "docker run":  # the words in prose, not a command
                    continue
                runs += 1
                assert USER in match.group(0), f"{document.relative_to(ROOT)}:{number}: {line.strip()}"
    assert runs >= len(STAGES) + 1  # each Dockerfile header, the legacy entry point, the docs


def test_readme_says_to_build_the_images_before_the_docker_profile():
    readme = (ROOT / "README.md").read_text()
    assert "containers/build.sh" in readme
    assert readme.index("containers/build.sh") < readme.index("-profile test,docker")
