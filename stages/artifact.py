"""The ``.capsule`` artifact: assembling it and reading it back with every digest checked.

An uncompressed tar with members in a fixed order (CONTRACTS.md §3), every header
normalized (uid/gid 0, no names, mtime SOURCE_DATE_EPOCH or 0, mode 0644), so two
builds of the same inputs are byte-identical on any machine.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import tomli_w

from cas.atomic import atomic_writer
from cas.canonical import canonical_json, jcs_digest
from cas.digest import label, parse
from cas.merkle import merkle_root
from cas.payload_manifest import PayloadManifest, PayloadManifestError
from cas.stoppoints import stop_point
from cas.store import CasStore
from pipeline.errors import E_INTEGRITY, AtoError
from stages import tar_header
from stages.payload_frames import PayloadCorrupt, PayloadScan, scan_payload

MEMBER_ORDER = ("capsule.toml", "capsule.lock.json", "sbom.spdx.json", "signature.json", "payload.tar.zst",
                "payload.v3.manifest.json")
README_NAMES = ("README.md", "README.mdx", "README.txt", "README")
RECORD = tarfile.RECORDSIZE
COPY = 1 << 20


def distribution_manifest(normalized: dict[str, Any], payload: PayloadManifest) -> dict[str, Any]:
    """The project manifest plus ``[distribution]`` with chunk list, Merkle root and manifest hash."""
    offset = 0
    chunk_list = []
    for c in payload.chunks:
        chunk_list.append({"chunk_hash": label(c.raw_hash), "offset": offset, "length": c.raw_size,
                           "codec": "fastcdc", "compression": "zstd"})
        offset += c.raw_size
    doc = dict(normalized)
    doc["distribution"] = {
        "merkle_root": label(merkle_root([c.raw_hash for c in payload.chunks])),
        "chunk_list": chunk_list,
    }
    doc["distribution"]["manifest_hash"] = manifest_hash(doc)
    doc["distribution"]["signatures"] = []
    return doc


def manifest_hash(doc: dict[str, Any]) -> str:
    """BLAKE3 of the JCS of the manifest without manifest_hash and signatures."""
    signable = dict(doc)
    dist = dict(signable.get("distribution") or {})
    dist.pop("manifest_hash", None)
    dist.pop("signatures", None)
    signable["distribution"] = dist
    return jcs_digest(signable)


class _HashingWriter:
    """Writes through to a file while hashing and counting, for the artifact digest."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.hasher = blake3.blake3()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.hasher.update(data)
        self.size += len(data)


@dataclass
class Member:
    name: str
    data: bytes | None = None
    path: Path | None = None  # streamed from a file (payload.tar.zst)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else os.path.getsize(self.path)  # type: ignore[arg-type]


def write_capsule(out_path: Path, members: list[Member], epoch: int,
                  temp_dir: Path | None = None) -> tuple[str, int]:
    """Write the outer tar atomically (its temp file in ``temp_dir``); returns (blake3 hex of the file, size)."""
    with atomic_writer(out_path, temp_dir=temp_dir) as fh:
        w = _HashingWriter(fh)
        for m in members:
            w.write(tar_header.header(m.name, size=m.size, mtime=epoch))
            if m.data is not None:
                w.write(m.data)
            else:
                with open(m.path, "rb") as src:  # type: ignore[arg-type]
                    while chunk := src.read(COPY):
                        w.write(chunk)
            w.write(tar_header.padding(m.size))
        w.write(b"\0" * (2 * tar_header.BLOCK))
        pad = (-w.size) % RECORD
        if pad:
            w.write(b"\0" * pad)
        stop_point("artifact.written")  # crash tests: the whole artifact in its temp file, not renamed
        return w.hasher.hexdigest(), w.size


def toml_bytes(doc: dict[str, Any]) -> bytes:
    return tomli_w.dumps(doc).encode("utf-8")


def jcs(doc: Any) -> bytes:
    return canonical_json(doc)


def materialize_payload(store: CasStore, payload: PayloadManifest, out_path: Path) -> str:
    """Write ``payload.tar.zst`` (the verified frames in order); returns its BLAKE3 hex."""
    hasher = blake3.blake3()
    with open(out_path, "wb") as fh:
        for frame in store.iter_frames(payload):
            fh.write(frame)
            hasher.update(frame)
    return hasher.hexdigest()


# ---------------------------------------------------------------- reading


@dataclass
class OpenedCapsule:
    """The small members of an artifact, parsed; the payload stays on disk."""

    path: Path
    members: list[str]
    manifest: dict[str, Any]
    lock: dict[str, Any]
    sbom: dict[str, Any]
    signature: dict[str, Any]
    payload_manifest: PayloadManifest
    payload_offset: int
    payload_size: int
    readme: str | None


def _integrity(message: str, **details: Any) -> AtoError:
    return AtoError(E_INTEGRITY, message, details=details)


