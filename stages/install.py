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
   in one streamed request per ≤4096 chunks (``POST /v1/chunks/fetch``);
4. splice: prefix + frames + suffix are written to a temp file beside the
   target in one pass that also hashes them (SHA-256, BLAKE3) and runs the
   format's verifier on them as they pass (:func:`stages.capsule.verify_stream`:
   each frame must be the published one, decode to its chunk, and every payload
   entry be safe; a refusal stops the download). The size, SHA-256 and BLAKE3
   must equal the published ones, and the verdict then goes to the trust
   decision (:class:`stages.trust_port.TrustPort`) before the file is indexed as
   a pack and renamed into place (one fsync of the file, one of its directory).
   A failure leaves the store and the CAS as they were.

Before step 3 the skeleton alone is judged (:func:`stages.capsule.verify_skeleton`):
its framing, every small member, the signature, the manifest digests, the
payload ceiling, the manifest name/version and the trust decision (consent
included). An artifact that would be refused is refused before a single chunk
is downloaded.

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
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import fsync_dir
from cas.digest import blake3_file, label, parse, write_hashed
from cas.frames import ChunkError
from cas.index import PackEntry
from cas.packs import frames_at
from cas.stoppoints import stop_point
from cas.store import CasStore
from cas.tempfiles import sweep, temp_path
from pipeline import names, paths
from pipeline.envelope import validate
from pipeline.errors import E_INTEGRITY, E_USAGE, AtoError, Problem
from pipeline.progress import SILENT, Progress, counted
from stages import installed
from stages.capsule import (
    ArtifactStream,
    Limits,
    Verdict,
    placed,
    read_capsule,
    verdict_under,
    verify,
    verify_skeleton,
    verify_stream,
)
from stages.capsule.payload import FrameRef
from stages.registry_port import RegistryConnect, RegistryHttpError, RegistryPort
from stages.trust_port import TrustPort

