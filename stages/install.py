"""The install stage for standard artifacts: resolve → fetch (delta) → verify → store.

``ato install <publisher>/<slug>[@version] --registry URL``:

1. resolve: detail (for ``capsule_id`` and the latest version), then the
   distribution of the wanted version (digests, file name, skeleton URL);
2. no-op: when ``$ATO_HOME/store/<p>/<s>/<v>/<s>-<v>.capsule`` already has the
   published BLAKE3, nothing is downloaded and the same envelope is printed;
3. delta fetch: the release *skeleton* (bytes before and after
   ``payload.tar.zst`` and the ordered frames, each with its raw hash and the
   BLAKE3 of the exact frame bytes). Frames already in the local CAS are reused
   when they are byte-identical to the published ones; the others are fetched
   in one streamed request per ≤4096 chunks (``POST /v1/chunks/fetch``), each
   checked (frame BLAKE3, decodes to exactly its chunk) and staged into the CAS;
4. splice: prefix + frames + suffix are written to a temp file beside the
   target, hashed on the way; the size, SHA-256 and BLAKE3 must equal the
   published ones, and the artifact is then opened and checked (manifest
   name/version, Merkle root, manifest hash, every chunk) before the staged
   chunks and the payload manifest go into the CAS and the file is renamed
   into place. A failure leaves the store and the CAS as they were.

A registry that serves no skeleton (or a release whose frames are not its
chunks) is downloaded whole from ``artifact_url`` with the same checks; its
chunks are then added to the local CAS so the next version is a delta.

The envelope is CONTRACTS.md §4's install contract (``install_kind``
``Standard``, ``launchable.CapsuleArchive.path``, ``local_derivation`` null,
``projection`` not performed) plus ``transfer``: chunks and bytes downloaded
versus reused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import fsync_dir
from cas.digest import blake3_file, label, parse
from cas.store import CasStore
from pipeline import paths
from pipeline.envelope import validate
from pipeline.errors import E_INTEGRITY, E_USAGE, AtoError, Problem
from pipeline.registry import names
from pipeline.registry.client import RegistryClient, RegistryHttpError
from pipeline.registry.frames import (
    FrameError,
    FrameRef,
    NotSpliceable,
    UnsafePayload,
    check_frame,
    split_payload,
)
from stages.artifact import open_capsule, verify_capsule

SCHEMA_VERSION = "0.1"
FETCH_BATCH = 4096

# Trust hook (issue 6): ``verify(path, scoped_id)`` checks digests, signature and the trust decision
# (pipeline.trust.verify, which stages may not import) and returns {"signed", "signer", "trust"} for the
# envelope, or raises. It runs on the downloaded file before it is committed to the store or the CAS,
# and again on an already-installed artifact, so a key revoked since is refused there too.
Verifier = Callable[[Path, str], dict[str, Any]]


def integrity(message: str, **details: Any) -> AtoError:
    return AtoError(E_INTEGRITY, f"ATO_ERR_INTEGRITY_FAILURE: {message}", details=details,
                    problems=[Problem("ATO_ERR_INTEGRITY_FAILURE", message, details)])


def parse_ref(ref: str, version: str | None) -> tuple[str, str, str | None]:
    text = ref.strip().lstrip("@")
    at_version = None
    if "@" in text:
        text, at_version = text.split("@", 1)
    if "/" not in text:
        raise AtoError(E_USAGE, f"scoped_id_required: {ref!r} requires a publisher scope (publisher/slug)")
    parsed = names.parse_scoped_id(text)
    if parsed is None:
        raise AtoError(E_USAGE, f"invalid capsule reference {ref!r}: expected publisher/slug[@version]")
    if at_version and version and at_version != version:
        raise AtoError(E_USAGE, f"conflicting_version_request: ref specifies version {at_version!r} but "
                                f"--version requested {version!r}")
    wanted = version or at_version or None
    if wanted is not None and not names.valid_version(wanted):
        raise AtoError(E_USAGE, f"invalid version {wanted!r}")
    return parsed[0], parsed[1], wanted


def store_path(publisher: str, slug: str, version: str) -> Path:
    return paths.store_dir() / publisher / slug / version / f"{slug}-{version}.capsule"


@dataclass
class Transfer:
    mode: str = "none"  # none | delta | full
    chunks_total: int = 0
    chunks_downloaded: int = 0
    chunks_reused: int = 0
    bytes_downloaded: int = 0
    bytes_reused: int = 0
    skeleton_bytes: int = 0
    artifact_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Expect:
    size: int
    sha256: str
    blake3: str


class _FrameStream:
    """Cut a byte stream into frames of known sizes."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.buf = bytearray()

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                self.buf += next(self.pieces)
            except StopIteration:
                raise integrity(f"registry chunk stream ended early ({len(self.buf)} of {n} bytes)") from None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class _Staging:
    cas: CasStore
    staged: dict[str, Path] = field(default_factory=dict)

    def add(self, raw_hash: str, frame: bytes) -> None:
        if raw_hash not in self.staged:
            self.staged[raw_hash] = self.cas.objects.write_temp(raw_hash, frame)

    def publish(self) -> int:
        items = list(self.staged.items())
        self.staged = {}
        return self.cas.objects.publish_temps(items)

    def discard(self) -> None:
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged = {}


