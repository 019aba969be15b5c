"""``ato gen-ci``: write the GitHub Actions workflow for keyless (OIDC) official publishing.

The workflow installs *this* ato, the Python package, the way Python tools are installed in CI: a
fresh virtual environment and ``pip install --require-hashes --no-deps --only-binary :all:`` of a
lock that pins ato and every package it needs (``name==version`` plus the SHA-256 of each of that
version's files). The lock is written into the workflow itself, so the workflow file alone says
exactly which bytes CI runs. Pins are the versions installed beside the running ato (its dependency
closure, markers evaluated for the Linux runner and ``--python``); hashes come from the package
index (``--index-url``, default ``$PIP_INDEX_URL`` or PyPI's simple API), the only host contacted. Then
``ato publish --ci`` runs with ``id-token: write``. The file is rewritten only when its content
would change.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import click

from cas.atomic import write_text_atomic
from pipeline.cli.common import emit, info, json_option, warn
from pipeline.cli.help import examples
from pipeline.errors import E_NETWORK, E_NOT_FOUND, E_USAGE, AtoError, http_error, network_error

WORKFLOW_PATH = Path(".github/workflows/ato-publish.yml")
DIST_NAME = "ato"
DEFAULT_INDEX = "https://pypi.org/simple"
REQUIREMENTS_MARK = "ATO_REQUIREMENTS"
_PY = re.compile(r"^3\.\d{1,2}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

TEMPLATE = """\
name: Publish Capsule to Ato Store

on:
  push:
    tags:
      - "v*.*.*"
  workflow_dispatch:

concurrency:
  group: ${{{{ github.workflow }}}}-${{{{ github.ref }}}}
  cancel-in-progress: true

jobs:
  publish:
    runs-on: ubuntu-latest
    permissions:
      contents: read
      id-token: write
    steps:
      - name: Checkout
        uses: actions/checkout@v4

      - name: Set up Python
        uses: actions/setup-python@v5
        with:
          python-version: "{python}"

      # ato and every package it needs, pinned by version and SHA-256 (written by `ato gen-ci`)
      - name: Install ato (pinned, hash-checked)
        env:
          ATO_VERSION: "{version}"
          ATO_INDEX_URL: "{index}"
        run: |
          set -euo pipefail
          cat > "$RUNNER_TEMP/ato-requirements.txt" <<'{mark}'
{requirements}
          {mark}
          python3 -m venv "$RUNNER_TEMP/ato-venv"
          "$RUNNER_TEMP/ato-venv/bin/python" -m pip install --disable-pip-version-check --no-input \\
            --require-hashes --no-deps --only-binary :all: --no-compile --index-url "$ATO_INDEX_URL" \\
            -r "$RUNNER_TEMP/ato-requirements.txt"
          echo "$RUNNER_TEMP/ato-venv/bin" >> "$GITHUB_PATH"
          "$RUNNER_TEMP/ato-venv/bin/ato" --version

      - name: Publish to Ato Store
        run: ato publish --ci
"""


@dataclass(frozen=True)
class Pin:
    """One locked package: its name, exact version, and the SHA-256 of each file of that version."""

    name: str
    version: str
    hashes: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"{self.name}=={self.version} \\"] + [
            f"    --hash=sha256:{h}" + (" \\" if i < len(self.hashes) - 1 else "") for i, h in enumerate(self.hashes)]


# ---------------------------------------------------------------- what to pin


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values of the CI runner (GitHub's ubuntu-latest, CPython ``python``)."""
    return {"os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "platform_python_implementation": "CPython",
            "implementation_name": "cpython", "python_version": python, "python_full_version": f"{python}.0",
            "implementation_version": f"{python}.0", "platform_release": "", "platform_version": ""}