SCHEMA_VERSION = "0.1"
FETCH_BATCH = 4096
WRITE_BATCH = 4 << 20

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
    """Cut a byte stream into frames of known sizes (one copy per frame, no buffer shuffling)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.cur = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        avail = len(self.cur) - self.pos
        if avail >= n:
            self.pos += n
            return self.cur[self.pos - n:self.pos]
        parts = [self.cur[self.pos:]] if avail else []
        need = n - avail
        self.cur, self.pos = b"", 0
        while need > 0:
            try:
                piece = next(self.pieces)
            except StopIteration:
                raise integrity(f"registry chunk stream ended early ({n - need} of {n} bytes)") from None
            if len(piece) >= need:
                parts.append(piece[:need])
                self.cur, self.pos = piece, need
                need = 0
            else:
                parts.append(piece)
                need -= len(piece)
        return b"".join(parts)

    def exhausted(self) -> bool:
        return self.pos >= len(self.cur) and not any(True for piece in self.pieces if piece)


class _Worker(threading.Thread):
    """Runs queued calls in order on one thread (file writes, hashing: both release the GIL)."""

    def __init__(self, depth: int = 8) -> None:  # jobs of up to WRITE_BATCH bytes: at most ~32 MB waiting
        super().__init__(daemon=True)
        self.q: queue.Queue[Callable[[], None] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                    self.error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(job)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _prefetch(pieces: Iterator[bytes], depth: int = 32) -> Iterator[bytes]:
    """Read a response stream on a helper thread so the network overlaps verification."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for piece in pieces:
                while not stop.is_set():
                    try:
                        q.put(("data", piece), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "data":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()


def _batched_fetch(client: RegistryPort, hexes: list[str]) -> Iterator[bytes]:
    for i in range(0, len(hexes), FETCH_BATCH):
        yield from client.fetch_chunks(hexes[i:i + FETCH_BATCH])


def _splice(client: RegistryPort, skel: _Skeleton, cas: CasStore, out: Path, check: ArtifactStream,
            transfer: Transfer, reporter: Progress = SILENT) -> tuple[str, int]:
    """prefix + frames + suffix → ``out``; local frames are used when byte-identical to the published ones.

    Every frame, reused or downloaded, must be the published frame: a reused one is hashed here, every
    one is checked by ``check`` (the format's verifier on the stream, built with the skeleton's frames:
    the whole BLAKE3, each frame's digest, each frame decoded to its chunk, every payload entry judged),
    fed on the writer thread, so the scan overlaps the download and a refusal stops it. Returns the file's SHA-256 and size; the caller compares them and ``check``'s
    verdict with the published digests before anything is stored.
    """
    prefix, suffix, frames = skel.prefix, skel.suffix, skel.frames
    transfer.mode = "delta"
    transfer.chunks_total = len(frames)
    transfer.skeleton_bytes = len(prefix) + len(suffix)
    objects = cas.objects
    legacy = objects.objects.is_dir()  # a one-file-per-chunk store of an earlier ato, not yet migrated
    local: set[str] = set()
    packed = cas.packs.locate_many(f.raw_hash for f in frames)
    for f in frames:
        if f.raw_hash not in local:
            where = packed.get(f.raw_hash)
            if where is not None:
                if where.length == f.frame_size and where.frame_hash.hex() == f.frame_blake3:
                    local.add(f.raw_hash)  # the index holds the frame's digest: no need to read it to decide
                continue
            if not legacy:
                continue
            try:
                if objects.path(f.raw_hash).stat().st_size == f.frame_size:
                    local.add(f.raw_hash)
            except OSError:
                pass
    fetch = list(dict.fromkeys(f.raw_hash for f in frames if f.raw_hash not in local))
    counts: dict[str, int] = {}
    for f in frames:
        counts[f.raw_hash] = counts.get(f.raw_hash, 0) + 1
    stream = _FrameStream(_prefetch(_batched_fetch(client, fetch))) if fetch else None
    kept: dict[str, bytes] = {}  # downloaded frames that appear again later in the payload
    sha = hashlib.sha256()
    size = 0
    with open(out, "wb") as fh:
        writer = _Worker()
        pending: list[bytes] = []
        pending_size = 0

        def flush() -> None:
            nonlocal pending, pending_size
            data = b"".join(pending)
            pending, pending_size = [], 0

            def job() -> None:  # a few big writes and hash updates: each releases the GIL for long
                fh.write(data)
                sha.update(data)
                check.update(data)  # BLAKE3 here, the payload handed to the scan thread
            writer.submit(job)

        def put(data: bytes) -> None:
            nonlocal size, pending_size
            size += len(data)
            pending.append(data)
            pending_size += len(data)
            if pending_size >= WRITE_BATCH:
                flush()

        task = reporter.task("Downloading", total=len(prefix) + len(suffix) + sum(f.frame_size for f in frames),
                             chunks=len(fetch))
        with task:
            try:
                put(prefix)
                task.advance(len(prefix))
                if stream is not None and len(fetch) == len(frames):
                    _stream_through(stream, frames, put, task, transfer)
                else:
                    for f in frames:
                        h = f.raw_hash
                        fetched = transfer.chunks_downloaded
                        if h in kept:
                            data = kept[h]
                        elif h in local:
                            data = _local_frame(cas, f)
                            if data is None:  # the local object is not the published frame: fetch just this one
                                data = _fetch_one(client, f)
                                transfer.chunks_downloaded += 1
                                transfer.bytes_downloaded += len(data)
                            else:
                                transfer.chunks_reused += 1
                                transfer.bytes_reused += len(data)
                        elif stream is not None:
                            # its digest is checked by ``check``'s scan, before the frame is decoded (verify_stream's
                            # frames): a frame that is not the published one stops the download there
                            data = stream.take(f.frame_size)
                            transfer.chunks_downloaded += 1
                            transfer.bytes_downloaded += len(data)
                            if counts[h] > 1:
                                kept[h] = data
                        else:
                            raise integrity(f"chunk blake3:{h} is neither local nor requested")
                        put(data)
                        task.advance(len(data), chunks=transfer.chunks_downloaded - fetched)
                put(suffix)
                task.advance(len(suffix))
                flush()
            finally:
                writer.finish()
                if stream is not None and sys.exc_info()[0] is not None:
                    stream.pieces.close()  # type: ignore[attr-defined]
        fh.flush()
        os.fsync(fh.fileno())
    if stream is not None and not stream.exhausted():
        raise integrity("registry sent more chunk bytes than requested")
    return sha.hexdigest(), size


def _stream_through(stream: _FrameStream, frames: Sequence[FrameRef], put: Callable[[bytes], None], task: Any,
                    transfer: Transfer) -> None:
    """Every frame is downloaded, each once, in order: the response is the payload's frames back to back,
    so its pieces go on as they arrive instead of being cut into frames and joined again (``check``'s
    scan reads each frame's extent and digest from the bytes themselves)."""
    total = sum(f.frame_size for f in frames)
    ends = itertools.accumulate(f.frame_size for f in frames)
    end: int | None = next(ends, None)
    got = 0
    for piece in stream.pieces:
        if got + len(piece) > total:
            raise integrity("registry sent more chunk bytes than requested")
        put(piece)
        got += len(piece)
        done = 0
        while end is not None and end <= got:
            done += 1
            end = next(ends, None)
        transfer.chunks_downloaded += done
        transfer.bytes_downloaded += len(piece)
        task.advance(len(piece), chunks=done)
    if got != total:
        raise integrity(f"registry chunk stream ended early ({got} of {total} bytes)")


def _check_frames(verdict: Verdict, skel: _Skeleton | None) -> None:
    """When the artifact was spliced, its frames must be the published ones, each decoding to its chunk
    (the verifier established what the frames are)."""
    scan = verdict.require().scan
    if scan is None:
        raise integrity("the artifact's payload was not scanned")
    if skel is not None and scan.frames != tuple(skel.frames):
        raise integrity("the published frames are not the artifact's chunks", reason=scan.reason)


def _local_frame(cas: CasStore, f: FrameRef) -> bytes | None:
    """The local frame of a chunk when it is byte for byte the published one (checked on read)."""
    try:
        data = cas.frame(f.raw_hash, None)
    except (OSError, ChunkError):
        return None
    return data if blake3.blake3(data).hexdigest() == f.frame_blake3 else None


def _fetch_one(client: RegistryPort, f: FrameRef) -> bytes:
    data = b"".join(client.fetch_chunks([f.raw_hash]))
    if blake3.blake3(data).hexdigest() != f.frame_blake3:
        raise integrity(f"frame of chunk blake3:{f.raw_hash} does not match the published frame digest")
    return data


def _download(client: RegistryPort, url: str, out: Path, transfer: Transfer, size_hint: int = 0,
              reporter: Progress = SILENT) -> tuple[str, str, int]:
    transfer.mode = "full"
    with reporter.task("Downloading", total=size_hint or None) as task:
        sha, b3, size = write_hashed(out, counted(client.download(url), task))
    transfer.bytes_downloaded = transfer.artifact_bytes = size
    return sha, b3, size


def _pack_entries(verdict: Verdict) -> list[PackEntry] | None:
    """Where each chunk's frame lies in the verified artifact file: the artifact is its own pack.

    None when the payload's frames are not its chunks one to one (then the file is stored but its
    chunks are not indexed: a later version is downloaded whole).
    """
    capsule, scan = verdict.capsule, verdict.scan
    if capsule is None or scan is None:
        raise integrity("the artifact was not completely verified")
    return None if scan.frames is None else frames_at(capsule.payload_offset, scan.frames)


def _store(tmp: Path, target: Path, verdict: Verdict, cas: CasStore, blake3_hex: str, started_ns: int) -> Verdict:
    """Put the verified artifact in place: indexed as a pack (hard-linked under ``cas/packs/``, so its
    bytes are on disk once), its payload manifest kept (a gc root), then renamed to ``target``; the
    verdict, now of ``target`` (remembered for the process, see :func:`stages.capsule.verifier.placed`)."""
    entries = _pack_entries(verdict)
    if entries is not None:
        cas.adopt_artifact(tmp, blake3_hex, entries)
        cas.put_manifest(verdict.capsule.payload_manifest)  # type: ignore[union-attr]
    os.replace(tmp, target)
    # a concurrent install of the same bytes may have put the same inode (the shared pack) at ``target``,
    # before this rename or between any check and it: rename(2) of two links to one inode does nothing
    # and leaves ``tmp``, which is this process's own name, so what is still there is dropped
    tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return placed(verdict, target, started_ns)


@dataclass
class _Release:
    """What a registry publishes for one version: its detail, distribution and digests."""

    detail: dict[str, Any]
    version: str
    dist: dict[str, Any]
    expect: _Expect


def latest_release(client: RegistryPort, publisher: str, slug: str) -> tuple[dict[str, Any], str]:
    """(the capsule's detail, its newest installable version) from the registry; E100 when it has neither."""
    scoped = f"{publisher}/{slug}"
    try:
        detail = client.detail(publisher, slug)
    except RegistryHttpError as exc:
        if exc.status == 404:
            raise AtoError(E_USAGE, f"capsule {scoped} was not found in registry {client.base}") from None
        raise
    return detail, str(detail.get("latestVersion") or detail.get("latest_version") or "")


def _release(client: RegistryPort, publisher: str, slug: str, wanted: str | None) -> _Release:
    scoped = f"{publisher}/{slug}"
    detail, latest = latest_release(client, publisher, slug)
    target_version = wanted or latest
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
    try:
        expect = _Expect(int(dist.get("size_bytes") or 0), parse_sha(dist["sha256"]), parse(dist["blake3"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise integrity(f"registry sent a malformed distribution record: {exc}") from None
    return _Release(detail, target_version, dist, expect)


def installed_release(ref: str, registry: str, version: str | None, *, connect: RegistryConnect,
                      token: str | None = None) -> Path | None:
    """The stored ``.capsule`` of ``ref`` when it is byte-identical (BLAKE3) to what ``registry`` publishes
    for that version (the latest unless one is named); None when it is not installed or differs."""
    publisher, slug, wanted = parse_ref(ref, version)
    with connect(registry, token) as client:
        release = _release(client, publisher, slug, wanted)
    target = store_path(publisher, slug, release.version)
    return target if target.is_file() and blake3_file(target) == release.expect.blake3 else None


def install(ref: str, registry: str, version: str | None, *, connect: RegistryConnect,
            token: str | None = None, progress: Callable[[str], None] = lambda _m: None,
            trust: TrustPort | None = None, reporter: Progress = SILENT) -> dict[str, Any]:
    """Install ``ref`` from ``registry``. ``trust`` decides whether the artifact may be used (without it,
    only the format is checked: the artifact is reported as not trust-checked); ``progress`` gets human
    notes, ``reporter`` byte-level progress (bars on a terminal)."""
    publisher, slug, wanted = parse_ref(ref, version)
    scoped = f"{publisher}/{slug}"
    with connect(registry, token) as client:
        release = _release(client, publisher, slug, wanted)
        detail, target_version, dist, expect = release.detail, release.version, release.dist, release.expect
        target = store_path(publisher, slug, target_version)
        cas = CasStore(paths.cas_root())
        sweep([target.parent, cas.packs.tmp])  # what a killed install left (only if its process is gone)
        transfer = Transfer()
        limits = trust.limits if trust is not None else Limits()
        # one verification of the stored file, passed along: it says whether it is the published artifact
        # (its BLAKE3), and the same verdict is then accepted, indexed and read for the record
        verdict = verify(target, limits) if target.is_file() else None
        up_to_date = verdict is not None and verdict.artifact_blake3 == label(expect.blake3)
        if verdict is not None and up_to_date:
            checked = _accept(verdict, scoped, trust)  # a key revoked since the install is refused here too
            with cas.shared():
                ensure_stored(cas, target, expect.blake3, limits, verdict)
            progress(f"{scoped} {target_version} is already installed at {target}")
        else:
            progress(f"Installing {scoped} {target_version} from {client.base}")
            checked, verdict = _fetch(client, dist, cas, target, expect, transfer, slug, target_version, trust,
                                      scoped, reporter)
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
    if checked is not None:
        doc.update(checked)
    validate(doc, "install")
    installed.write_record({**doc, **record_facts(target, verdict.capsule.manifest if verdict.capsule else None)})  # ato list, uninstall
    return doc


def record_facts(path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the ownership record keeps from a stored artifact's manifest (read from ``path`` unless the
    caller has it from its verdict): its ``type`` (app, tool, ...) and ``manifest_hash`` (the name of the
    copy ``ato run`` unpacks)."""
    if manifest is None:
        manifest = read_capsule(path).manifest
    kind = manifest.get("type")
    dist = manifest.get("distribution") if isinstance(manifest.get("distribution"), dict) else {}
    return {"capsule_type": kind if isinstance(kind, str) else None,
            "manifest_hash": dist.get("manifest_hash") if isinstance(dist.get("manifest_hash"), str) else None}


def _accept(verdict: Verdict, scoped: str, trust: TrustPort | None) -> dict[str, Any] | None:
    """The complete check of an artifact file, decided on its verdict: the trust port's, or (without one)
    the format's."""
    if trust is not None:
        return trust.accept(verdict, scoped)
    verdict.require()
    return None


def parse_sha(value: str) -> str:
    text = str(value).strip().lower().removeprefix("sha256:")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise integrity(f"registry sent a malformed sha256 {value!r}")
    return text


def ensure_stored(cas: CasStore, path: Path, blake3_hex: str, limits: Limits, verdict: Verdict | None = None) -> None:
    """An installed artifact is indexed as a pack and its payload manifest kept (a gc root); one
    installed by an earlier ato (its chunks copied into the store one file each) is adopted now.
    ``verdict``: the caller's verification of ``path`` under ``limits``, if it has one."""
    if cas.packs.index.pack_entries(f"{blake3_hex}.capsule"):
        return
    verdict = (verify(path, limits) if verdict is None else verdict_under(verdict, limits)).require()
    entries = _pack_entries(verdict)
    if entries is not None:
        cas.adopt_artifact(path, blake3_hex, entries)
    cas.put_manifest(verdict.capsule.payload_manifest)  # type: ignore[union-attr]


@dataclass
class _Skeleton:
    prefix: bytes
    suffix: bytes
    payload_size: int
    frames: list[FrameRef]
    doc: dict[str, Any]


def _skeleton(doc: Any, expect: _Expect) -> _Skeleton:
    """A registry's skeleton document, parsed (a malformed one is the registry's integrity failure)."""
    try:
        skel = _Skeleton(base64.b64decode(doc["prefix"], validate=True), base64.b64decode(doc["suffix"], validate=True),
                         int(doc["payload_size"]), [FrameRef.from_json(f) for f in doc["frames"]], doc)
        same = parse(doc["blake3"]) == expect.blake3
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise integrity(f"registry sent a malformed skeleton: {str(exc)[:200]}") from None
    if not same:
        raise integrity("skeleton and distribution disagree about the artifact digest")
    if skel.payload_size != sum(f.frame_size for f in skel.frames) or skel.payload_size < 0:
        raise integrity("the skeleton's frames do not add up to its payload size")
    return skel


def _precheck(skel: _Skeleton, expect: _Expect, slug: str, version: str, trust: TrustPort | None,
              scoped: str) -> Verdict:
    """Judge the artifact by its small members before downloading its payload: the format's checks
    that need no payload, the manifest name/version, and the trust decision (consent included)."""
    verdict = verify_skeleton(skel.prefix, skel.payload_size, skel.suffix, artifact_blake3=label(expect.blake3),
                              limits=trust.limits if trust is not None else Limits()).require()
    _check_identity(verdict, slug, version)
    if trust is not None:
        trust.precheck(verdict, scoped)
    return verdict


def _check_identity(verdict: Verdict, slug: str, version: str) -> None:
    if verdict.name != slug or verdict.version != version:
        raise integrity(f"artifact manifest is {verdict.name} {verdict.version}, expected {slug} {version}")


def _fetch(client: RegistryPort, dist: dict[str, Any], cas: CasStore, target: Path, expect: _Expect,
           transfer: Transfer, slug: str, version: str, trust: TrustPort | None,
           scoped: str, reporter: Progress = SILENT) -> tuple[dict[str, Any] | None, Verdict]:
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    started_ns = time.time_ns()
    check: ArtifactStream | None = None
    with cas.shared():  # gc waits until the artifact is stored and indexed
        try:
            skel = _skeleton(client.skeleton(dist["skeleton_url"]), expect) if dist.get("skeleton_url") else None
            if skel is not None:
                # trust from the small members, then one pass: frames checked, written, hashed and scanned
                check = verify_stream(_precheck(skel, expect, slug, version, trust, scoped), tmp, skel.frames)
                sha, size = _splice(client, skel, cas, tmp, check, transfer, reporter)
                transfer.artifact_bytes = size
                verdict = check.finish()
                b3 = parse(verdict.artifact_blake3 or "")
            else:
                sha, b3, size = _download(client, dist["artifact_url"], tmp, transfer, expect.size, reporter)
                verdict = None
            stop_point("install.downloaded")  # crash tests: the artifact in its temp file, nothing stored
            if b3 != expect.blake3:
                raise integrity(f"installed artifact blake3:{b3} does not match the published blake3:{expect.blake3}")
            if sha != expect.sha256:
                raise integrity(f"installed artifact sha256:{sha} does not match the published sha256:"
                                f"{expect.sha256}")
            if expect.size and size != expect.size:
                raise integrity(f"installed artifact has {size} bytes, the registry published {expect.size}")
            with reporter.task("Verifying", total=None):
                # verified once (on the stream, or the whole download here); the trust decision, the native
                # gate, the identity, the frames, the store and the ownership record all take this verdict
                if verdict is None:
                    verdict = verify(tmp, trust.limits if trust is not None else Limits())
                checked = _accept(verdict, scoped, trust)
                _check_identity(verdict, slug, version)
                _check_frames(verdict, skel)
            transfer.chunks_total = len(verdict.capsule.payload_manifest.chunks)  # type: ignore[union-attr]
            return checked, _store(tmp, target, verdict, cas, b3, started_ns)
        except BaseException:
            tmp.unlink(missing_ok=True)
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        finally:
            if check is not None:
                check.close()