def _batched_fetch(client: RegistryClient, hexes: list[str]) -> Iterator[bytes]:
    for i in range(0, len(hexes), FETCH_BATCH):
        yield from client.fetch_chunks(hexes[i:i + FETCH_BATCH])


def _splice(client: RegistryClient, skel: dict[str, Any], cas: CasStore, out: Path, transfer: Transfer,
            staging: _Staging) -> tuple[str, str, int]:
    prefix = base64.b64decode(skel["prefix"])
    suffix = base64.b64decode(skel["suffix"])
    frames = [FrameRef.from_json(f) for f in skel["frames"]]
    transfer.mode = "delta"
    transfer.chunks_total = len(frames)
    transfer.skeleton_bytes = len(prefix) + len(suffix)
    # which frames the local CAS holds byte-identically (each read is verified against its raw hash)
    reuse: set[str] = set()
    for f in frames:
        if f.raw_hash in reuse or not cas.objects.has(f.raw_hash):
            continue
        try:
            frame = cas.objects.read_frame(f.raw_hash, f.raw_size)
        except Exception:  # noqa: BLE001 - a damaged or racing local object is simply fetched again
            continue
        if len(frame) == f.frame_size and blake3.blake3(frame).hexdigest() == f.frame_blake3:
            reuse.add(f.raw_hash)
    fetch: list[str] = []
    for f in frames:
        if f.raw_hash not in reuse and f.raw_hash not in fetch:
            fetch.append(f.raw_hash)
    fetch_set = set(fetch)
    stream = _FrameStream(_batched_fetch(client, fetch)) if fetch else None
    fetched: set[str] = set()
    sha, b3, size = hashlib.sha256(), blake3.blake3(), 0
    with open(out, "wb") as fh:
        def put(data: bytes) -> None:
            nonlocal size
            fh.write(data)
            sha.update(data)
            b3.update(data)
            size += len(data)
        put(prefix)
        for f in frames:
            if f.raw_hash in reuse:
                data = cas.objects.path(f.raw_hash).read_bytes()
                transfer.chunks_reused += 1
                transfer.bytes_reused += len(data)
            elif f.raw_hash in fetched:
                data = staging.staged[f.raw_hash].read_bytes()
            else:
                assert stream is not None and f.raw_hash in fetch_set
                data = stream.take(f.frame_size)
                fetched.add(f.raw_hash)
                transfer.chunks_downloaded += 1
                transfer.bytes_downloaded += len(data)
                try:
                    check_frame(data, f.raw_hash, f.raw_size)
                except FrameError as exc:
                    raise integrity(f"chunk blake3:{f.raw_hash} from the registry is corrupt: {exc}") from None
                staging.add(f.raw_hash, data)
            if blake3.blake3(data).hexdigest() != f.frame_blake3:
                raise integrity(f"frame of chunk blake3:{f.raw_hash} does not match the published frame digest")
            put(data)
        put(suffix)
        fh.flush()
        os.fsync(fh.fileno())
    if stream is not None and (stream.buf or next(stream.pieces, b"")):
        raise integrity("registry sent more chunk bytes than requested")
    return sha.hexdigest(), b3.hexdigest(), size


def _download(client: RegistryClient, url: str, out: Path, transfer: Transfer) -> tuple[str, str, int]:
    transfer.mode = "full"
    sha, b3, size = hashlib.sha256(), blake3.blake3(), 0
    with open(out, "wb") as fh:
        for piece in client.download(url):
            fh.write(piece)
            sha.update(piece)
            b3.update(piece)
            size += len(piece)
        fh.flush()
        os.fsync(fh.fileno())
    transfer.bytes_downloaded = transfer.artifact_bytes = size
    return sha.hexdigest(), b3.hexdigest(), size


def _stage_from_artifact(path: Path, cas: CasStore, staging: _Staging, transfer: Transfer) -> None:
    """After a whole download: put the artifact's chunks into the CAS (so the next version is a delta)."""
    opened = open_capsule(path)

    def sink(ref: FrameRef, frame: bytes, _offset: int) -> None:
        if not cas.objects.has(ref.raw_hash):
            staging.add(ref.raw_hash, frame)
    try:
        layout = split_payload(str(path), opened.payload_offset, opened.payload_size, opened.payload_manifest, sink)
    except UnsafePayload as exc:
        raise integrity(f"artifact payload is unsafe: {exc}") from None
    except NotSpliceable:
        staging.discard()
        return
    if layout.frames is None:
        staging.discard()
    transfer.chunks_total = len(opened.payload_manifest.chunks)


