"""The publish stage: prepare -> build -> deploy, with the phase rules of seed 000.

Routes
  * **official** (``https://api.ato.run``, ``https://staging.api.ato.run``): CI-first.
    Default phases: deploy only, and deploy is a *hand-off* (CI guidance, no
    network request at all; direct uploads are not allowed). ``--build`` /
    ``--prepare --build`` add local checks. ``--legacy-full-publish`` restores
    prepare -> build -> deploy (still a hand-off) with a deprecation warning.
  * **private** (any other ``--registry``): default all three phases; deploy
    uploads directly.

Phase selection: no phase flag → the route's default; any of
``--prepare/--build/--deploy`` → exactly those. ``--artifact`` always skips
build (and prepare: it needs no capsule.toml), so it needs the deploy phase.
``--ci`` and ``--dry-run`` refuse phase flags (and ``--allow-existing``,
``--legacy-full-publish``, ``--fix``); ``--allow-existing`` needs a private
registry and the deploy phase; ``--legacy-full-publish`` and ``--fix`` are
official-only.

prepare runs ``[build.lifecycle].prepare`` from capsule.toml, else package.json
``scripts["capsule:prepare"]`` (``npm run capsule:prepare``); with neither it is
skipped, unless ``--prepare`` was asked for explicitly (then it fails).

deploy (private) verifies the artifact locally exactly as the registry will
(every digest, every frame, every payload tar entry) and uploads only the
chunks the registry lacks: ``/v1/sync/negotiate`` → ``/v1/sync/chunks`` (the
missing frames, one streamed body) → ``/v1/sync/commit`` (the skeleton: the
bytes around ``payload.tar.zst``, plus the chunk order; the registry rebuilds
the artifact and checks both digests). When the registry lacks at least half
of the payload's bytes (a first publish), or has no chunk routes, or holds
different frames for some chunk, the whole artifact goes in one streamed
``PUT /v1/local/capsules/...`` instead: the same bytes, without splitting and
re-assembling them.

When the artifact is large (OVERLAP_BYTES) and goes whole, its small members are judged
first (signature, manifest digests, ceiling: nothing is sent for a refusal there), and the
payload is judged by the verifier's stream on the very buffers that are sent, each before it
goes out; the complete verdict gates the upload's last piece. A refused artifact never
reaches the registry whole (the registry drops the partial upload), and the error is the one
the verifier gives a file. A smaller artifact, or one that goes as chunks, is verified
before anything is sent.

Scoped id: ``--scoped-id publisher/slug`` (slug must equal the manifest name,
because the registry checks the name against the path); otherwise the slug is
the manifest name and the publisher is the owner in the manifest's
``repository`` (``[metadata].repository`` first), normalised, else ``local`` —
the reference implementation's choice for local artifacts.

``--dry-run`` writes nothing anywhere: no prepare hook, no build, no upload. It
reports what each phase would do, and for an artifact it verifies it and asks
the registry (negotiate, which stores nothing) which chunks would be sent. A
version that already exists fails the dry run with E202, as the real run would.

A version conflict is E202 with three next actions (bump the version,
``--allow-existing`` for identical content, reset the local registry). A 401
is E201 with ``ATO_ERR_AUTH_REQUIRED`` (``ATO_TOKEN`` carries the token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cas.digest import label, parse
from cas.payload_manifest import PayloadManifest
from cas.stoppoints import stop_point
from pipeline import names
from pipeline.envelope import validate
from pipeline.errors import (
    E_AUTH_REQUIRED,
    E_INTEGRITY,
    E_PUBLISH_CHECK,
    E_USAGE,
    E_VERSION_CONFLICT,
    AtoError,
    Problem,
    network_error,
)
from pipeline.manifest.tomlfile import parse_toml
from pipeline.names import parse_registry
from pipeline.progress import SILENT, SILENT_TASK, Progress, Task, human_bytes
from stages.capsule import CapsuleError, Limits, Verdict, verify, verify_skeleton, verify_stream
from stages.capsule.archive import FileSource, read_layout
from stages.capsule.payload import FrameRef
from stages.registry_port import RegistryConnect, RegistryPort, VersionConflict

SCHEMA_VERSION = "1"
PHASES = ("prepare", "build", "deploy")
UPLOAD_BATCH_BYTES = 256 << 20
OVERLAP_BYTES = 8 << 20  # an artifact this large going whole is verified while it uploads
HASH_PIECE = 1 << 20
DEPRECATION = ("--legacy-full-publish is deprecated and will be removed in the next major release. "
               "Use explicit --prepare/--build/--deploy flags instead.")


@dataclass
class PublishRequest:
    project_dir: Path
    registry: str | None = None  # --registry (or ATO_REGISTRY): wins over everything
    configured_registry: str | None = None  # config.toml's `registry`: after the manifest's, before the Dock
    artifact: Path | None = None
    scoped_id: str | None = None
    allow_existing: bool = False
    prepare: bool = False
    build: bool = False
    deploy: bool = False
    legacy_full_publish: bool = False
    fix: bool = False
    dry_run: bool = False
    ci: bool = False
    force_large_payload: bool = False
    token: str | None = None

    @property
    def phase_flags(self) -> bool:
        return self.prepare or self.build or self.deploy


@dataclass(frozen=True)
class DockTarget:
    """The logged-in user's Personal Dock: where to upload, with which token, under which handle."""

    api_url: str
    token: str
    handle: str
    url: str


@dataclass(frozen=True)
class PublishPorts:
    """What publish needs from the layers above it; the CLI passes them in (ARCHITECTURE.md §3)."""

    connect: RegistryConnect  # connect(base_url, token=None) -> an open registry client
    build: Callable[[Path, bool], dict[str, Any]]  # the build phase: (project_dir, force_large_payload) -> envelope
    personal_dock: Callable[[bool], DockTarget]  # the Store session's dock (argument: dry_run); refuses when none
    store_api_url: Callable[[], str]  # where `--ci` uploads
    fix_workflow: Callable[[Path], tuple[dict[str, Any], int]]  # write the CI workflow -> (fix doc, requests)
    reporter: Progress = SILENT  # progress bars for verifying and uploading (the CLI shows them on a terminal)


