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
decompressed. A verdict is kept for the process (keyed by the file's identity and change
time, which moves on any write; a file changed within two seconds of its verification is
re-hashed before its verdict is reused), so the many callers of one install decode a payload once.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from cas.digest import blake3_file, label
from cas.tempfiles import shown_name
from pipeline.errors import AtoError
from stages.capsule import distribution
from stages.capsule.archive import FileSource
from stages.capsule.errors import CapsuleError, too_large
from stages.capsule.limits import Limits
from stages.capsule.payload import PayloadScan, scan
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


def _verify_file(path: Path, limits: Limits) -> Verdict:
    verdict = Verdict(path, limits=limits)
    run = _Run(verdict)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size > (8 << 20) else 1)
            while data := fh.read(READ):
                hasher.update(data)
            verdict.artifact_blake3, verdict.size = label(hasher.hexdigest()), size
            try:
                capsule = read_source(FileSource(fh), path)
            except CapsuleError as exc:
                if exc.check == "members":
                    verdict.checks.append(Check("archive", "ok", "canonical tar framing"))
                return run.fail(exc)
            verdict.capsule = capsule
            verdict.checks.append(Check("archive", "ok", f"{len(capsule.layout.members)} members in canonical tar "
                                                         "framing"))
            try:
                _small_checks(verdict, capsule, limits)
                verdict.scan = scan(fh, capsule.payload_offset, capsule.payload_size, capsule.payload_manifest)
            except CapsuleError as exc:
                return run.fail(exc)
    except OSError as exc:
        return run.fail(CapsuleError("archive", f"cannot read {path}: {exc.strerror}", path=str(path)))
    if label(verdict.scan.payload_hash) != capsule.signature_doc["payload_hash"]:
        return run.fail(CapsuleError("digests", "signature.json payload_hash does not match payload.tar.zst"))
    verdict.checks.append(Check("digests", "ok", f"manifest_hash, chunk list, Merkle root, "
                                                 f"{len(capsule.payload_manifest.chunks)} chunks, "
                                                 f"{verdict.scan.entries} payload entries and payload_hash checked"))
    return verdict


_MEMO: OrderedDict[tuple[object, ...], tuple[Verdict, int]] = OrderedDict()
_MEMO_SIZE = 4
_MEMO_LOCK = threading.Lock()  # the registry server verifies uploads on several threads
RACY_NS = 2_000_000_000  # a file changed this close to its verification may have changed within one clock tick


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
        key: tuple[object, ...] | None = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                          st.st_ctime_ns, limits)
    except OSError:
        key = None
    if key is not None:
        found = _remembered(key, st.st_ctime_ns, path)
        if found is not None:
            return found
    verdict = _verify_file(path, limits)
    if key is not None:
        with _MEMO_LOCK:
            _MEMO[key] = (verdict, started_ns)
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
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
                      complete=False, limits=limits or Limits())
    run = _Run(verdict)
    try:
        capsule = read_skeleton(prefix, payload_size, suffix)
    except CapsuleError as exc:
        if exc.check == "members":
            verdict.checks.append(Check("archive", "ok", "canonical tar framing"))
        return run.fail(exc)
    verdict.capsule = capsule
    verdict.checks.append(Check("archive", "ok", "canonical tar framing"))
    try:
        _small_checks(verdict, capsule, limits or Limits())
    except CapsuleError as exc:
        return run.fail(exc)
    verdict.checks.append(Check("digests", "skipped", "manifest_hash, chunk list, Merkle root and the payload "
                                                      "ceiling hold; the payload itself is not downloaded yet"))
    return verdict
