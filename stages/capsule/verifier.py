"""The one verifier: every check of a ``.capsule``, in one order, giving one verdict.

``ato verify``, publish's local check, the registry's upload check, install, fetch, finalize,
project and run all call :func:`verify`, so the same bytes get the same answer and the same
error code everywhere. The checks, in the order they run (the first failure decides, the rest
are reported skipped):

``archive``    the outer tar is exactly what the deterministic writer produces
               (:mod:`stages.capsule.archive`);
``members``    signature.json is canonical and well formed, every other small member matches the
               BLAKE3 it lists, and each parses (:mod:`stages.capsule.reader`);
``signature``  the Ed25519 signature and any rotation proof verify (unsigned artifacts pass
               as *unsigned*: whether that is acceptable is trust policy, not format);
``digests``    manifest_hash, chunk list and Merkle root; the payload ceiling (E212); then every
               chunk decoded and every payload entry judged (:mod:`stages.capsule.payload`),
               and the payload bytes against signature.json's ``payload_hash``.

The signature is checked before the payload is decoded, so nothing signed by a forger is
decompressed. A file is read once: its BLAKE3 and the payload scan
(:class:`stages.capsule.payload.PayloadScanner`, on its own thread) take the same bytes. A verdict
is kept for the process (keyed by the file's identity and change time, which moves on any write; a
file changed within two seconds of its verification is re-hashed before its verdict is reused), so
the many callers of one install decode a payload once.

Three entries, one set of checks:

- :func:`verify` ``(path, limits)``: a file.
- :func:`verify_skeleton` ``(prefix, payload_size, suffix, limits=...)``: everything but the payload,
  from the bytes around it (a registry's skeleton); ``complete`` is False.
- :func:`verify_stream` ``(skeleton_verdict, path, frames=None)``: the rest, on the artifact's bytes as they are
  written to ``path`` (a download, an upload): ``update(data)`` with every byte in order (prefix,
  payload, suffix) raises the refusal as soon as the scan finds it (a download stops there);
  ``finish()`` gives the complete :class:`Verdict` for exactly the bytes passed (their BLAKE3 and
  size; the file's size is checked), under the skeleton's ``limits``; ``close()`` abandons. The
  payload goes through the same scanner as a file, so the same bytes get the same checks and code;
  bytes around the payload must be the skeleton's. A payload whose frames are not its chunks cannot
  be judged from a stream: ``finish()`` then verifies the file. A stream's verdict is not remembered;
  once the caller has renamed the file into place, :func:`placed` re-points the verdict at the final
  path and remembers it there (re-hashed on reuse, since the file is that new).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from cas.digest import blake3_file, label
from cas.tempfiles import shown_name
from pipeline.errors import E_TRUNCATED, AtoError
from stages.capsule import distribution
from stages.capsule.archive import FileSource
from stages.capsule.errors import CapsuleError, too_large
from stages.capsule.limits import Limits
from stages.capsule.payload import FrameRef, NotSpliceable, PayloadScan, PayloadScanner, scan_unspliced
from stages.capsule.reader import Capsule, read_skeleton, read_source
from stages.capsule.signature import SignatureInfo, check_signature

CHECKS = ("archive", "members", "signature", "digests")
READ = 1 << 20


@dataclass
class Check:
    name: str  # archive | members | signature | digests
    status: str  # ok | failed | skipped
    message: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message}


@dataclass
class Verdict:
    """Everything :func:`verify` established about an artifact, and the error that refuses it (if any)."""

    path: Path | None
    checks: list[Check] = field(default_factory=list)
    artifact_blake3: str | None = None  # label
    size: int | None = None
    capsule: Capsule | None = None
    signature: SignatureInfo | None = None
    digests: dict[str, Any] | None = None
    scan: PayloadScan | None = None
    error: AtoError | None = None
    complete: bool = True  # False for a skeleton: the payload itself was not judged
    limits: Limits | None = None  # the ceiling it was judged under
    skeleton: tuple[bytes, int, bytes] | None = field(default=None, repr=False)  # a skeleton's (prefix, size, suffix)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str | None:
        value = self.capsule.name if self.capsule else None
        return value if isinstance(value, str) else None

    @property
    def version(self) -> str | None:
        value = self.capsule.version if self.capsule else None
        return value if isinstance(value, str) else None

    def require(self) -> Verdict:
        """The verdict, or its error raised."""
        if self.error is not None:
            raise self.error
        return self


def _label_error(verdict: Verdict, exc: CapsuleError) -> AtoError:
    where = shown_name(verdict.path.name) if verdict.path is not None else "the artifact"
    err = CapsuleError(exc.check, f"{where}: {exc.check} check failed: {exc.message}", code=exc.code,
                       reason=exc.reason, hint=exc.hint,
                       **{k: v for k, v in exc.details.items() if k not in ("check", "reason")})
    if verdict.path is not None:
        err.details.setdefault("artifact", str(verdict.path))
    return err


class _Run:
    """Runs the checks in order, recording each; the first failure ends the run."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def fail(self, exc: CapsuleError) -> Verdict:
        v = self.verdict
        failed = CHECKS.index(exc.check) if exc.check in CHECKS else len(CHECKS) - 1
        v.checks = [c for c in v.checks if CHECKS.index(c.name) < failed]  # a stream fails after a skeleton's
        v.checks.append(Check(exc.check if exc.check in CHECKS else "digests", "failed", exc.message))
        done = {c.name for c in v.checks}
        for name in CHECKS:
            if name not in done:
                v.checks.append(Check(name, "skipped", f"not checked: the {exc.check} check failed first"))
        v.error = _label_error(v, exc)
        return v