@dataclass
class Phase:
    name: str
    selected: bool
    status: str = "skipped"  # ok | skipped | failed
    message: str = ""
    skipped_reason: str | None = None
    elapsed_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "selected": self.selected, "status": self.status, "ok": self.status != "failed",
                "elapsed_ms": self.elapsed_ms, "message": self.message, "skipped_reason": self.skipped_reason}


@dataclass
class LocalArtifact:
    """An artifact checked the way the registry will check it. ``skeleton``: only its small members are
    judged yet (signature, manifest digests, ceiling); the payload is judged as it uploads
    (:meth:`judging`), or by :meth:`settle` before anything else is sent."""

    path: Path
    size: int
    sha256: str
    blake3: str
    manifest: dict[str, Any]
    payload: PayloadManifest
    prefix_size: int
    payload_size: int
    frames: list[FrameRef] | None
    skeleton: Verdict | None = None
    limits: Limits | None = None

    def settle(self, verdict: Verdict | None = None) -> None:
        """Take the complete verdict (``verdict``, or :func:`verify` of the file now): raise its refusal,
        or take its frames. It must be on the very bytes hashed for the upload headers."""
        if self.skeleton is None:
            return
        verdict = (verdict or verify(self.path, self.limits)).require()
        if verdict.artifact_blake3 != label(self.blake3) or verdict.size != self.size:
            raise AtoError(E_INTEGRITY, f"{self.path} changed while it was being published (it hashed to "
                                        f"{label(self.blake3)}, then verified as {verdict.artifact_blake3})")
        if verdict.scan is None:
            raise AtoError(E_INTEGRITY, f"{self.path}: the payload was not scanned")
        self.frames = list(verdict.scan.frames) if verdict.scan.frames is not None else None
        self.skeleton = None

    def judging(self) -> tuple[Callable[[bytes, bool], None], Callable[[], None]]:
        """``(check, close)`` for an upload of the whole file: ``check(piece, last)`` passes each piece,
        before it is sent, through the verifier's stream (the payload scan runs on the very buffers
        that go out), and before the last one is sent takes the complete verdict, raising its refusal.
        ``close()`` abandons a stream that did not finish (always call it)."""
        assert self.skeleton is not None
        stream = verify_stream(self.skeleton, self.path)

        def check(piece: bytes, last: bool) -> None:
            stream.update(piece)
            if last:
                self.settle(stream.finish())
        return check, stream.close

    def refusal(self) -> AtoError | None:
        """The local check's refusal, if it refuses (judging the file now if it is not judged yet)."""
        try:
            self.settle()
        except AtoError as exc:
            return exc
        return None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or "")

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or "")

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "version": self.version, "size_bytes": self.size,
                "sha256": "sha256:" + self.sha256, "blake3": label(self.blake3),
                "manifest_hash": str(self.manifest["distribution"]["manifest_hash"]),
                "chunks": len(self.payload.chunks)}


@dataclass
class Outcome:
    doc: dict[str, Any]
    human: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def usage(message: str) -> AtoError:
    return AtoError(E_USAGE, message)


# ------------------------------------------------------------------ validation and selection


def check_flags(req: PublishRequest) -> None:
    """Flag combinations that are refused whatever the registry."""
    if req.ci and req.dry_run:
        raise usage("--ci cannot be combined with --dry-run")
    for flag, name in ((req.ci, "--ci"), (req.dry_run, "--dry-run")):
        if flag and req.phase_flags:
            raise usage(f"{name} cannot be combined with --prepare/--build/--deploy")
        if flag and (req.allow_existing or req.legacy_full_publish or req.fix):
            raise usage(f"{name} cannot be combined with --allow-existing/--legacy-full-publish/--fix")
    if req.legacy_full_publish and req.phase_flags:
        raise usage("--legacy-full-publish cannot be combined with --prepare/--build/--deploy")
    if req.scoped_id is not None and names.parse_scoped_id(req.scoped_id) is None:
        raise usage(f"--scoped-id must be publisher/slug (lowercase letters, digits, '-'), got {req.scoped_id!r}")


def resolve_registry(req: PublishRequest) -> str:
    if req.registry:
        url = parse_registry(req.registry)
    else:
        declared = _manifest_registry(req.project_dir)
        if not declared:
            raise usage("No default publish target found. Pass --registry <url> (for example "
                        "http://127.0.0.1:18787 for `ato registry serve`), or --registry https://api.ato.run / "
                        "--ci for the official Store.")
        url = parse_registry(declared)
    segs = urlsplit(url).path.split("/")
    if any(seg == "d" and nxt for seg, nxt in zip(segs, segs[1:] + [""], strict=True)):
        raise usage(f"Registry URL `{url}` is not a registry: /d/<handle> is a Store page")
    return url


def _manifest_registry(project_dir: Path) -> str | None:
    doc = _raw_manifest(project_dir)
    store = doc.get("store") if isinstance(doc.get("store"), dict) else {}
    value = store.get("registry")
    return value if isinstance(value, str) and value.strip() else None


def _raw_manifest(project_dir: Path) -> dict[str, Any]:
    path = project_dir / "capsule.toml"
    try:
        return parse_toml(path.read_text("utf-8"), path.name)
    except (OSError, UnicodeDecodeError, AtoError):
        return {}  # the build phase reads it again and reports what is wrong with it