def install(ref: str, registry: str, version: str | None, *, token: str | None = None,
            progress: Callable[[str], None] = lambda _m: None, full_verify: bool = True,
            verify: Verifier | None = None) -> dict[str, Any]:
    publisher, slug, wanted = parse_ref(ref, version)
    scoped = f"{publisher}/{slug}"
    with RegistryClient(registry, token) as client:
        try:
            detail = client.detail(publisher, slug)
        except RegistryHttpError as exc:
            if exc.status == 404:
                raise AtoError(E_USAGE, f"capsule {scoped} was not found in registry {client.base}") from None
            raise
        target_version = wanted or str(detail.get("latestVersion") or detail.get("latest_version") or "")
        if not target_version:
            raise AtoError(E_USAGE, f"No installable version available for {scoped!r}")
        try:
            dist = client.distribution(publisher, slug, target_version)
        except RegistryHttpError as exc:
            if exc.status == 404:
                raise AtoError(E_USAGE, f"Version {target_version} of {scoped} not found in registry "
                                        f"{client.base}") from None
            raise
        if dist.get("version") != target_version:
            raise integrity(f"registry answered version {dist.get('version')!r} for {target_version!r}")
        expect = _Expect(int(dist.get("size_bytes") or 0), parse_sha(dist["sha256"]), parse(dist["blake3"]))
        target = store_path(publisher, slug, target_version)
        cas = CasStore(paths.cas_root())
        transfer = Transfer()
        up_to_date = target.is_file() and blake3_file(target) == expect.blake3
        trust = None
        if up_to_date:
            if verify is not None:
                trust = verify(target, scoped)
            with cas.shared():
                _ensure_manifest(cas, target)
            progress(f"{scoped} {target_version} is already installed at {target}")
        else:
            progress(f"Installing {scoped} {target_version} from {client.base}")
            trust = _fetch(client, dist, cas, target, expect, transfer, slug, target_version, full_verify,
                           verify, scoped)
    doc = {
        "capsule_id": str(detail.get("id") or f"local-{publisher}-{slug}"),
        "scoped_id": scoped, "publisher": publisher, "slug": slug, "version": target_version,
        "path": str(target), "content_hash": label(expect.blake3), "install_kind": "Standard",
        "launchable": {"CapsuleArchive": {"path": str(target)}},
        "local_derivation": None,
        "projection": {"performed": False, "projection_id": None, "projected_path": None, "state": "skipped",
                       "schema_version": SCHEMA_VERSION, "metadata_path": None},
        "managed_environment": None, "promotion": None,
        "schema_version": SCHEMA_VERSION, "registry": client.base, "up_to_date": up_to_date,
        "size_bytes": target.stat().st_size, "transfer": transfer.to_json(),
    }
    if trust is not None:
        doc.update(trust)
    return validate(doc, "install")


def parse_sha(value: str) -> str:
    text = str(value).strip().lower().removeprefix("sha256:")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise integrity(f"registry sent a malformed sha256 {value!r}")
    return text


def _ensure_manifest(cas: CasStore, path: Path) -> None:
    """The payload manifest of an installed artifact is a gc root: keep it in the CAS."""
    manifest = open_capsule(path).payload_manifest
    if not cas.manifest_path(manifest.artifact_hash).exists():
        cas.put_manifest(manifest)


def _fetch(client: RegistryClient, dist: dict[str, Any], cas: CasStore, target: Path, expect: _Expect,
           transfer: Transfer, slug: str, version: str, full_verify: bool, verify: Verifier | None = None,
           scoped: str = "") -> dict[str, Any] | None:
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    with cas.shared():
        staging = _Staging(cas)
        try:
            skel = client.skeleton(dist["skeleton_url"]) if dist.get("skeleton_url") else None
            if skel is not None:
                if parse(skel["blake3"]) != expect.blake3:
                    raise integrity("skeleton and distribution disagree about the artifact digest")
                sha, b3, size = _splice(client, skel, cas, tmp, transfer, staging)
                transfer.artifact_bytes = size
            else:
                sha, b3, size = _download(client, dist["artifact_url"], tmp, transfer)
            if b3 != expect.blake3:
                raise integrity(f"installed artifact blake3:{b3} does not match the published blake3:{expect.blake3}")
            if sha != expect.sha256:
                raise integrity(f"installed artifact sha256:{sha} does not match the published sha256:"
                                f"{expect.sha256}")
            if expect.size and size != expect.size:
                raise integrity(f"installed artifact has {size} bytes, the registry published {expect.size}")
            opened = open_capsule(tmp)
            if opened.manifest.get("name") != slug or opened.manifest.get("version") != version:
                raise integrity(f"artifact manifest is {opened.manifest.get('name')} {opened.manifest.get('version')}, "
                                f"expected {slug} {version}")
            if full_verify:
                verify_capsule(tmp)
            trust = verify(tmp, scoped) if verify is not None else None
            if skel is None:
                _stage_from_artifact(tmp, cas, staging, transfer)
            staging.publish()
            if not cas.manifest_path(opened.payload_manifest.artifact_hash).exists():
                cas.put_manifest(opened.payload_manifest)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            return trust
        except BaseException:
            staging.discard()
            tmp.unlink(missing_ok=True)
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