def _small_checks(verdict: Verdict, capsule: Capsule, limits: Limits) -> None:
    """Everything but decoding the payload: the signature, the manifest digests and the ceiling."""
    verdict.checks.append(Check("members", "ok", f"{len(capsule.small_members())} member digests in "
                                                 "signature.json match, every member parses"))
    verdict.signature = check_signature(capsule.signature_doc)
    info = verdict.signature
    verdict.checks.append(Check("signature", "ok", f"Ed25519 signature by {info.key_id} verifies" if info.signed
                                else "unsigned (signature.json carries no signature)"))
    digests = distribution.check(capsule.manifest, capsule.payload_manifest)
    if capsule.signature_doc.get("manifest_hash") != digests["manifest_hash"]:
        raise CapsuleError("digests", "signature.json manifest_hash does not match capsule.toml")
    total = capsule.payload_manifest.total_raw_size
    if limits.max_payload is not None and total > limits.max_payload:
        raise too_large(total, limits.max_payload)
    verdict.digests = {**digests, "payload_hash": capsule.signature_doc["payload_hash"],
                       "artifact_hash": label(capsule.payload_manifest.artifact_hash),
                       "chunks": len(capsule.payload_manifest.chunks)}


def _digests_ok(verdict: Verdict, capsule: Capsule, scan: PayloadScan) -> CapsuleError | None:
    """The last check: the payload's bytes are the ones signature.json names."""
    if label(scan.payload_hash) != capsule.signature_doc["payload_hash"]:
        return CapsuleError("digests", "signature.json payload_hash does not match payload.tar.zst")
    verdict.scan = scan
    verdict.checks.append(Check("digests", "ok", f"manifest_hash, chunk list, Merkle root, "
                                                 f"{len(capsule.payload_manifest.chunks)} chunks, "
                                                 f"{scan.entries} payload entries and payload_hash checked"))
    return None


