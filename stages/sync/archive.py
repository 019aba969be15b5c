"""The ``.sync`` container: a ZIP of stored members, written deterministically and read strictly.

Members (at the root, in this order): ``manifest.toml``, ``payload``, ``sync.wasm``,
``context.json``, ``sync.proof``; only the first two are required. Every member is Stored (never
compressed, so a package cannot be a decompression bomb and the payload can be read in place),
unencrypted, named once, and under its size cap; member data may not overlap. Anything else is
refused (E208) before a byte of the payload is used.

:func:`read_sync` verifies a package completely (container, manifest, every digest, the
signature's cryptography) through one open file descriptor, and keeps that descriptor: what is
shown afterwards is exactly what was verified, even if the path is replaced meanwhile.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3

from cas.atomic import atomic_writer
from cas.digest import label
from pipeline.errors import E_INTEGRITY, E_USAGE, AtoError
from stages.capsule.signature import SignatureInfo
from stages.sync import signature as sig
from stages.sync.manifest import SyncManifest, parse_manifest

MANIFEST = "manifest.toml"
PAYLOAD = "payload"
WASM = "sync.wasm"
CONTEXT = "context.json"
PROOF = "sync.proof"
MEMBER_ORDER = (MANIFEST, PAYLOAD, WASM, CONTEXT, PROOF)
REQUIRED = (MANIFEST, PAYLOAD)
MAX_PAYLOAD = 200 * 1024 * 1024  # the same ceiling as a .capsule's payload
CAPS = {MANIFEST: 64 * 1024, PAYLOAD: MAX_PAYLOAD, WASM: 16 * 1024 * 1024, CONTEXT: 1024 * 1024,
        PROOF: 1024 * 1024}
MAX_FILE = sum(CAPS.values()) + 64 * 1024
WASM_STUB = b"\x00asm\x01\x00\x00\x00"  # an empty module: sync-rs readers require the member
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
READ = 1 << 20


def _fail(message: str) -> AtoError:
    return AtoError(E_INTEGRITY, message, hint="do not use this package; get it again from its publisher")


@dataclass
class SyncPackage:
    """A verified ``.sync``: its manifest, digests and signature, and the open file it was read from."""

    path: Path
    manifest: SyncManifest
    digests: sig.Digests
    signature: SignatureInfo
    payload_size: int
    file_digest: str  # blake3 of the whole file
    size: int
    _fh: BinaryIO
    _zip: zipfile.ZipFile

    @property
    def payload_digest(self) -> str:
        return self.digests.payload_hash

    def display_name(self) -> str:
        """``q3.sync`` and ``q3.csv.sync`` both show ``q3.csv`` (sync-fs's rule)."""
        stem = self.path.name[: -len(".sync")] if self.path.name.endswith(".sync") else self.path.name
        ext = "." + self.manifest.display_ext
        return stem if stem.endswith(ext) else stem + ext

    def payload_chunks(self) -> Iterator[bytes]:
        """The payload's bytes, from the verified file (the CRC is checked again on the way)."""
        with self._zip.open(PAYLOAD) as member:
            while chunk := member.read(READ):
                yield chunk

    def close(self) -> None:
        self._zip.close()
        self._fh.close()

    def __enter__(self) -> SyncPackage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _check_layout(fh: BinaryIO, infos: list[zipfile.ZipInfo], total: int) -> None:
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise _fail(f"a member is named twice: {names}")
    for name in names:
        if name not in MEMBER_ORDER:
            raise _fail(f"unexpected member {name!r} (a .sync holds only {', '.join(MEMBER_ORDER)})")
    for name in REQUIRED:
        if name not in names:
            raise _fail(f"the required member {name} is missing")
    spans = []
    for info in infos:
        if info.flag_bits & 0x1:
            raise _fail(f"member {info.filename} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _fail(f"member {info.filename} is compressed; every member must be stored")
        if info.file_size > CAPS[info.filename]:
            raise _fail(f"member {info.filename} is {info.file_size} bytes, over its cap of "
                        f"{CAPS[info.filename]}")
        fh.seek(info.header_offset)
        head = fh.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size:
            raise _fail(f"member {info.filename}: local header is truncated")
        fields = _LOCAL_HEADER.unpack(head)
        if fields[0] != b"PK\x03\x04":
            raise _fail(f"member {info.filename}: bad local header")
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        spans.append((info.header_offset, start + info.compress_size, info.filename))
    spans.sort()
    for (_a0, a_end, a), (b0, _b_end, b) in zip(spans, spans[1:], strict=False):
        if a_end > b0:
            raise _fail(f"members {a} and {b} overlap")
    if spans and spans[-1][1] > total:
        raise _fail("a member runs past the end of the file")


def read_sync(path: Path) -> SyncPackage:
    """Open and verify a ``.sync`` (E208 for a damaged or tampered package, E002 for a bad manifest)."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open in the package, closed by SyncPackage.close
    except FileNotFoundError:
        raise AtoError(E_USAGE, f"{path} does not exist", details={"path": str(path)}) from None
    except OSError as exc:
        raise AtoError(E_USAGE, f"cannot read {path}: {exc.strerror}", details={"path": str(path)}) from None
    try:
        return _read(path, fh)
    except BaseException:
        fh.close()
        raise


def _read(path: Path, fh: BinaryIO) -> SyncPackage:
    total = os.fstat(fh.fileno()).st_size
    if total > MAX_FILE:
        raise _fail(f"{path.name} is {total} bytes, over the {MAX_FILE}-byte cap of a .sync")
    hasher = blake3.blake3()
    while chunk := fh.read(READ):
        hasher.update(chunk)
    fh.seek(0)
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _fail(f"{path.name} is not a .sync package (not a ZIP archive: {exc})") from None
    try:
        infos = zf.infolist()
        _check_layout(fh, infos, total)
        small: dict[str, bytes] = {}
        payload_hasher, payload_size = blake3.blake3(), 0
        for info in infos:
            with zf.open(info) as member:
                if info.filename == PAYLOAD:
                    while chunk := member.read(READ):
                        payload_hasher.update(chunk)
                        payload_size += len(chunk)
                else:
                    small[info.filename] = member.read(CAPS[info.filename] + 1)
        manifest = parse_manifest(small.pop(MANIFEST))
        if CONTEXT in small:
            try:
                json.loads(small[CONTEXT])
            except (ValueError, UnicodeDecodeError):
                raise _fail("context.json is not JSON") from None
        digests = sig.Digests(sig.manifest_hash(manifest.unsigned_doc()), label(payload_hasher.hexdigest()),
                              {n: label(blake3.blake3(b).hexdigest()) for n, b in sorted(small.items())})
        signature = sig.check(manifest, digests)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:  # CRC mismatch, truncation
        zf.close()
        raise _fail(f"{path.name} is damaged: {exc}") from None
    except BaseException:
        zf.close()
        raise
    return SyncPackage(path, manifest, digests, signature, payload_size, label(hasher.hexdigest()), total, fh, zf)


def _info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, so the mode below is meaningful on every machine
    info.external_attr = (0o100644 << 16)
    info.file_size = size
    return info


def write_sync(target: Path, manifest_toml: bytes, payload: Path, others: dict[str, bytes]) -> tuple[str, int]:
    """Write a package atomically (temp + fsync + rename); returns (blake3 label of the file, size).

    Deterministic: fixed member order, fixed timestamps and modes, no extra fields, all stored.
    """
    with atomic_writer(Path(target)) as out:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(_info(MANIFEST, len(manifest_toml)), manifest_toml)
            size = payload.stat().st_size
            with open(payload, "rb") as src, zf.open(_info(PAYLOAD, size), "w") as dst:
                while chunk := src.read(READ):
                    dst.write(chunk)
            for name in MEMBER_ORDER[2:]:
                if name in others:
                    zf.writestr(_info(name, len(others[name])), others[name])
    hasher = blake3.blake3()
    with open(target, "rb") as fh:
        while chunk := fh.read(READ):
            hasher.update(chunk)
        size = fh.tell()
    return label(hasher.hexdigest()), size