@functools.lru_cache(maxsize=8)
def _parse_manifest_bytes(data: bytes) -> dict[str, Any]:
    return tomllib.loads(data.decode("utf-8"))


def parse_manifest_bytes(data: bytes) -> dict[str, Any]:
    """Parse a distribution capsule.toml, once per distinct content in this process.

    Its chunk list makes it thousands of tables long, and install, trust and native delivery
    each read the same artifact: keyed by the bytes themselves, the cache cannot serve a stale
    parse. Callers get their own copy.
    """
    return copy.deepcopy(_parse_manifest_bytes(bytes(data)))


def open_capsule(path: Path) -> OpenedCapsule:
    """Parse an artifact's members, refusing anything that is not a well-formed capsule."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise _integrity(f"{path.name} is not a readable .capsule (tar): {exc}", path=str(path)) from None
    with tf:
        infos = tf.getmembers()
        names = [i.name for i in infos]
        for info in infos:
            if not info.isfile() or "/" in info.name or info.name in ("", ".", ".."):
                raise _integrity(f"unexpected member {info.name!r} in {path.name}", member=info.name)
        expected = list(MEMBER_ORDER)
        if names[: len(expected)] != expected or any(n not in README_NAMES for n in names[len(expected):]):
            raise _integrity(f"{path.name} members are not the capsule layout: {names}", members=names)
        by_name = {i.name: i for i in infos}

        def read(name: str) -> bytes:
            fh = tf.extractfile(by_name[name])
            assert fh is not None
            return fh.read()

        try:
            manifest = parse_manifest_bytes(read("capsule.toml"))
            lock = _json(read("capsule.lock.json"))
            sbom = _json(read("sbom.spdx.json"))
            signature = _json(read("signature.json"))
            payload_manifest = PayloadManifest.from_json(_json(read("payload.v3.manifest.json")))
        except (ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError, PayloadManifestError) as exc:
            raise _integrity(f"{path.name}: malformed member: {exc}") from None
        readme_name = next((n for n in names if n in README_NAMES), None)
        readme = read(readme_name).decode("utf-8", "replace") if readme_name else None
        pinfo = by_name["payload.tar.zst"]
        return OpenedCapsule(path, names, manifest, lock, sbom, signature, payload_manifest,
                             pinfo.offset_data, pinfo.size, readme)


def _json(data: bytes) -> Any:
    return json.loads(data)


def verify_capsule(path: Path) -> dict[str, Any]:
    """Recompute every digest of an artifact; raise E208 naming the first thing that broke."""
    opened = open_capsule(path)
    dist = opened.manifest.get("distribution")
    if not isinstance(dist, dict):
        raise _integrity("capsule.toml has no [distribution] table")
    claimed = dist.get("manifest_hash")
    actual = manifest_hash(opened.manifest)
    if claimed != actual:
        raise _integrity(f"manifest_hash mismatch: capsule.toml claims {claimed}, content hashes to {actual}")
    payload = opened.payload_manifest
    chunk_list = dist.get("chunk_list") or []
    offset = 0
    if len(chunk_list) != len(payload.chunks):
        raise _integrity("distribution.chunk_list does not match payload.v3.manifest.json")
    for entry, ref in zip(chunk_list, payload.chunks, strict=True):
        if entry.get("offset") != offset or entry.get("length") != ref.raw_size or \
                parse(str(entry.get("chunk_hash"))) != ref.raw_hash:
            raise _integrity(f"distribution.chunk_list entry at offset {offset} does not match the payload")
        offset += ref.raw_size
    root = label(merkle_root([c.raw_hash for c in payload.chunks]))
    if dist.get("merkle_root") != root:
        raise _integrity(f"merkle_root mismatch: capsule.toml claims {dist.get('merkle_root')}, chunks give {root}")
    payload_hash = scan_of(opened).payload_hash  # every chunk decoded and checked
    sig_payload = opened.signature.get("payload_hash")
    if sig_payload is not None and sig_payload != label(payload_hash):
        raise _integrity("signature.json payload_hash does not match payload.tar.zst")
    if opened.signature.get("manifest_hash") not in (None, actual):
        raise _integrity("signature.json manifest_hash does not match capsule.toml")
    return {"manifest_hash": actual, "merkle_root": root, "payload_hash": label(payload_hash),
            "artifact_hash": label(payload.artifact_hash), "chunks": len(payload.chunks)}


def scan_of(opened: OpenedCapsule) -> PayloadScan:
    """The one decoding pass over an opened artifact's payload (kept for this process)."""
    try:
        return scan_payload(opened.path, opened.payload_offset, opened.payload_size, opened.payload_manifest)
    except PayloadCorrupt as exc:
        raise _integrity(str(exc), **exc.details) from None
    except OSError as exc:
        raise _integrity(f"cannot read {opened.path}: {exc.strerror}", path=str(opened.path)) from None


def payload_scan(path: Path) -> PayloadScan:
    """What the payload of the artifact at ``path`` holds: frames, entry safety, root sidecars."""
    return scan_of(open_capsule(path))
