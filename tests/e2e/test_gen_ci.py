"""``ato gen-ci`` writes a workflow whose install step really installs this ato.

The test builds this checkout's wheel (``pip wheel --no-deps --no-build-isolation``), puts it with
every dependency's wheel behind a PEP 503 simple index on 127.0.0.1, runs ``ato gen-ci --index-url``
against it, then runs the generated install step's shell commands verbatim with bash (``RUNNER_TEMP``
and ``GITHUB_PATH`` set as Actions sets them) and runs the installed ``ato --version`` from the fresh
venv. A wheel changed by one byte is then refused by pip's hash check (the ato line of the same lock).

Tests never reach beyond 127.0.0.1, so the dependency wheels are re-packed from this test
environment's installed distributions (each ``RECORD`` lists every installed file) instead of
being downloaded; gen-ci reads their hashes from the local index exactly as it would from PyPI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_schema
from tests.e2e.pyindex_support import SimpleIndex, repack, requirement_names
from tests.e2e.registry_support import make_project

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory):
    house = tmp_path_factory.mktemp("wheelhouse")
    # setuptools builds in the source tree (build/, *.egg-info): build a copy, never the checkout
    source = tmp_path_factory.mktemp("source") / "ato"
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=lambda d, names: skip(d, names) | (
        {"bench", "tests", "demo"} & set(names) if Path(d) == REPO else set()))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-q", "-w", str(house), str(source)],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert build.returncode == 0, build.stderr
    assert len(list(house.glob("ato-*.whl"))) == 1
    for name in sorted(requirement_names("ato") - {"ato"}):
        repack(metadata.distribution(name), house)
    index = SimpleIndex(house)
    yield house, index
    index.close()


def install_step(workflow: dict) -> dict:
    steps = workflow["jobs"]["publish"]["steps"]
    return next(s for s in steps if s.get("name", "").startswith("Install ato"))


def run_install_step(step: dict, runner_temp: Path) -> subprocess.CompletedProcess[str]:
    """The step's shell commands, as GitHub Actions runs them (bash -e, RUNNER_TEMP, GITHUB_PATH), with
    a python3 on PATH the way actions/setup-python provides one."""
    runner_temp.mkdir()
    tools = runner_temp / "setup-python"
    tools.mkdir()
    (tools / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(step.get("env") or {})
    env.update(RUNNER_TEMP=str(runner_temp), GITHUB_PATH=str(runner_temp / "github_path"),
               PATH=f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin",
               PIP_CONFIG_FILE=os.devnull)  # this machine's pip.conf is not the runner's
    return subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True, text=True,
                          timeout=900, cwd=runner_temp)


def test_generated_workflow_installs_this_ato_pinned_and_hash_checked(ato, tmp_path: Path, wheelhouse) -> None:
    house, index = wheelhouse
    project = make_project(tmp_path / "ci-app", "ci-app")
    res = ato(["gen-ci", "--index-url", index.url, "--json"], cwd=project)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "gen-ci")
    ato_wheel = next(house.glob("ato-*.whl"))
    assert doc["requirements"][0] == {"name": "ato", "version": doc["ato_version"],
                                      "sha256": [hashlib.sha256(ato_wheel.read_bytes()).hexdigest()]}
    assert {r["name"].lower() for r in doc["requirements"]} >= {"ato", "click", "httpx", "blake3"}
    workflow_text = (project / ".github" / "workflows" / "ato-publish.yml").read_text()
    assert "dl.ato.run" not in workflow_text and "ato-cli" not in workflow_text
    wf = yaml.safe_load(workflow_text)
    job = wf["jobs"]["publish"]
    assert job["permissions"] == {"contents": "read", "id-token": "write"}
    assert job["steps"][-1]["run"] == "ato publish --ci"
    step = install_step(wf)
    assert step["env"] == {"ATO_VERSION": doc["ato_version"], "ATO_INDEX_URL": index.url}
    assert "--require-hashes" in step["run"] and f"ato=={doc['ato_version']}" in step["run"]

    done = run_install_step(step, tmp_path / "runner")
    assert done.returncode == 0, done.stdout + done.stderr
    venv_bin = tmp_path / "runner" / "ato-venv" / "bin"
    assert (tmp_path / "runner" / "github_path").read_text().strip() == str(venv_bin)
    version = subprocess.run([str(venv_bin / "ato"), "--version"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
    assert version.returncode == 0 and doc["ato_version"] in version.stdout, version.stderr
    assert doc["ato_version"] in done.stdout  # the step's own `ato --version`
    # the installed ato is this checkout's code, not the test's editable one
    where = subprocess.run([str(venv_bin / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert str(tmp_path / "runner" / "ato-venv") in where.stdout

    # one changed byte in the served wheel: the same lock line, with the step's pip options, is refused
    lock = (tmp_path / "runner" / "ato-requirements.txt").read_text()
    ato_lines = lock[:lock.index("\n", lock.index("--hash")) + 1].rstrip().rstrip("\\")
    (tmp_path / "ato-only.txt").write_text(ato_lines + "\n")
    original = ato_wheel.read_bytes()
    try:
        ato_wheel.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        bad = subprocess.run([str(venv_bin / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                              "--require-hashes", "--no-deps", "--only-binary", ":all:", "--force-reinstall",
                              "--index-url", index.url, "-r", str(tmp_path / "ato-only.txt")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        assert bad.returncode != 0 and "DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr
    finally:
        ato_wheel.write_bytes(original)

    # unchanged inputs: the file is left alone; an index without ato is a clear error
    again = ato(["gen-ci", "--index-url", index.url, "--json"], cwd=project)
    assert again.code == 0 and again.json()["state"] == "unchanged"
    (tmp_path / "empty").mkdir()
    empty = SimpleIndex(tmp_path / "empty")
    try:
        missing = ato(["gen-ci", "--index-url", empty.url], cwd=project)
        assert missing.code == 1 and f"is not on {empty.url}" in missing.stderr
    finally:
        empty.close()