class _Bytes:
    """An artifact's bytes in order: their BLAKE3 and count, and the payload window fed to the one scanner.
    ``around``: the bytes before and after the payload they must equal (a skeleton's), if known."""

    def __init__(self, capsule: Capsule, total: int, around: tuple[bytes, bytes] | None = None,
                 frames: Sequence[FrameRef] | None = None) -> None:
        # one thread: beside the scanner's busy Python thread, BLAKE3's multithreaded mode on 1 MiB
        # updates waits on the GIL around every call (1.1 s instead of 0.1 s for 80 MB, measured)
        self.hasher = blake3.blake3()
        self.size = 0
        self.total = total
        self.start = capsule.payload_offset
        self.end = self.start + capsule.payload_size
        self.around = around
        self.scanner = PayloadScanner(capsule.payload_manifest, frames=frames)

    def update(self, data: bytes) -> None:
        lo, hi = self.size, self.size + len(data)
        if hi > self.total:
            raise CapsuleError("archive", f"the artifact holds more than the {self.total} bytes its layout names")
        self.hasher.update(data)
        a, b = max(lo, self.start), min(hi, self.end)
        if self.around is not None and (lo < self.start or hi > self.end):
            self._same_around(data, lo)
        if a < b:
            self.scanner.feed(data if (a, b) == (lo, hi) else memoryview(data)[a - lo:b - lo])
        self.size = hi

    def _same_around(self, data: bytes, lo: int) -> None:
        prefix, suffix = self.around  # type: ignore[misc]
        view = memoryview(data)
        head = view[:max(0, min(len(data), self.start - lo))]
        tail = view[max(0, self.end - lo):]
        if head and head != prefix[lo:lo + len(head)]:
            raise CapsuleError("archive", "the bytes before payload.tar.zst are not the ones judged")
        if tail:
            at = max(lo, self.end) - self.end
            if tail != suffix[at:at + len(tail)]:
                raise CapsuleError("archive", "the bytes after payload.tar.zst are not the ones judged")

    def finish(self) -> PayloadScan:
        """The payload's scan (raises its refusal, or NotSpliceable); every byte must have come."""
        if self.size != self.total:
            raise CapsuleError("archive", f"the artifact ends after {self.size} of its {self.total} bytes",
                               code=E_TRUNCATED)
        return self.scanner.finish()

    def close(self) -> None:
        self.scanner.close()


def _hash_into(verdict: Verdict, fh: Any, size: int) -> None:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size > (8 << 20) else 1)
    fh.seek(0)
    while data := fh.read(READ):
        hasher.update(data)
    verdict.artifact_blake3, verdict.size = label(hasher.hexdigest()), size


def _verify_file(path: Path, limits: Limits) -> Verdict:
    """One read of the file: its BLAKE3 and the payload scan from the same bytes."""
    verdict = Verdict(path, limits=limits)
    run = _Run(verdict)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                capsule = read_source(FileSource(fh), path)
            except CapsuleError as exc:
                _hash_into(verdict, fh, size)
                if exc.check == "members":
                    verdict.checks.append(Check("archive", "ok", "canonical tar framing"))
                return run.fail(exc)
            verdict.capsule = capsule
            verdict.checks.append(Check("archive", "ok", f"{len(capsule.layout.members)} members in canonical tar "
                                                         "framing"))
            try:
                _small_checks(verdict, capsule, limits)
            except CapsuleError as exc:
                _hash_into(verdict, fh, size)
                return run.fail(exc)
            stream = _Bytes(capsule, size)
            try:
                while data := fh.read(READ):
                    stream.update(data)
                verdict.artifact_blake3, verdict.size = label(stream.hasher.hexdigest()), stream.size
                try:
                    scan = stream.finish()
                except NotSpliceable as exc:
                    scan = scan_unspliced(fh, capsule.payload_offset, capsule.payload_size, capsule.payload_manifest,
                                          str(exc))
            except CapsuleError as exc:
                if verdict.artifact_blake3 is None:
                    _hash_into(verdict, fh, size)
                return run.fail(exc)
            finally:
                stream.close()
    except OSError as exc:
        return run.fail(CapsuleError("archive", f"cannot read {path}: {exc.strerror}", path=str(path)))
    problem = _digests_ok(verdict, capsule, scan)
    return run.fail(problem) if problem is not None else verdict


_MEMO: OrderedDict[tuple[object, ...], tuple[Verdict, int]] = OrderedDict()
_MEMO_SIZE = 4
_MEMO_LOCK = threading.Lock()  # the registry server verifies uploads on several threads
RACY_NS = 2_000_000_000  # a file changed this close to its verification may have changed within one clock tick


def _key(path: Path, st: os.stat_result, limits: Limits) -> tuple[object, ...]:
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, limits)


def _remember(key: tuple[object, ...], verdict: Verdict, started_ns: int) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = (verdict, started_ns)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)


