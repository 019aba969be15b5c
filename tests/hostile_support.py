"""Hostile ``.capsule`` files, built byte by byte the way an attacker would, for the hostile suite.

Each artifact is otherwise well formed — every digest right, every member where it belongs —
so that the one thing wrong with it is the thing under test. Payload tars are written here with
the format's own header writer (any entry type, any name), not with ``tarfile``; bombs are built
by streaming, so building them costs little memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import zstandard

from cas.chunker import CdcParams, chunk_spans
from cas.digest import label
from cas.objects import compress
from cas.payload_manifest import ChunkRef, PayloadManifest
from cas.tree import tree_digest
from stages.capsule import archive, distribution, keys, signature, tar_header

BLOCK = 512
EPOCH = 0


@dataclass
class Entry:
    name: str
    data: bytes = b""
    kind: str = "file"  # file | dir | symlink | hardlink | chardev | fifo
    link: str = ""
    mode: int = 0o644


_FLAGS = {"file": tar_header.REGULAR, "dir": tar_header.DIRECTORY, "symlink": tar_header.SYMLINK,
          "hardlink": tar_header.HARDLINK, "chardev": tar_header.CHARDEV, "fifo": tar_header.FIFO}


def tar_bytes(entries: list[Entry], *, end: bool = True) -> bytes:
    """A payload tar of exactly these entries (in this order), with the end-of-archive marker."""
    out = bytearray()
    for e in entries:
        size = len(e.data) if e.kind == "file" else 0
        out += tar_header.header(e.name, size=size, mode=e.mode, typeflag=_FLAGS[e.kind], linkname=e.link or None)
        if size:
            out += e.data + tar_header.padding(size)
    if end:
        out += b"\0" * (2 * BLOCK)
        out += b"\0" * ((-len(out)) % 10240)
    return bytes(out)


def normalized_manifest(name: str, version: str) -> dict[str, Any]:
    return {"schema_version": "0.2", "name": name, "version": version, "type": "app", "default_target": "default",
            "targets": {"default": {"runtime": "source", "driver": "python", "entrypoint": "main.py"}}}


@dataclass
class Parts:
    """What an artifact is assembled from; tests change one part before :func:`assemble`."""

    name: str
    version: str
    payload: PayloadManifest
    payload_path: Path  # payload.tar.zst bytes
    payload_hash: str  # label
    small: dict[str, bytes] = field(default_factory=dict)
    signature: bytes = b""


def _parts(out: Path, name: str, version: str, payload: PayloadManifest, frames: Iterator[bytes],
           key: keys.SigningKey | None) -> Parts:
    scratch = out.with_name(out.name + ".payload")
    hasher = blake3.blake3()
    with open(scratch, "wb") as fh:
        for frame in frames:
            fh.write(frame)
            hasher.update(frame)
    dist = distribution.distribution_manifest(normalized_manifest(name, version), payload)
    small = {"capsule.toml": distribution.toml_bytes(dist), "capsule.lock.json": distribution.jcs({"version": 1}),
             "sbom.spdx.json": distribution.jcs({"spdxVersion": "SPDX-2.3"}),
             "payload.v3.manifest.json": payload.to_bytes()}
    doc = signature.signature_document(manifest_hash=dist["distribution"]["manifest_hash"],
                                       payload_hash=label(hasher.hexdigest()), members=small, epoch=EPOCH, key=key)
    return Parts(name, version, payload, scratch, label(hasher.hexdigest()), small, signature.signature_bytes(doc))


def assemble(parts: Parts, out: Path) -> Path:
    archive.write_capsule(out, [
        archive.Member("capsule.toml", parts.small["capsule.toml"]),
        archive.Member("capsule.lock.json", parts.small["capsule.lock.json"]),
        archive.Member("sbom.spdx.json", parts.small["sbom.spdx.json"]),
        archive.Member("signature.json", parts.signature),
        archive.Member("payload.tar.zst", path=parts.payload_path),
        archive.Member("payload.v3.manifest.json", parts.small["payload.v3.manifest.json"]),
    ], EPOCH)
    return out


def parts_for(out: Path, name: str, version: str, raw_tar: bytes, key: keys.SigningKey | None = None, *,
              single_frame: bool = False) -> Parts:
    """Parts whose payload is ``raw_tar`` cut by content-defined chunking, one frame per chunk
    (``single_frame``: the whole payload as one zstd frame, valid but not spliceable, as another tool
    might write it)."""
    refs, frames = [], []
    for offset, length in chunk_spans(raw_tar):
        raw = raw_tar[offset:offset + length]
        frame = compress(raw)
        refs.append(ChunkRef(blake3.blake3(raw).hexdigest(), len(raw), len(frame)))
        frames.append(frame)
    if single_frame:
        frames = [compress(raw_tar)]
    return _parts(out, name, version, PayloadManifest(refs), iter(frames), key)


def capsule(out: Path, name: str, version: str, entries: list[Entry] | None = None, *, raw_tar: bytes | None = None,
            key: keys.SigningKey | None = None, single_frame: bool = False) -> Path:
    """A complete artifact around a payload tar of ``entries`` (or the given raw payload bytes)."""
    payload = raw_tar if raw_tar is not None else tar_bytes(entries or [])
    parts = parts_for(out, name, version, payload, key, single_frame=single_frame)
    try:
        return assemble(parts, out)
    finally:
        parts.payload_path.unlink(missing_ok=True)


def with_signature(out: Path, name: str, version: str, entries: list[Entry], key: keys.SigningKey,
                   edit: Any) -> Path:
    """A signed artifact whose signature.json document is then changed by ``edit(doc) -> bytes``."""
    parts = parts_for(out, name, version, tar_bytes(entries), key)
    try:
        parts.signature = edit(json.loads(parts.signature))
        return assemble(parts, out)
    finally:
        parts.payload_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- decompression bombs


def single_chunk_bomb(out: Path, name: str, version: str, size: int = 1536 << 20) -> Path:
    """One chunk that decodes to ``size`` bytes (a tar of one file of zeros), claimed honestly in the
    payload manifest (whose CDC params claim a max_size that large): every digest is right."""
    head = tar_header.header("zeros.bin", size=size - 3 * BLOCK, mode=0o644)
    assert len(head) == BLOCK
    step = 1 << 24
    hasher = blake3.blake3()
    comp = zstandard.ZstdCompressor(level=3, write_content_size=True).compressobj(size=size)
    pieces = [comp.compress(head)]
    hasher.update(head)
    left = size - BLOCK
    zeros = bytes(step)
    while left:
        n = min(step, left)
        chunk = zeros if n == step else bytes(n)
        hasher.update(chunk)
        pieces.append(comp.compress(chunk))
        left -= n
    pieces.append(comp.flush())
    frame = b"".join(pieces)
    payload = PayloadManifest([ChunkRef(hasher.hexdigest(), size, len(frame))],
                              CdcParams(min_size=16384, avg_size=65536, max_size=2 << 30))
    parts = _parts(out, name, version, payload, iter([frame]), None)
    try:
        return assemble(parts, out)
    finally:
        parts.payload_path.unlink(missing_ok=True)


def many_chunk_bomb(out: Path, name: str, version: str, chunks: int = 4096, chunk: int = 256 << 10) -> Path:
    """``chunks`` chunks of ``chunk`` bytes (1 GiB by default): every chunk within the CDC max_size,
    every digest right, a few hundred KB on the wire."""
    total = chunks * chunk
    head = tar_header.header("zeros.bin", size=total - 3 * BLOCK, mode=0o644)
    first = head + bytes(chunk - BLOCK)
    zero = bytes(chunk)
    first_frame, zero_frame = compress(first), compress(zero)
    zero_hash = blake3.blake3(zero).hexdigest()
    refs = [ChunkRef(blake3.blake3(first).hexdigest(), chunk, len(first_frame))]
    refs += [ChunkRef(zero_hash, chunk, len(zero_frame)) for _ in range(chunks - 1)]

    def frames() -> Iterator[bytes]:
        yield first_frame
        for _ in range(chunks - 1):
            yield zero_frame

    parts = _parts(out, name, version, PayloadManifest(refs), frames(), None)
    try:
        return assemble(parts, out)
    finally:
        parts.payload_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- putting hostile bytes where a victim looks


def digests(path: Path) -> tuple[str, str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest(), len(data)


def spliced_layout(artifact: Path) -> tuple[PayloadManifest, int, int, int, list[Any]] | None:
    """(payload manifest, prefix size, payload size, suffix size, frames) of ``artifact`` read without judging
    anything, when its payload's frames are its manifest's chunks one to one (a registry can then serve it
    as a skeleton plus frames); None otherwise."""
    import io

    from stages.capsule.archive import FileSource, read_layout
    from stages.capsule.payload import FrameError, FrameRef, read_frame

    try:
        with open(artifact, "rb") as fh:
            layout = read_layout(FileSource(fh))
            data = artifact.read_bytes()
            span = layout.span(archive.PAYLOAD_MANIFEST)
            manifest = PayloadManifest.from_json(json.loads(data[span.offset:span.offset + span.size]))
    except Exception:  # noqa: BLE001 - anything unreadable is served whole
        return None
    pay = layout.payload
    window = io.BytesIO(data[pay.offset:pay.offset + pay.size])
    frames = []
    for chunk in manifest.chunks:
        try:
            frame = read_frame(window)
        except FrameError:
            return None
        if frame is None:
            return None
        frames.append(FrameRef(chunk.raw_hash, chunk.raw_size, len(frame), blake3.blake3(frame).hexdigest()))
    if window.read(1):
        return None
    return manifest, pay.offset, pay.size, len(data) - pay.offset - pay.size, frames


def plant_release(data_dir: Path, artifact: Path, publisher: str, name: str, version: str, *,
                  spliced: bool = False, served: Path | None = None) -> None:
    """Put ``artifact`` in a registry's data dir as a release, skipping the upload check — what a
    compromised registry (or its disk) serves. Served whole (no skeleton), like a foreign registry;
    with ``spliced``, as a skeleton plus frames (the delta install path) when its frames are its chunks.
    ``served``: other bytes the registry's disk holds for it (a tampered copy), with ``artifact``'s layout."""
    from pipeline.registry.storage import Inspection, RegistryStore, Upload
    from stages.capsule.signature import SignatureInfo

    store = RegistryStore(data_dir)
    store.initialize()
    tmp = store.new_temp(".capsule")
    shutil.copyfile(served or artifact, tmp)
    sha, b3, size = digests(tmp)
    manifest = {"name": name, "version": version, "distribution": {"manifest_hash": "blake3:" + "0" * 64}}
    layout = spliced_layout(artifact) if spliced else None
    payload, pre, pay, suf, frames = layout if layout is not None else (PayloadManifest(), 0, 0, 0, None)
    insp = Inspection(manifest, f'name = "{name}"\n', json.dumps(manifest), "blake3:" + "0" * 64, payload,
                      pre, pay, suf, frames, None, None, SignatureInfo(False))
    try:
        upload = Upload(tmp, publisher, name, version, f"{name}-{version}.capsule", False, sha, b3, size)
        store.index.transaction(lambda conn: store._commit(conn, upload, insp))
    finally:
        tmp.unlink(missing_ok=True)
        store.close()


def plant_installed(store_root: Path, artifact: Path, publisher: str, name: str, version: str) -> Path:
    """Put ``artifact`` where ``ato install`` stores artifacts (as if an older ato had stored it)."""
    target = store_root / publisher / name / version / f"{name}-{version}.capsule"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact, target)
    return target


def plant_fetch(fetches_root: Path, artifact: Path, scoped_id: str, version: str) -> Path:
    """A fetch cache dir that holds ``artifact`` as its artifact.capsule, beside an innocent tree:
    what finalize would be pointed at if fetch's refusal were bypassed."""
    tmp = fetches_root / ".planting"
    (tmp / "artifact").mkdir(parents=True)
    (tmp / "artifact" / "ato.delivery.toml").write_text('schema_version = "0.1"\n')
    parent = tree_digest(tmp / "artifact")
    shutil.copyfile(artifact, tmp / "artifact.capsule")
    record = {"schema_version": "0.1", "scoped_id": scoped_id, "version": version, "registry": "http://127.0.0.1:9",
              "fetched_at": "2026-01-01T00:00:00Z", "parent_digest": "blake3:" + parent,
              "artifact_blake3": "blake3:" + blake3.blake3(artifact.read_bytes()).hexdigest()}
    (tmp / "fetch.json").write_text(json.dumps(record))
    final = fetches_root / parent
    os.rename(tmp, final)
    return final