def select_phases(req: PublishRequest, official: bool) -> list[Phase]:
    if official and not req.legacy_full_publish and not req.phase_flags:
        chosen = {"deploy"}
    elif req.legacy_full_publish or not req.phase_flags:
        chosen = set(PHASES)
    else:
        chosen = {n for n, on in zip(PHASES, (req.prepare, req.build, req.deploy), strict=True) if on}
    phases = [Phase(n, n in chosen) for n in PHASES]
    for p in phases:
        if not p.selected:
            p.skipped_reason = "not selected"
            p.message = f"{p.name} phase not selected"
    if req.artifact is not None:
        if "deploy" not in chosen:
            raise usage("The selected publish phase range is invalid: `--artifact` skips prepare and build, so it "
                        "needs the deploy phase (omit phase flags or add --deploy)")
        for p in phases[:2]:
            if p.selected:
                p.selected = False
                p.skipped_reason = "--artifact"
                p.message = f"{p.name} skipped: --artifact uses an existing .capsule"
    return phases


def check_route_flags(req: PublishRequest, official: bool, phases: list[Phase]) -> None:
    deploy = next(p for p in phases if p.name == "deploy").selected
    if req.fix and not (official and deploy):
        raise usage("--fix is only available when deploying to an official registry")
    if req.legacy_full_publish and not official:
        raise usage("--legacy-full-publish is only available for official registry publish")
    if req.allow_existing and (official or not deploy):
        raise usage("--allow-existing is only available for private registry deploy phase")


# ------------------------------------------------------------------ phases


def _timed(phase: Phase, fn: Callable[[], str | None]) -> None:
    start = time.monotonic()
    try:
        message = fn()
        phase.status = "ok"
        phase.message = message or f"{phase.name} ok"
    except BaseException:
        phase.status = "failed"
        raise
    finally:
        phase.elapsed_ms = int((time.monotonic() - start) * 1000)


def prepare_command(project_dir: Path) -> list[str] | None:
    """The prepare hook: ``[build.lifecycle].prepare`` in capsule.toml, else package.json ``capsule:prepare``."""
    doc = _raw_manifest(project_dir)
    build = doc.get("build") if isinstance(doc.get("build"), dict) else {}
    lifecycle = build.get("lifecycle") if isinstance(build.get("lifecycle"), dict) else {}
    hook = lifecycle.get("prepare")
    if isinstance(hook, str) and hook.strip():
        return ["sh", "-c", hook]
    if isinstance(hook, list) and hook and all(isinstance(x, str) for x in hook):
        return list(hook)
    pkg = project_dir / "package.json"
    if pkg.is_file():
        try:
            scripts = json.loads(pkg.read_text("utf-8")).get("scripts") or {}
        except (ValueError, OSError):
            scripts = {}
        if isinstance(scripts, dict) and scripts.get("capsule:prepare"):
            return ["npm", "run", "capsule:prepare"]
    return None


def run_prepare(req: PublishRequest, phase: Phase) -> None:
    cmd = prepare_command(req.project_dir)
    if cmd is None:
        if req.prepare:
            raise AtoError(E_USAGE, "--prepare was selected but no prepare step was found. Set "
                           "`build.lifecycle.prepare` in capsule.toml or add package.json "
                           "scripts[\"capsule:prepare\"].")
        phase.status, phase.skipped_reason, phase.message = "skipped", "no prepare step", \
            "no prepare step configured"
        return

    def go() -> str:
        try:
            proc = subprocess.run(cmd, cwd=req.project_dir, capture_output=True, text=True, timeout=3600)
        except FileNotFoundError as exc:
            raise AtoError(E_USAGE, f"prepare step {shlex.join(cmd)!r} could not start: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise AtoError(E_USAGE, f"prepare step `{shlex.join(cmd)}` failed with exit code {proc.returncode}: "
                           + " | ".join(tail), details={"command": cmd, "exit_code": proc.returncode})
        return f"ran {shlex.join(cmd)}"
    _timed(phase, go)


def inspect_local(path: Path, limits: Limits | None = None, reporter: Progress = SILENT, *,
                  overlap: bool = False) -> LocalArtifact:
    """Verify an artifact locally with the registry's own verifier (every digest, every frame, every
    payload entry, the signature, the payload ceiling); then hash it whole for the upload headers.

    ``overlap`` (a large artifact only): judge the small members and hash the file now, and leave the
    payload to be judged as it uploads (``skeleton``; see :func:`upload`)."""
    if not path.is_file():
        raise AtoError(E_USAGE, f"Artifact not found: {path}")
    if path.suffix != ".capsule":
        raise AtoError(E_USAGE, f"--artifact must point to a .capsule file (got {path.name})")
    if overlap and path.stat().st_size >= OVERLAP_BYTES:
        from concurrent.futures import ThreadPoolExecutor

        with reporter.task("Hashing", total=path.stat().st_size) as task, ThreadPoolExecutor(1) as pool:
            hashing = pool.submit(_hashes, path, task)  # the digests (GIL-free) while the small members are judged
            skeleton = _skeleton(path, limits)
            size, sha, b3 = hashing.result()
        if skeleton is not None and skeleton.capsule is not None:
            c = skeleton.capsule
            return LocalArtifact(path, size, sha, b3, c.manifest, c.payload_manifest, c.payload_offset,
                                 c.payload_size, None, skeleton, limits)
    with reporter.task("Verifying", total=None) as task:
        verdict = verify(path, limits).require()
        capsule, scan = verdict.capsule, verdict.scan
        assert capsule is not None and scan is not None
        task.update(total=path.stat().st_size, completed=0)
        size, sha, _b3 = _hashes(path, task, blake3_too=False)
    return LocalArtifact(path, verdict.size or 0, sha, parse(str(verdict.artifact_blake3)),
                         capsule.manifest, capsule.payload_manifest, capsule.payload_offset, capsule.payload_size,
                         list(scan.frames) if scan.frames is not None else None)


def _skeleton(path: Path, limits: Limits | None) -> Verdict | None:
    """:func:`verify_skeleton` of the file's bytes around its payload: every check but the payload's.
    None when it refuses or cannot be read: :func:`verify` of the file then says why, in its own words."""
    try:
        with open(path, "rb") as fh:
            src = FileSource(fh)
            layout = read_layout(src)
            start, end = layout.payload.offset, layout.payload.offset + layout.payload.size
            prefix, suffix = src.read_at(0, start), src.read_at(end, layout.size - end)
    except (OSError, CapsuleError):
        return None
    verdict = verify_skeleton(prefix, layout.payload.size, suffix, limits=limits)
    return verdict if verdict.ok else None