def _remembered(key: tuple[object, ...], ctime_ns: int, path: Path) -> Verdict | None:
    with _MEMO_LOCK:
        found = _MEMO.get(key)
        if found is not None:
            _MEMO.move_to_end(key)
    if found is None:
        return None
    verdict, started_ns = found
    if ctime_ns < started_ns - RACY_NS:
        return verdict
    # Racily clean (as git calls it): the file changed so shortly before it was verified that a later
    # write may carry the same timestamps. Only its bytes can tell.
    try:
        same = verdict.artifact_blake3 == label(blake3_file(path))
    except OSError:
        return None
    return verdict if same else None


def verify(path: Path, limits: Limits | None = None) -> Verdict:
    """Every check of the artifact at ``path``; never raises for a bad artifact (see ``Verdict.error``)."""
    path = Path(path)
    limits = limits or Limits()
    started_ns = time.time_ns()
    try:
        st = os.stat(path)
    except OSError:
        return _verify_file(path, limits)
    key = _key(path, st, limits)
    found = _remembered(key, st.st_ctime_ns, path)
    if found is not None:
        return found
    verdict = _verify_file(path, limits)
    _remember(key, verdict, started_ns)
    return verdict


def verdict_under(verdict: Verdict, limits: Limits) -> Verdict:
    """``verdict`` itself when it is :func:`verify`'s complete verdict on a file under ``limits``, else that
    file verified under ``limits``: a caller that verified a file passes the verdict along instead of having
    it read again, and a skeleton's verdict or one judged under another ceiling never stands in for it."""
    if verdict.complete and verdict.path is not None and verdict.limits == limits:
        return verdict
    if verdict.path is None:
        raise ValueError("a skeleton's verdict does not judge a file: verify the assembled artifact")
    return verify(verdict.path, limits)


def verify_skeleton(prefix: bytes, payload_size: int, suffix: bytes, *, artifact_blake3: str | None = None,
                    limits: Limits | None = None) -> Verdict:
    """The checks that need no payload, on a registry's skeleton: archive, members, signature, the
    manifest digests and the ceiling. ``complete`` is False: verify the assembled file afterwards."""
    verdict = Verdict(None, artifact_blake3=artifact_blake3, size=len(prefix) + payload_size + len(suffix),
                      complete=False, limits=limits or Limits(), skeleton=(prefix, payload_size, suffix))
    run = _Run(verdict)
    try:
        capsule = read_skeleton(prefix, payload_size, suffix)
    except CapsuleError as exc:
        if exc.check == "members":
            verdict.checks.append(Check("archive", "ok", "canonical tar framing"))
        return run.fail(exc)
    verdict.capsule = capsule
    verdict.checks.append(Check("archive", "ok", f"{len(capsule.layout.members)} members in canonical tar framing"))
    try:
        _small_checks(verdict, capsule, limits or Limits())
    except CapsuleError as exc:
        return run.fail(exc)
    verdict.checks.append(Check("digests", "skipped", "manifest_hash, chunk list, Merkle root and the payload "
                                                      "ceiling hold; the payload itself is not downloaded yet"))
    return verdict


