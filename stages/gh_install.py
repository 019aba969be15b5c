"""``ato install --from-gh-repo owner/repo``: download the repository archive, build it, install it.

The archive comes from ``{ATO_GITHUB_API_URL or https://api.github.com}/repos/<owner>/<repo>/tarball``.
Redirects are followed only to the same host (or, for GitHub's own API, to codeload.github.com):
no other host is contacted. The archive is extracted with path checks (no absolute paths, no ``..``,
no links leaving the tree), must hold a ``capsule.toml`` at its root, and is built with our own
pipeline; the artifact is installed under ``$ATO_HOME/store/<owner>/<name>/<version>/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cas.atomic import atomic_writer
from cas.digest import label
from pipeline import names, paths
from pipeline.envelope import validate
from pipeline.errors import (
    E_MANIFEST_MISSING,
    E_NETWORK,
    E_PAYLOAD_TOO_LARGE,
    E_USAGE,
    AtoError,
    http_error,
    network_error,
)
from pipeline.progress import SILENT, Progress
from stages import installed
from stages.trust_port import TrustPort

DEFAULT_GITHUB_API = "https://api.github.com"
MAX_ARCHIVE_BYTES = 512 << 20
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")


def github_api() -> str:
    return (os.environ.get("ATO_GITHUB_API_URL") or DEFAULT_GITHUB_API).rstrip("/")


def _allowed_hosts(base: str) -> set[str]:
    host = urlsplit(base).netloc.lower()
    return {host, "codeload.github.com"} if host == "api.github.com" else {host}


def download_archive(repo: str, dest: Path, reporter: Progress = SILENT) -> str:
    import httpx

    base = github_api()
    url = f"{base}/repos/{repo}/tarball"
    allowed = _allowed_hosts(base)
    headers = {"user-agent": "ato-cli (python)", "accept": "application/vnd.github+json"}
    gh_token = os.environ.get("GITHUB_TOKEN")
    try:
        with httpx.Client(timeout=httpx.Timeout(300, connect=15), follow_redirects=False) as http:
            for _ in range(5):
                same = urlsplit(url).netloc.lower() == urlsplit(base).netloc.lower()
                send = {**headers, "authorization": f"Bearer {gh_token}"} if (gh_token and same) else headers
                with http.stream("GET", url, headers=send) as resp:
                    if resp.status_code in (301, 302, 303, 307, 308):
                        nxt = str(resp.url.join(resp.headers.get("location", "")))
                        if urlsplit(nxt).netloc.lower() not in allowed:
                            raise AtoError(E_USAGE, f"refusing to follow a redirect to another host: {nxt}")
                        url = nxt
                        continue
                    if resp.status_code == 404:
                        raise AtoError(E_USAGE, f"GitHub repository {repo} was not found at {base}")
                    if resp.status_code != 200:
                        raise http_error(base, resp.status_code, message=f"downloading {repo} from {base} failed "
                                                                         f"(HTTP {resp.status_code})")
                    size = 0
                    length = resp.headers.get("content-length", "")
                    with open(dest, "wb") as fh, reporter.task(
                            "Downloading", total=int(length) if length.isdigit() else None) as task:
                        for piece in resp.iter_bytes():
                            size += len(piece)
                            if size > MAX_ARCHIVE_BYTES:
                                raise AtoError(E_USAGE, f"repository archive of {repo} is larger than 512 MiB")
                            fh.write(piece)
                            task.advance(len(piece))
                    return url
    except httpx.HTTPError as exc:
        raise network_error(base, exc, doing=f"download {repo} from {base}", repository=repo) from None
    raise AtoError(E_NETWORK, f"too many redirects downloading {repo}")


def extract(archive: Path, into: Path, max_bytes: int | None = None) -> Path:
    """Safe extraction; returns the single top-level directory (GitHub's ``owner-repo-sha/``) or ``into``.

    A small archive can expand to far more (a decompression bomb): the members' sizes are summed in a
    first streaming pass, and more than ``max_bytes`` (the payload ceiling) is refused (E212) before
    a byte is written."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            total = 0
            for member in tf:  # streams: the gzip is decoded once, nothing is kept but the headers
                total += member.size if member.isfile() else 0
                if max_bytes is not None and total > max_bytes:
                    raise AtoError(E_PAYLOAD_TOO_LARGE,
                                   f"repository archive expands to more than {max_bytes} bytes (the payload ceiling)",
                                   hint="pass --force-large-payload, or raise the ceiling: "
                                        "ato config set payload.max_bytes BYTES")
            tf.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AtoError(E_USAGE, f"repository archive is not a valid tarball: {exc}") from None
    entries = [p for p in into.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def install_from_gh_repo(repo: str, *, build_fn: Callable[[Path], dict[str, Any]],
                         trust: TrustPort | None = None,
                         progress: Callable[[str], None] = lambda _m: None,
                         reporter: Progress = SILENT) -> dict[str, Any]:
    from cas.store import CasStore
    from stages.capsule import Limits
    from stages.install import ensure_stored, store_path

    if not _REPO.match(repo):
        raise AtoError(E_USAGE, f"--from-gh-repo expects owner/repo, got {repo!r}")
    owner = names.normalize_segment(repo.split("/")[0])
    with tempfile.TemporaryDirectory(prefix="ato-gh-") as tmp:
        archive = Path(tmp) / "repo.tar.gz"
        progress(f"Downloading {repo} from {github_api()}")
        download_archive(repo, archive, reporter)
        archive_size = archive.stat().st_size
        root = extract(archive, Path(tmp) / "src", trust.limits.max_payload if trust is not None else None)
        if not (root / "capsule.toml").is_file():
            raise AtoError(E_MANIFEST_MISSING, f"repository {repo} has no capsule.toml at its root; "
                           "add one (see `ato inspect requirements`) to install it with ato")
        progress(f"Building {repo}")
        built = build_fn(root)
        artifact = Path(built["artifact"])
        from stages.publish import inspect_local

        local = inspect_local(artifact)
        slug = local.name
        if not names.valid_segment(slug):
            raise AtoError(E_USAGE, f"capsule name {slug!r} is not a valid slug (lowercase kebab-case)")
        scoped = f"{owner}/{slug}"
        target = store_path(owner, slug, local.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        checked = trust.check(artifact, scoped) if trust is not None else None
        with open(artifact, "rb") as src, atomic_writer(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    cas = CasStore(paths.cas_root())
    with cas.shared():
        ensure_stored(cas, target, local.blake3, trust.limits if trust is not None else Limits())
    doc = {
        "capsule_id": f"gh-{owner}-{slug}", "scoped_id": scoped, "publisher": owner, "slug": slug,
        "version": local.version, "path": str(target), "content_hash": label(local.blake3),
        "install_kind": "Standard", "launchable": {"CapsuleArchive": {"path": str(target)}},
        "local_derivation": None,
        "projection": {"performed": False, "projection_id": None, "projected_path": None, "state": "skipped",
                       "schema_version": "0.1", "metadata_path": None},
        "managed_environment": None, "promotion": None, "schema_version": "0.1",
        "registry": github_api(), "up_to_date": False, "size_bytes": local.size,
        "transfer": {"mode": "full", "chunks_total": len(local.frames), "chunks_downloaded": 0,
                     "chunks_reused": 0, "bytes_downloaded": archive_size,
                     "bytes_reused": 0, "skeleton_bytes": 0, "artifact_bytes": local.size},
        "source": {"kind": "github", "repository": repo},
    }
    if checked is not None:
        doc.update(checked)
    validate(doc, "install")
    from stages.install import record_facts

    installed.write_record({**doc, "registry": f"github:{repo}", **record_facts(target)})
    return doc