def _hashes(path: Path, task: Task = SILENT_TASK, *, blake3_too: bool = True) -> tuple[int, str, str]:
    """(size, SHA-256 hex, BLAKE3 hex) of the file, in one read."""
    import blake3

    sha = hashlib.sha256()
    b3 = blake3.blake3()  # one thread: AUTO waits on the GIL around every update beside a busy thread
    size = 0
    with open(path, "rb") as fh:
        while data := fh.read(HASH_PIECE):
            sha.update(data)
            if blake3_too:
                b3.update(data)
            size += len(data)
            task.advance(len(data))
    return size, sha.hexdigest(), b3.hexdigest() if blake3_too else ""


def scoped_for(art: LocalArtifact, explicit: str | None, handle: str | None = None) -> tuple[str, str]:
    """publisher/slug: a Personal Dock's handle wins (an explicit --scoped-id must then agree)."""
    name = art.name
    if explicit:
        parsed = names.parse_scoped_id(explicit)
        assert parsed is not None
        if parsed[1] != name:
            raise usage(f"--scoped-id slug {parsed[1]!r} must match artifact manifest.name {name!r}")
        if handle is not None and parsed[0] != handle:
            raise usage(f"--scoped-id publisher {parsed[0]!r} must match your Personal Dock handle {handle!r}")
        return parsed
    if not names.valid_segment(name):
        raise usage(f"capsule name {name!r} is not a valid registry slug (lowercase kebab-case); "
                    "rename it or pass --scoped-id")
    return (handle or default_publisher(art.manifest)), name


def default_publisher(manifest: dict[str, Any]) -> str:
    meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    for repo in (meta.get("repository"), manifest.get("repository")):
        if isinstance(repo, str) and repo.strip():
            text = repo.strip().removesuffix(".git")
            if "://" in text:
                parts = [p for p in urlsplit(text).path.split("/") if p]
            else:
                parts = [p for p in text.split(":")[-1].split("/") if p]
            owner = names.normalize_segment(parts[0]) if len(parts) >= 2 else ""
            if names.valid_segment(owner):
                return owner
    return "local"


def version_conflict(exc: VersionConflict, scoped: str, version: str, registry: str) -> AtoError:
    p, s = scoped.split("/")
    actions = [
        f"bump `version` in capsule.toml (now {version}), rebuild and publish again",
        "re-run with --allow-existing if the artifact is identical to the published one (idempotent retry)",
        f"reset the local registry: DELETE {registry}/v1/local/capsules/by/{p}/{s}?confirmed=true&version="
        f"{version} with the registry token, or stop the registry and remove its --data-dir",
    ]
    return AtoError(E_VERSION_CONFLICT, f"{scoped} {version} is already published to {registry}: {exc.message}",
                    details={"scoped_id": scoped, "version": version, "registry": registry,
                             "next_actions": actions},
                    hint="next actions: " + "; ".join(f"({i}) {a}" for i, a in enumerate(actions, 1)))


def _frame_offsets(art: LocalArtifact) -> list[int]:
    out, pos = [], art.prefix_size
    for f in art.frames or []:
        out.append(pos)
        pos += f.frame_size
    return out


def _read_frames(path: Path, spans: list[tuple[int, int]], task: Task = SILENT_TASK) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        buf = bytearray()
        frames = 0
        for offset, size in spans:
            fh.seek(offset)
            buf += fh.read(size)
            frames += 1
            if len(buf) >= 1 << 20:
                task.advance(len(buf), chunks=frames)
                yield bytes(buf)
                buf, frames = bytearray(), 0
        if buf:
            task.advance(len(buf), chunks=frames)
            yield bytes(buf)


def negotiate_body(art: LocalArtifact, publisher: str, slug: str, allow_existing: bool) -> dict[str, Any]:
    return {"schema_version": 3, "artifact_hash": label(art.payload.artifact_hash),
            "publisher": publisher, "slug": slug, "version": art.version, "allow_existing": allow_existing,
            "sha256": "sha256:" + art.sha256, "blake3": label(art.blake3), "size": art.size,
            "chunks": [f.to_json() for f in art.frames or []] or
                      [{"raw_hash": label(c.raw_hash), "raw_size": c.raw_size} for c in art.payload.chunks]}


WHOLE_FILE_SHARE = 0.5


def _mostly_missing(art: LocalArtifact, nego: dict[str, Any]) -> bool:
    """True when the chunks the registry lacks are at least WHOLE_FILE_SHARE of the payload's bytes
    (compressed bytes when the frames are known, else decoded bytes)."""
    missing = {m.split(":", 1)[-1] for m in nego.get("missing_chunks") or []}
    if art.frames is None:
        lacking = {c.raw_hash: c.raw_size for c in art.payload.chunks if c.raw_hash in missing}
        return sum(lacking.values()) >= WHOLE_FILE_SHARE * max(1, art.payload.total_raw_size)
    frames = art.frames
    needed = sum(f.frame_size for f in {f.raw_hash: f for f in frames if f.raw_hash in missing}.values())
    return needed >= WHOLE_FILE_SHARE * max(1, art.payload_size)


