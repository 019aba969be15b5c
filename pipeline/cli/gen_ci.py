"""``ato gen-ci``: write the GitHub Actions workflow for keyless (OIDC) official publishing.

The workflow pins this ato version and verifies the downloaded release with ``sha256sum -c``.
The checksum comes from ``--checksum`` or from ``{ATO_RELEASE_BASE_URL or https://dl.ato.run}/ato/
releases/<version>/SHA256SUMS`` (no other host is contacted). The file is rewritten only when its
content would change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from cas.atomic import write_text_atomic
from pipeline.cli.common import emit, info, json_option, warn
from pipeline.cli.help import examples
from pipeline.errors import E_NETWORK, E_NOT_FOUND, E_USAGE, AtoError

WORKFLOW_PATH = Path(".github/workflows/ato-publish.yml")
ASSET = "ato-cli-x86_64-unknown-linux-gnu.tar.xz"
DEFAULT_RELEASE_BASE = "https://dl.ato.run"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

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

      - name: Install Ato CLI (Pinned & Verified)
        env:
          ATO_VERSION: "{version}"
          ATO_CHECKSUM: "{checksum}"
        run: |
          set -euo pipefail
          curl -fsSL -o {asset} "{base}/ato/releases/${{ATO_VERSION}}/{asset}"
          echo "${{ATO_CHECKSUM}}  {asset}" | sha256sum -c -
          tar -xJf {asset}
          sudo mv ato /usr/local/bin/ato
          ato --version

      - name: Publish to Ato Store
        run: ato publish --ci
"""


def release_base() -> str:
    return (os.environ.get("ATO_RELEASE_BASE_URL") or DEFAULT_RELEASE_BASE).rstrip("/")


def fetch_checksum(version: str) -> str:
    import httpx

    url = f"{release_base()}/ato/releases/{version}/SHA256SUMS"
    try:
        resp = httpx.get(url, timeout=15, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise AtoError(E_NETWORK, f"network error: cannot fetch release checksums {url}: {exc}", hint="pass --checksum <sha256> to skip the download") from None
    if resp.status_code != 200:
        raise AtoError(E_NETWORK, f"release checksums not available at {url} (HTTP {resp.status_code})", hint="pass --checksum <sha256> to skip the download")
    for line in resp.text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == ASSET and _HEX64.match(parts[0]):
            return parts[0].lower()
    raise AtoError(E_NETWORK, f"{url} has no checksum for {ASSET}")


def render_workflow(version: str, checksum: str) -> str:
    return TEMPLATE.format(version=version, checksum=checksum, asset=ASSET, base=release_base())


def write_workflow(project_dir: Path, version: str, checksum: str) -> tuple[Path, str]:
    """Write (only when different); returns the path and ``generated|updated|unchanged``."""
    path = project_dir / WORKFLOW_PATH
    text = render_workflow(version, checksum)
    try:
        current = path.read_text("utf-8")
    except FileNotFoundError:
        current = None
    if current == text:
        return path, "unchanged"
    write_text_atomic(path, text)
    return path, "generated" if current is None else "updated"


@click.command("gen-ci", epilog=examples("ato gen-ci", "ato gen-ci --ato-version 0.1.0 --checksum <sha256>"))
@click.option("--checksum", metavar="SHA256", help=f"sha256 of {ASSET} for this version (skips the download).")
@click.option("--ato-version", "ato_version", metavar="VERSION", help="ato version to pin (default: this one).")
@json_option
def gen_ci_cmd(checksum: str | None, ato_version: str | None) -> None:
    """Write the GitHub Actions workflow for official (OIDC) publishing.

    .github/workflows/ato-publish.yml installs a pinned, checksum-verified ato and runs `ato publish --ci`.
    """
    from pipeline.cli.main import _version

    cwd = Path.cwd()
    if not (cwd / "capsule.toml").is_file():
        raise AtoError(E_NOT_FOUND, f"capsule.toml not found in current directory: {cwd}")
    if not (cwd / ".git").exists():
        warn(".git directory was not found. Continuing, but this command is intended for git repositories.")
    version = ato_version or _version()
    if checksum is not None and not _HEX64.match(checksum):
        raise AtoError(E_USAGE, f"--checksum must be 64 hex digits (sha256), got {checksum!r}")
    digest = (checksum or fetch_checksum(version)).lower()
    path, state = write_workflow(cwd, version, digest)
    info("Workflow uses keyless OIDC CI publish (no signing key secret required).")
    doc = {"schema_version": "1", "path": str(path), "state": state, "ato_version": version, "checksum": digest}
    human = (f"CI workflow is already up-to-date: {path}" if state == "unchanged" else
             f"{state.capitalize()} CI workflow: {path}\n   Next step: commit and push this workflow file.")
    emit(doc, "gen-ci", human)


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    group.add_command(gen_ci_cmd)