def closure(python: str) -> list[tuple[str, str]]:
    """``(name, version)`` of ato and everything it needs on the runner, from what is installed here."""
    from packaging.requirements import InvalidRequirement, Requirement

    env = target_environment(python)
    found: dict[str, tuple[str, str]] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(DIST_NAME, frozenset())]
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in visited:
            continue
        visited.add((canonical(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise AtoError(E_USAGE, f"cannot pin {name}: it is not installed beside this ato",
                           hint="run gen-ci from the environment ato is installed in, on Linux (the runner's "
                                "platform), or pass the runner's --python") from None
        found[canonical(name)] = (dist.metadata["Name"] or name, dist.version)
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                todo.append((req.name, frozenset(req.extras)))
    ato = found.pop(canonical(DIST_NAME))
    return [ato] + sorted(found.values(), key=lambda nv: canonical(nv[0]))


class _Links(HTMLParser):
    """Anchors of a PEP 503 simple page: (file name, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


def index_files(client: Any, index: str, name: str) -> list[tuple[str, str]]:
    """``(file name, sha256)`` of every file the index lists for ``name`` (PEP 691 JSON or PEP 503 HTML)."""
    import httpx

    url = f"{index.rstrip('/')}/{canonical(name)}/"
    try:
        resp = client.get(url, headers={"accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    except httpx.HTTPError as exc:
        raise network_error(url, exc, doing=f"read {url}") from None
    if resp.status_code == 404:
        return []
    if resp.status_code != 200:
        raise http_error(url, resp.status_code, message=f"package index answered HTTP {resp.status_code} for {url}")
    out: list[tuple[str, str]] = []
    if "json" in resp.headers.get("content-type", ""):
        try:
            for f in resp.json().get("files") or []:
                out.append((str(f["filename"]), str((f.get("hashes") or {}).get("sha256", "")).lower()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AtoError(E_NETWORK, f"{url} is not a PEP 691 simple page") from None
        return out
    parser = _Links()
    parser.feed(resp.text)
    for text, href in parser.links:
        fragment = urlsplit(urljoin(url, href)).fragment
        algo, _, digest = fragment.partition("=")
        filename = text or urlsplit(href).path.rsplit("/", 1)[-1]
        out.append((filename, digest.lower() if algo == "sha256" else ""))
    return out


def file_version(filename: str) -> tuple[str, str] | None:
    """(canonical name, version) of a wheel or sdist file name; None for anything else."""
    from packaging.utils import (
        InvalidSdistFilename,
        InvalidWheelFilename,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    try:
        if filename.endswith(".whl"):
            name, version, _build, _tags = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
        else:
            return None
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return str(name), str(version)


def pin(client: Any, index: str, name: str, version: str) -> Pin:
    """Every file of ``name==version`` on the index, by SHA-256 (pip picks the one for the runner)."""
    from packaging.version import InvalidVersion, Version

    try:
        want = Version(version)
    except InvalidVersion:
        raise AtoError(E_USAGE, f"{name} {version} is not a version pip can pin") from None
    hashes: list[str] = []
    for filename, sha in index_files(client, index, name):
        parsed = file_version(filename)
        if parsed is None or parsed[0] != canonical(name) or Version(parsed[1]) != want:
            continue
        if not _SHA256.match(sha):
            raise AtoError(E_USAGE, f"{index} lists {filename} without a sha256 hash: nothing to check it against",
                           hint="use an index that publishes file hashes (PEP 503 #sha256= or PEP 691)")
        hashes.append(sha)
    if not hashes:
        hint = ("publish this ato's wheel to that index (or pass --index-url of an index that has it)"
                if canonical(name) == DIST_NAME else "use --index-url of an index that mirrors it")
        raise AtoError(E_USAGE, f"{name}=={version} is not on {index}", hint=hint)
    return Pin(name, version, tuple(sorted(set(hashes))))


def lock(index: str, python: str) -> list[Pin]:
    """The pins of ato and its dependencies, hashed from the index (one request per package)."""
    import httpx

    with httpx.Client(timeout=30, follow_redirects=True) as client:
        return [pin(client, index, name, version) for name, version in closure(python)]


# ---------------------------------------------------------------- the workflow


def render_workflow(pins: Iterable[Pin], index: str, python: str) -> str:
    pins = list(pins)
    lines = [line for p in pins for line in p.lines()]
    block = "\n".join(" " * 10 + line for line in lines)
    return TEMPLATE.format(version=pins[0].version, index=index, python=python, mark=REQUIREMENTS_MARK,
                           requirements=block)


def pins_in(text: str) -> tuple[list[Pin], str, str] | None:
    """The lock, index and Python of a workflow this command wrote (None if it is not one)."""
    block = re.search(rf"<<'{REQUIREMENTS_MARK}'\n(.*?)\n\s*{REQUIREMENTS_MARK}\n", text, re.S)
    index = re.search(r'ATO_INDEX_URL:\s*"([^"]+)"', text)
    python = re.search(r'python-version:\s*"([^"]+)"', text)
    if not (block and index and python):
        return None
    pins: list[Pin] = []
    for line in block.group(1).splitlines():
        line = line.strip().rstrip("\\").strip()
        if m := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line):
            pins.append(Pin(m.group(1), m.group(2), ()))
        elif (m := re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", line)) and pins:
            pins[-1] = Pin(pins[-1].name, pins[-1].version, (*pins[-1].hashes, m.group(1)))
    if not pins or canonical(pins[0].name) != DIST_NAME or any(not p.hashes for p in pins):
        return None
    return pins, index.group(1), python.group(1)


def write_workflow(project_dir: Path, text: str) -> tuple[Path, str]:
    """Write (only when different); returns the path and ``generated|updated|unchanged``."""
    path = project_dir / WORKFLOW_PATH
    try:
        current: str | None = path.read_text("utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        current = None
    if current == text:
        return path, "unchanged"
    write_text_atomic(path, text)
    return path, "generated" if current is None else "updated"


def check_options(index: str, python: str) -> None:
    if urlsplit(index).scheme not in ("https", "http") or not urlsplit(index).hostname:
        raise AtoError(E_USAGE, f"--index-url must be an http(s) URL of a simple package index, got {index!r}")
    if not _PY.match(python):
        raise AtoError(E_USAGE, f"--python must look like 3.12, got {python!r}")


def default_index() -> str:
    """pip's own setting when there is one (a company mirror), else PyPI."""
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def default_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def fix_workflow(project_dir: Path) -> tuple[dict[str, Any], int]:
    """``ato publish --fix``: rewrite the workflow from the pins it already carries (no network), or lock
    afresh from the default index. Returns (fix doc, network requests made)."""
    path = project_dir / WORKFLOW_PATH
    try:
        found = pins_in(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError):
        found = None
    requests = 0
    if found is None:
        index, python = default_index(), default_python()
        check_options(index, python)
        pins = lock(index, python)
        requests = len(pins)
    else:
        pins, index, python = found
    written, state = write_workflow(project_dir, render_workflow(pins, index, python))
    return {"applied": state != "unchanged", "path": str(written), "state": state}, requests


@click.command("gen-ci", epilog=examples("ato gen-ci", "ato gen-ci --index-url https://pypi.example.com/simple --python 3.12"))
@click.option("--index-url", "index_url", default=None, metavar="URL",
              help="Package index (PEP 503/691 simple API) the workflow installs ato from, and that gen-ci reads "
                   f"the hashes from (default: $PIP_INDEX_URL, else {DEFAULT_INDEX}).")
@click.option("--python", "python", default=None, metavar="X.Y",
              help="Python version of the CI runner (default: this interpreter's).")
@json_option
def gen_ci_cmd(index_url: str | None, python: str | None) -> None:
    """Write the GitHub Actions workflow for official (OIDC) publishing.

    .github/workflows/ato-publish.yml installs this ato with a pinned, hash-checked pip install and runs
    `ato publish --ci` (id-token: write).
    """
    cwd = Path.cwd()
    if not (cwd / "capsule.toml").is_file():
        raise AtoError(E_NOT_FOUND, f"capsule.toml not found in current directory: {cwd}")
    if not (cwd / ".git").exists():
        warn(".git directory was not found. Continuing, but this command is intended for git repositories.")
    python = python or default_python()
    index = index_url.rstrip("/") if index_url else default_index()
    check_options(index, python)
    pins = lock(index, python)
    path, state = write_workflow(cwd, render_workflow(pins, index, python))
    info("Workflow uses keyless OIDC CI publish (no signing key secret required).")
    doc = {"schema_version": "1", "path": str(path), "state": state, "ato_version": pins[0].version,
           "index_url": index, "python": python,
           "requirements": [{"name": p.name, "version": p.version, "sha256": list(p.hashes)} for p in pins]}
    human = (f"CI workflow is already up-to-date: {path}" if state == "unchanged" else
             f"{state.capitalize()} CI workflow: {path} (ato {pins[0].version} and {len(pins) - 1} dependencies, "
             f"pinned and hash-checked from {index})\n   Next step: commit and push this workflow file.")
    emit(doc, "gen-ci", human)


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(gen_ci_cmd)