def upload(client: RegistryPort, art: LocalArtifact, publisher: str, slug: str,
           allow_existing: bool, reporter: Progress = SILENT) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Chunk-level upload when possible, else the whole artifact. Returns (status, release, transfer).

    An artifact whose payload is not judged yet (``art.skeleton``) goes whole when the registry lacks
    most of it, the verifier's stream judging each piece before it is sent and its complete verdict
    gating the last; otherwise the file is verified before anything is sent."""
    file_name = f"{slug}-{art.version}.capsule"
    transfer = {"mode": "chunks", "chunks_total": len(art.payload.chunks), "chunks_uploaded": 0,
                "bytes_uploaded": 0, "bytes_total": art.size}
    whole = ahead = False
    if art.skeleton is not None:
        # which chunks the registry lacks, asked without opening a session: a whole upload needs none
        probe = client.negotiate({**negotiate_body(art, publisher, slug, allow_existing), "dry_run": True})
        whole = probe is None or (not probe.get("existing") and _mostly_missing(art, probe))
        ahead = bool(probe and probe.get("skeleton_upload"))
        if not whole:
            art.settle()  # chunks go out only for an artifact already judged
    nego = None
    if not whole:
        nego = client.negotiate(negotiate_body(art, publisher, slug, allow_existing)) if art.frames else None
        if nego is not None and not nego.get("existing") and _mostly_missing(art, nego):
            nego = None  # the registry lacks most of it: one streamed upload of the file costs less than frames
    if nego is None or nego.get("frame_conflicts"):
        transfer["mode"] = "full"
        check, close = art.judging() if art.skeleton is not None else (None, lambda: None)
        head = (art.skeleton.skeleton[0], art.skeleton.skeleton[2]) \
            if ahead and art.skeleton is not None and art.skeleton.skeleton is not None else None
        body = art.size + (len(head[0]) + len(head[1]) if head else 0)
        try:
            with reporter.task("Uploading", total=body) as task:
                status, doc = client.upload_artifact(publisher, slug, art.version, art.path, file_name=file_name,
                                                     sha256=art.sha256, blake3_hex=art.blake3,
                                                     allow_existing=allow_existing, sent=task.advance, check=check,
                                                     skeleton=head)
        finally:
            close()
        art.settle()  # a registry that answered before the last piece: the file is judged now
        if not doc.get("already_existed"):
            transfer["chunks_uploaded"], transfer["bytes_uploaded"] = transfer["chunks_total"], body
        return status, doc, transfer
    session = str(nego["session_id"])
    missing = {m.split(":", 1)[-1] for m in nego.get("missing_chunks") or []}
    if nego.get("existing"):
        missing = set()  # same artifact already published: commit answers already_existed, nothing is sent
    frames = art.frames or []
    offsets = _frame_offsets(art)
    spans: list[tuple[int, int]] = []
    sent: set[str] = set()
    for f, off in zip(frames, offsets, strict=True):
        if f.raw_hash in missing and f.raw_hash not in sent:
            sent.add(f.raw_hash)
            spans.append((off, f.frame_size))
    batch: list[tuple[int, int]] = []
    acc = 0
    with open(art.path, "rb") as fh:
        prefix = fh.read(art.prefix_size)
        fh.seek(art.prefix_size + art.payload_size)
        suffix = fh.read()
    body = {"publisher": publisher, "slug": slug, "version": art.version, "file_name": file_name,
            "allow_existing": allow_existing, "sha256": "sha256:" + art.sha256, "blake3": label(art.blake3),
            "size": art.size, "prefix": base64.b64encode(prefix).decode("ascii"),
            "suffix": base64.b64encode(suffix).decode("ascii"),
            "chunks": [{"raw_hash": label(f.raw_hash), "raw_size": f.raw_size} for f in frames]}
    skeleton = len(prefix) + len(suffix)
    task = reporter.task("Uploading", total=sum(size for _off, size in spans) + skeleton, chunks=len(spans))
    with task:
        for span in spans + [(-1, 0)]:
            if span[0] < 0 or (acc + span[1] > UPLOAD_BATCH_BYTES and batch):
                if batch:
                    client.upload_frames(session, _read_frames(art.path, batch, task), acc)
                    transfer["chunks_uploaded"] += len(batch)
                    transfer["bytes_uploaded"] += acc
                batch, acc = [], 0
            if span[0] >= 0:
                batch.append(span)
                acc += span[1]
        stop_point("publish.uploading")  # crash tests: the registry holds the frames in a session, nothing committed
        status, doc = client.commit(session, body)
        task.advance(skeleton)
    transfer["bytes_uploaded"] += skeleton if not doc.get("already_existed") else 0
    return status, doc, transfer


# ------------------------------------------------------------------ the whole stage


WORKFLOW_FILE = Path(".github/workflows/ato-publish.yml")


def workflow_check(project_dir: Path) -> dict[str, Any]:
    """Is the official publish workflow present and usable (OIDC, tag trigger, pinned + verified ato)?"""
    path = project_dir / WORKFLOW_FILE
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return {"stage": "workflow_check", "ok": False,
                "message": f"{WORKFLOW_FILE} is missing (run `ato gen-ci` or `ato publish --fix`)"}
    missing = [what for what, needles in (
        ("permissions id-token: write", ("id-token: write",)),
        ("a push trigger on v*.*.* tags", ("push:", "tags:", "v*.*.*")),
        ("a pinned, hash-checked ato install", ("ATO_VERSION", "--require-hashes")),
        ("`ato publish --ci`", ("ato publish --ci",))) if not all(n in text for n in needles)]
    if missing:
        return {"stage": "workflow_check", "ok": False,
                "message": f"{WORKFLOW_FILE} lacks {', '.join(missing)} (run `ato publish --fix`)"}
    return {"stage": "workflow_check", "ok": True, "message": f"{WORKFLOW_FILE} is ready for OIDC publish"}


def _handoff(registry: str, version: str | None, fix: bool, project_dir: Path | None = None,
             fix_workflow: Callable[[Path], tuple[dict[str, Any], int]] | None = None) -> dict[str, Any]:
    tag = f"v{version}" if version else "v<version>"
    doc: dict[str, Any] = {
        "kind": "ci_handoff",
        "registry": registry,
        "network_requests": 0,
        "message": "Official registries accept publishes from CI only (GitHub Actions OIDC); nothing was uploaded.",
        "next_steps": [f"git tag {tag}", f"git push origin {tag}",
                       "the workflow .github/workflows/ato-publish.yml runs `ato publish --ci` with id-token: write"],
        "fix_requested": fix,
    }
    if project_dir is not None:
        check = workflow_check(project_dir)
        doc["fix"] = None
        if fix and not check["ok"] and fix_workflow is not None:
            doc["fix"], doc["network_requests"] = fix_workflow(project_dir)
            check = workflow_check(project_dir)  # diagnostics rerun once after the fix
        doc["diagnosis"] = [check]
        if not check["ok"]:
            doc["next_steps"].insert(0, "ato publish --fix  (or: ato gen-ci) to write the workflow")
    return doc


def run_publish(req: PublishRequest, *, ports: PublishPorts,
                progress: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Run the selected phases; returns the validated ``publish`` envelope and human lines."""
    check_flags(req)
    if req.ci:
        return _publish_ci(req, ports, progress)
    dock: dict[str, str] | None = None
    if not req.registry and not _manifest_registry(req.project_dir):
        if req.configured_registry:
            registry = parse_registry(req.configured_registry)
        else:
            target = ports.personal_dock(req.dry_run)
            req.token = target.token
            registry, dock = parse_registry(target.api_url), {"handle": target.handle, "url": target.url}
    else:
        registry = resolve_registry(req)
    official = names.is_official(registry) and dock is None
    phases = select_phases(req, official)
    check_route_flags(req, official, phases)
    by = {p.name: p for p in phases}
    out = Outcome({})
    if req.legacy_full_publish:
        out.warnings.append(DEPRECATION)
    artifact_path: Path | None = req.artifact.absolute() if req.artifact else None
    build_doc: dict[str, Any] | None = None
    local: LocalArtifact | None = None
    publish_doc: dict[str, Any] | None = None
    dry_report: dict[str, Any] | None = None
    handoff: dict[str, Any] | None = None
    scoped: str | None = None

    def report(p: Phase) -> None:
        progress(f"PHASE {p.name:<7} {p.status.upper():<4} {p.message}")

    # prepare
    if by["prepare"].selected:
        if req.dry_run:
            cmd = prepare_command(req.project_dir)
            by["prepare"].status, by["prepare"].skipped_reason = "skipped", "dry-run"
            by["prepare"].message = f"dry-run: would run {shlex.join(cmd)}" if cmd else "no prepare step configured"
        else:
            run_prepare(req, by["prepare"])
        report(by["prepare"])
    # build
    if by["build"].selected:
        if req.dry_run:
            by["build"].status, by["build"].skipped_reason = "skipped", "dry-run"
            by["build"].message = f"dry-run: would build {req.project_dir}"
        else:
            def do_build() -> str:
                nonlocal build_doc, artifact_path
                build_doc = ports.build(req.project_dir, req.force_large_payload)
                artifact_path = Path(build_doc["artifact"])
                return f"built {artifact_path.name} ({build_doc['artifact_blake3']})"
            _timed(by["build"], do_build)
        report(by["build"])
    # deploy
    if by["deploy"].selected:
        deploy = by["deploy"]
        if official:
            version = None
            if artifact_path is not None and artifact_path.is_file():
                local = inspect_local(artifact_path, reporter=ports.reporter)
                version = local.version
            else:
                version = str(_raw_manifest(req.project_dir).get("version") or "") or None
            handoff = _handoff(registry, version, req.fix, req.project_dir, ports.fix_workflow)
            deploy.status, deploy.message = "ok", "CI hand-off: official registries publish from CI (no upload)"
        else:
            def do_deploy() -> str:
                nonlocal local, publish_doc, dry_report, scoped
                if artifact_path is None:
                    if req.dry_run:
                        dry_report = _dry_run_without_artifact(req, registry, ports.connect)
                        return "dry-run: would build, then upload"
                    raise usage("deploy needs an artifact: pass --artifact <file.capsule> or run the build "
                                "phase")
                local = inspect_local(artifact_path, reporter=ports.reporter, overlap=not req.dry_run)
                try:
                    publisher, slug = scoped_for(local, req.scoped_id, dock["handle"] if dock else None)
                    scoped = f"{publisher}/{slug}"
                    with ports.connect(registry, req.token) as client:
                        if req.dry_run:
                            dry_report = _dry_run(client, local, publisher, slug, registry, req.token)
                            return (f"dry-run: would upload {dry_report['chunks_to_upload']} of "
                                    f"{dry_report['chunks_total']} chunks to {registry}")
                        try:
                            _status, doc, transfer = upload(client, local, publisher, slug, req.allow_existing,
                                                            ports.reporter)
                        except VersionConflict as exc:
                            raise version_conflict(exc, scoped, local.version, registry) from None
                except AtoError:
                    # the local verdict decides first: the error a check run before the upload would give
                    refused = local.refusal()
                    if refused is not None:
                        raise refused from None
                    raise
                publish_doc = {
                    "scoped_id": doc.get("scoped_id", scoped), "version": doc.get("version", local.version),
                    "artifact_url": doc.get("artifact_url"), "file_name": doc.get("file_name"),
                    "sha256": doc.get("sha256"), "blake3": doc.get("blake3"),
                    "size_bytes": doc.get("size_bytes", local.size),
                    "already_existed": bool(doc.get("already_existed")), "transfer": transfer}
                if publish_doc["blake3"] != label(local.blake3):
                    raise AtoError(E_INTEGRITY, "registry acknowledged a different artifact digest "
                                   f"({publish_doc['blake3']}) than the one uploaded ({label(local.blake3)})")
                if publish_doc["already_existed"]:
                    return f"existing release reused ({scoped} {local.version}, same digest, nothing uploaded)"
                return uploaded_line(transfer)
            _timed(deploy, do_deploy)
        report(deploy)
    if scoped is None and local is not None and not official:
        scoped = "/".join(scoped_for(local, req.scoped_id, dock["handle"] if dock else None))

    if official:
        code, message = "CI_HANDOFF", "Official registry publish is CI-first; hand-off prepared, nothing uploaded."
    elif req.dry_run:
        code, message = "PUBLISH_DRY_RUN_COMPLETED", "Publish dry-run completed. No upload performed."
    elif publish_doc is not None:
        code, message = "PUBLISHED", ("Existing release reused (same digest, no new upload)."
                                      if publish_doc["already_existed"] else
                                      "Published to Personal Dock." if dock else "Published to private registry.")
    else:
        code, message = "PUBLISH_PHASES_COMPLETED", "Selected publish phases completed."
    failed_checks = [c for c in (handoff or {}).get("diagnosis") or [] if not c["ok"]]
    doc = {
        "schema_version": SCHEMA_VERSION, "ok": not failed_checks, "code": code, "message": message,
        "registry": registry, "route": "official" if official else "personal_dock" if dock else "private",
        "dock": dock, "dry_run": req.dry_run,
        "scoped_id": scoped, "version": local.version if local else None,
        "phases": [p.to_json() for p in phases],
        "artifact": local.summary() if local else None,
        "build": {"artifact": build_doc["artifact"], "artifact_blake3": build_doc["artifact_blake3"],
                  "up_to_date": build_doc.get("up_to_date", False)} if build_doc else None,
        "publish": publish_doc, "dry_run_report": dry_report, "handoff": handoff,
        "warnings": out.warnings,
    }
    out.doc = validate(doc, "publish")
    out.human = _human(doc)
    return out