def plant_derivation(out: Path, fetched: Path, target: str) -> Path:
    """A derived app (a finalize output made by hand, signed with this machine's ato-sign key) whose
    origin is the fetch dir ``fetched``: what project is pointed at."""
    from stages.finalize import ato_sign

    record = json.loads((fetched / "fetch.json").read_text())
    app = out / "app"
    app.mkdir(parents=True)
    (app / "app").write_text("#!/bin/sh\necho hostile\n")
    (app / "app").chmod(0o755)
    derived = "blake3:" + tree_digest(app)
    prov = {"schema_version": "0.1", "scoped_id": record["scoped_id"], "version": record["version"],
            "registry": record["registry"], "artifact_blake3": record["artifact_blake3"],
            "parent_digest": record["parent_digest"], "derived_digest": derived, "framework": "c", "target": target,
            "finalized_locally": True, "finalize_tool": "ato-sign", "finalized_at": "2026-01-01T00:00:00Z",
            "local_signature": ato_sign(record["parent_digest"], derived, target)}
    (out / "local-derivation.json").write_text(json.dumps(prov))
    return app


def tree_snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its type, mode and content digest (symlinks by target)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(path, "rb") as fh:
                    out[rel] = ("file", st.st_mode, hashlib.sha256(fh.read()).hexdigest())
    return out


def du(root: Path) -> int:
    """Bytes of regular files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


@contextmanager
def never_blocks(what: str, seconds: int = 20) -> Iterator[None]:
    """Fail the test (instead of hanging it) when the code inside waits, e.g. for a writer on a FIFO
    planted where a regular file was. Main thread only: it uses SIGALRM."""
    import signal

    def hung(*_a: object) -> None:
        raise AssertionError(f"{what} blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