class ArtifactStream:
    """:func:`verify_stream`: the rest of :func:`verify` on an artifact's bytes as they are written.

    ``update(data)`` takes the artifact's bytes in order (the skeleton's prefix, the payload, its
    suffix: exactly what goes into the file) and raises the refusal (AtoError, the code ``verify``
    gives) as soon as one is found; ``finish()`` returns the :class:`Verdict`, whose ``artifact_blake3``
    and ``size`` are those of the bytes passed. ``close()`` abandons (always call it; a no-op after
    ``finish``).
    """

    def __init__(self, skeleton: Verdict, path: Path, frames: Sequence[FrameRef] | None = None) -> None:
        if skeleton.skeleton is None or skeleton.capsule is None or skeleton.error is not None:
            raise ValueError("verify_stream needs the accepted verdict of verify_skeleton")
        prefix, _payload_size, suffix = skeleton.skeleton
        self.path = Path(path)
        self.started_ns = time.time_ns()
        self.verdict = Verdict(self.path, checks=[c for c in skeleton.checks if c.status == "ok"],
                               capsule=replace(skeleton.capsule, path=self.path), signature=skeleton.signature,
                               digests=skeleton.digests, limits=skeleton.limits)
        self._bytes = _Bytes(skeleton.capsule, skeleton.size or 0, (prefix, suffix), frames)
        self._frames = frames
        self._done = False

    def _fail(self, exc: CapsuleError) -> Verdict:
        self._done = True
        self._bytes.close()
        v = self.verdict
        v.artifact_blake3, v.size = label(self._bytes.hasher.hexdigest()), self._bytes.size
        return _Run(v).fail(exc)

    def update(self, data: bytes) -> None:
        """The next bytes of the artifact (raises the verdict's error once it is refused)."""
        if self._done:
            self.verdict.require()
            raise ValueError("update after finish")
        try:
            self._bytes.update(data)
        except CapsuleError as exc:
            raise self._fail(exc).error from None  # type: ignore[misc]

    def finish(self) -> Verdict:
        """The complete verdict on the bytes passed, which the caller has written to ``path`` (flushed). Its
        ``size`` is checked against the file's; a payload whose frames are not its chunks is judged by
        :func:`verify` of the file instead (it must then hash to the bytes passed)."""
        if self._done:
            return self.verdict
        v = self.verdict
        try:
            scan = self._bytes.finish()
        except CapsuleError as exc:
            return self._fail(exc)
        except NotSpliceable as exc:
            if self._frames is not None:  # the frames were named: that they are not the chunks is the refusal
                return self._fail(CapsuleError("digests", f"the published frames are not the payload's chunks: {exc}",
                                               reason="frame_mismatch"))
            self._done = True
            whole = verify(self.path, v.limits)
            if whole.ok and whole.artifact_blake3 != label(self._bytes.hasher.hexdigest()):
                # a copy: ``whole`` is verify's remembered verdict on the file, which stays true of its bytes
                return _Run(replace(whole, checks=list(whole.checks))).fail(
                    CapsuleError("archive", "the file changed while it was written"))
            return whole
        self._done = True
        v.artifact_blake3, v.size = label(self._bytes.hasher.hexdigest()), self._bytes.size
        try:
            on_disk = os.stat(self.path).st_size
        except OSError as exc:
            return _Run(v).fail(CapsuleError("archive", f"cannot read {self.path}: {exc.strerror}"))
        if on_disk != v.size:
            return _Run(v).fail(CapsuleError("archive", f"the file holds {on_disk} bytes, {v.size} were verified",
                                             code=E_TRUNCATED))
        problem = _digests_ok(v, v.capsule, scan)  # type: ignore[arg-type]
        return _Run(v).fail(problem) if problem is not None else v

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._bytes.close()


def verify_stream(skeleton: Verdict, path: Path, frames: Sequence[FrameRef] | None = None) -> ArtifactStream:
    """Verify an artifact while it is written to ``path``, from the accepted verdict of
    :func:`verify_skeleton` on its prefix and suffix: the payload scan runs on the bytes as they pass
    (the same scan :func:`verify` runs on a file), so nothing is read back. ``frames``: the frames the
    payload must be (a registry's skeleton lists them); the first other frame is refused (E208) before it
    is decoded. See :class:`ArtifactStream`."""
    return ArtifactStream(skeleton, path, frames)


def placed(verdict: Verdict, path: Path, started_ns: int) -> Verdict:
    """``verdict`` (complete, on the bytes now at ``path``: the caller renamed the file it verified there)
    for ``path``, remembered for the process like :func:`verify`'s. ``started_ns``: when the bytes began to
    be written; a file changed that recently is re-hashed before its verdict is reused, so the memo never
    stands for bytes it did not see."""
    path = Path(path)
    if not verdict.complete or verdict.error is not None or verdict.capsule is None:
        raise ValueError("only an accepted, complete verdict is placed")
    st = os.stat(path)
    if st.st_size != verdict.size:
        raise ValueError(f"{path} holds {st.st_size} bytes, the verdict covers {verdict.size}")
    out = replace(verdict, path=path, capsule=replace(verdict.capsule, path=path))
    _remember(_key(path, st, verdict.limits or Limits()), out, min(started_ns, time.time_ns()))
    return out