def failed_check_error(doc: dict[str, Any]) -> AtoError | None:
    """The error an official hand-off ends with when one of its diagnostics failed (None when all passed)."""
    failed = [c for c in (doc.get("handoff") or {}).get("diagnosis") or [] if not c["ok"]]
    if not failed:
        return None
    return AtoError(E_PUBLISH_CHECK, f"publish diagnostics failed: {'; '.join(c['message'] for c in failed)}",
                    details={"failed": [c["stage"] for c in failed]},
                    hint="`ato publish --fix` writes the workflow (or `ato gen-ci`), then run this again")


def ci_error(message: str) -> AtoError:
    return AtoError(E_AUTH_REQUIRED, message, problems=[Problem("ATO_ERR_AUTH_REQUIRED", message, {})])


def oidc_token() -> str:
    """The CI identity token: ``ATO_OIDC_TOKEN``, else GitHub's ID-token endpoint (its URL comes from the runner)."""
    direct = (os.environ.get("ATO_OIDC_TOKEN") or "").strip()
    if direct:
        return direct
    url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") or ""
    bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN") or ""
    if not url or not bearer:
        raise ci_error("ato publish --ci needs a GitHub Actions OIDC token: run it in a workflow with "
                       "`permissions: id-token: write` (see `ato gen-ci`)")
    import httpx

    try:
        resp = httpx.get(url, params={"audience": "ato"}, headers={"authorization": f"Bearer {bearer}"},
                         timeout=30, follow_redirects=False)
        value = resp.json().get("value") if resp.status_code == 200 else None
    except httpx.TransportError as exc:
        raise network_error(url, exc) from None
    except (httpx.HTTPError, ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value:
        raise ci_error(f"could not obtain an OIDC token from ACTIONS_ID_TOKEN_REQUEST_URL ({url})")
    return value


def _publish_ci(req: PublishRequest, ports: PublishPorts, progress: Callable[[str], None]) -> Outcome:
    """``--ci``: build here and upload to the Store with the workflow's OIDC identity (tag == v<version>)."""
    if os.environ.get("GITHUB_ACTIONS") != "true":
        raise ci_error("ato publish --ci runs only in GitHub Actions (GITHUB_ACTIONS=true); outside CI publish "
                       "with `ato publish` (Personal Dock) or --registry <url>")
    repo = os.environ.get("GITHUB_REPOSITORY") or ""
    if repo.count("/") != 1:
        raise ci_error("ato publish --ci needs GITHUB_REPOSITORY=<owner>/<repo>")
    manifest = _raw_manifest(req.project_dir)
    version = str(manifest.get("version") or "")
    if not version:
        raise usage("ato publish --ci needs capsule.toml with a version")
    if os.environ.get("GITHUB_REF_TYPE") != "tag" or os.environ.get("GITHUB_REF_NAME") != f"v{version}":
        raise usage(f"ato publish --ci publishes from a tag: expected ref v{version} (tag), got "
                    f"{os.environ.get('GITHUB_REF_NAME') or '-'} ({os.environ.get('GITHUB_REF_TYPE') or '-'})")
    token = oidc_token()
    registry = parse_registry(ports.store_api_url())
    phases = [Phase(n, True) for n in PHASES]
    phases[0].status, phases[0].skipped_reason, phases[0].message = "skipped", "ci", "prepare runs in the workflow"
    build_doc: dict[str, Any] = {}

    def do_build() -> str:
        build_doc.update(ports.build(req.project_dir, req.force_large_payload))
        return f"built {Path(build_doc['artifact']).name}"
    _timed(phases[1], do_build)
    progress(f"PHASE build   OK   {phases[1].message}")
    local = inspect_local(Path(build_doc["artifact"]), reporter=ports.reporter)
    file_name = f"{local.name}-{local.version}.capsule"
    resp_doc: dict[str, Any] = {}

    def do_deploy() -> str:
        with ports.connect(registry) as client:
            try:
                resp_doc.update(client.publish_ci(token=token, repository=repo, slug=local.name,
                                                  version=local.version, file_name=file_name, path=local.path,
                                                  sha256=local.sha256, blake3_hex=local.blake3))
            except VersionConflict as exc:
                raise version_conflict(exc, f"{repo.split('/')[0]}/{local.name}", local.version, registry) from None
        return f"uploaded {file_name}"
    _timed(phases[2], do_deploy)
    progress(f"PHASE deploy  OK   {phases[2].message}")
    if resp_doc.get("blake3") != label(local.blake3):
        raise AtoError(E_INTEGRITY, "the Store acknowledged a different artifact digest than the one uploaded")
    publish_doc = {"scoped_id": resp_doc.get("scoped_id"), "version": resp_doc.get("version"),
                   "artifact_url": resp_doc.get("artifact_url"), "file_name": resp_doc.get("file_name"),
                   "sha256": resp_doc.get("sha256"), "blake3": resp_doc.get("blake3"),
                   "size_bytes": resp_doc.get("size_bytes", local.size),
                   "already_existed": bool(resp_doc.get("already_existed")),
                   "transfer": {"mode": "full", "chunks_total": len(local.frames),
                                "chunks_uploaded": len(local.frames), "bytes_uploaded": local.size,
                                "bytes_total": local.size}}
    doc = {
        "schema_version": SCHEMA_VERSION, "ok": True, "code": "CI_PUBLISHED",
        "message": "Published to the Ato Store from CI (OIDC).", "registry": registry, "route": "ci", "dock": None,
        "dry_run": False, "scoped_id": publish_doc["scoped_id"], "version": local.version,
        "phases": [p.to_json() for p in phases], "artifact": local.summary(),
        "build": {"artifact": build_doc["artifact"], "artifact_blake3": build_doc["artifact_blake3"],
                  "up_to_date": build_doc.get("up_to_date", False)},
        "publish": publish_doc, "dry_run_report": None, "handoff": None, "warnings": [],
    }
    out = Outcome({})
    out.doc = validate(doc, "publish")
    out.human = [f"Successfully published to Ato Store! {publish_doc['scoped_id']} {local.version}",
                 f"  Integrity: {publish_doc['sha256']}, {publish_doc['blake3']}",
                 f"  Artifact URL: {publish_doc['artifact_url']}",
                 f"Next step: ato install {publish_doc['scoped_id']}"]
    return out


def _dry_run(client: RegistryPort, art: LocalArtifact, publisher: str, slug: str, registry: str,
             token: str | None) -> dict[str, Any]:
    known = client.well_known()
    auth_required = bool(known.get("write_auth_required"))
    report = {"kind": "direct_preflight", "registry": registry, "reachable": True,
              "write_auth_required": auth_required, "auth_ready": bool(token) or not auth_required,
              "scoped_id": f"{publisher}/{slug}", "version": art.version,
              "upload_endpoint": f"{registry}/v1/sync/commit",
              "chunks_total": len(art.payload.chunks), "chunks_to_upload": len(art.payload.chunks),
              "bytes_to_upload": sum(f.frame_size for f in art.frames or []) or art.size, "negotiated": False}
    if report["auth_ready"] and art.frames:
        try:
            nego = client.negotiate({**negotiate_body(art, publisher, slug, False), "dry_run": True})
        except VersionConflict as exc:
            raise version_conflict(exc, f"{publisher}/{slug}", art.version, registry) from None
        if nego is not None:
            missing = {m.split(":", 1)[-1] for m in nego.get("missing_chunks") or []}
            seen: set[str] = set()
            todo = []
            for f in art.frames:
                if f.raw_hash in missing and f.raw_hash not in seen:
                    seen.add(f.raw_hash)
                    todo.append(f)
            report.update({"chunks_to_upload": len(todo), "bytes_to_upload": sum(f.frame_size for f in todo),
                           "negotiated": True})
    return report


def _dry_run_without_artifact(req: PublishRequest, registry: str, connect: RegistryConnect) -> dict[str, Any]:
    with connect(registry, req.token) as client:
        known = client.well_known()
    auth_required = bool(known.get("write_auth_required"))
    return {"kind": "direct_preflight", "registry": registry, "reachable": True,
            "write_auth_required": auth_required, "auth_ready": bool(req.token) or not auth_required,
            "scoped_id": None, "version": None, "upload_endpoint": f"{registry}/v1/sync/commit",
            "chunks_total": None, "chunks_to_upload": None, "bytes_to_upload": None, "negotiated": False}


def uploaded_line(transfer: dict[str, Any]) -> str:
    """What the upload sent, in words: the whole file, or which chunks of it."""
    if transfer["mode"] == "full":
        return f"uploaded the whole artifact ({human_bytes(transfer['bytes_total'])})"
    return (f"uploaded {transfer['chunks_uploaded']} of {transfer['chunks_total']} chunks "
            f"({human_bytes(transfer['bytes_uploaded'])}; the registry had the rest)")


def _human(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if doc["handoff"]:
        h = doc["handoff"]
        lines += [f"CI hand-off ready for {doc['registry']}: {h['message']}"]
        if h.get("fix"):
            lines.append(f"Fix: {h['fix']['state']} {h['fix']['path']}")
        for check in h.get("diagnosis") or []:
            lines.append(f"{'OK ' if check['ok'] else 'FAIL'} {check['stage']:<14} {check['message']}")
        lines.append("Next steps:")
        lines += [f"  {s}" for s in h["next_steps"]]
        return lines
    if doc["dry_run"]:
        r = doc["dry_run_report"] or {}
        lines.append("Dry-run successful! No upload performed.")
        lines.append(f"Registry: {doc['registry']} (reachable, write auth "
                     f"{'required' if r.get('write_auth_required') else 'off'}, token "
                     f"{'ready' if r.get('auth_ready') else 'missing'})")
        if r.get("chunks_total") is not None:
            lines.append(f"Would upload {r['chunks_to_upload']} of {r['chunks_total']} chunks "
                         f"({human_bytes(r['bytes_to_upload'])}) as {r['scoped_id']} {r['version']}")
        return lines
    pub = doc["publish"]
    if pub is None:
        return [doc["message"]]
    t = pub["transfer"]
    where = f"your Personal Dock ({doc['dock']['url']})" if doc.get("dock") else doc["registry"]
    lines += [f"Published {pub['scoped_id']} {pub['version']} to {where}",
              f"  Integrity: {pub['sha256']}, {pub['blake3']}",
              f"  Artifact URL: {pub['artifact_url']}"]
    if pub["already_existed"]:
        lines.append("  Existing release reused (same digest, no new upload).")
    else:
        line = uploaded_line(t)
        lines.append(f"  {line[0].upper()}{line[1:]}")
    lines.append(f"Next step: ato install {pub['scoped_id']}" if doc.get("dock") else
                 f"Next step: ato install {pub['scoped_id']} --registry {doc['registry']}")
    return lines
