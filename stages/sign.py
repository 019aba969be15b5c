"""``ato sign``: replace the signature.json of a verified artifact with a signed one.

The document, the keys and the check of a whole artifact are the format's
(:mod:`stages.capsule`); this stage only rewrites one member. Every other byte of the
artifact stays, so ``ato build`` + ``ato sign`` gives the same bytes as ``ato build --key``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cas.digest import label
from cas.tempfiles import temp_path
from pipeline.errors import E_INTEGRITY, AtoError
from stages.capsule import NO_CEILING, verify
from stages.capsule.archive import PAYLOAD, Member, write_capsule
from stages.capsule.keys import SigningKey
from stages.capsule.signature import MEMBER, SignatureInfo, signature_bytes, signature_document


@dataclass
class Signed:
    """What :func:`sign_artifact` wrote."""

    path: Path
    artifact_blake3: str
    size: int
    signature: SignatureInfo


def sign_artifact(path: Path, key: SigningKey, *, out: Path | None = None, epoch: int | None = None,
                  now: float | None = None) -> Signed:
    """Replace signature.json of a verified artifact with a signed one; every other byte stays.

    ``epoch`` (``signed_at``) defaults to the artifact's own header mtime, i.e. the epoch it was
    built with. The new file is written temp + fsync + rename; on any failure the target is untouched.
    """
    path = Path(path)
    verdict = verify(path, NO_CEILING)
    if verdict.error is not None or verdict.capsule is None:
        err = verdict.error
        # the verifier's own code (E208, E213 truncated, E108 a name no filesystem holds), as every entry point gives
        raise AtoError(err.code if err else E_INTEGRITY,
                       f"refusing to sign a broken artifact: {err.message if err else path}",
                       details=err.details if err else {}, hint="rebuild it first")
    capsule = verdict.capsule
    layout = capsule.layout
    old = capsule.signature_doc
    doc = signature_document(manifest_hash=old["manifest_hash"], payload_hash=old["payload_hash"],
                             members=capsule.small_members(), epoch=layout.epoch if epoch is None else epoch,
                             key=key, now=now)
    target = Path(out) if out is not None else path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path(target.with_name(target.name + ".payload"))
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
            src.seek(capsule.payload_offset)
            left = capsule.payload_size
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    raise AtoError(E_INTEGRITY, f"{path} shrank while signing")
                dst.write(chunk)
                left -= len(chunk)
        members = []
        for span in layout.members:
            if span.name == PAYLOAD:
                members.append(Member(span.name, path=tmp_path))
            elif span.name == MEMBER:
                members.append(Member(span.name, signature_bytes(doc)))
            else:
                members.append(Member(span.name, capsule.raw[span.name]))
        digest, size = write_capsule(target, members, layout.epoch)
    finally:
        tmp_path.unlink(missing_ok=True)
    return Signed(target, label(digest), size, SignatureInfo(True, key.did, doc["signed_at"], doc.get("previous_key")))
