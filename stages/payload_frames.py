"""The payload of a ``.capsule`` as a sequence of zstd frames, one per CAS chunk.

``ato build`` writes ``payload.tar.zst`` as the concatenation of the CAS frames of
its chunks, in order. Exact delta transfer rests on that: an artifact is its
*skeleton* (the bytes before and after the payload member) plus its frames, so a
client that already holds most frames needs only the missing ones to rebuild the
published bytes exactly.

:func:`split_payload` walks the frames of a payload without trusting anything:
each frame's extent is read from the zstd frame format itself (header, block
headers, optional checksum), each frame must decode to exactly the chunk the
payload manifest names at that position (size and BLAKE3), and the decoded tar
is scanned so that no entry is absolute, climbs out with ``..``, or is anything
but a file, directory or contained symlink. An artifact whose frames do not line
up with its chunks is still a valid capsule; it is just not spliceable
(:class:`NotSpliceable`), and is then served whole.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

import blake3
import zstandard

from cas.digest import parse
from cas.payload_manifest import PayloadManifest
from cas.streams import ChunkStream, FileSlice
from pipeline.manifest.delivery import SIDECAR_NAME

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SIDECARS = frozenset({SIDECAR_NAME})  # payload-root files install reads before anything is unpacked
MAX_SIDECAR = 1 << 20
MAX_FRAME_CONTENT = 16 << 20  # far above FastCDC's max chunk; refuses decompression bombs
BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED = 0, 1, 2


class FrameError(ValueError):
    """Bytes that are not a well-formed single zstd frame."""


class NotSpliceable(ValueError):
    """The payload's frames do not correspond one-to-one to its manifest's chunks."""


class UnsafePayload(ValueError):
    """The payload tar holds an entry that must never be unpacked."""


class PayloadCorrupt(ValueError):
    """A payload chunk does not decode to the size and BLAKE3 its manifest lists."""

    def __init__(self, message: str, **details: str) -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class FrameRef:
    """One chunk of a payload: its raw identity and the exact frame that encodes it."""

    raw_hash: str  # hex
    raw_size: int
    frame_size: int
    frame_blake3: str  # hex of the frame bytes

    def to_json(self) -> dict[str, object]:
        return {"raw_hash": "blake3:" + self.raw_hash, "raw_size": self.raw_size,
                "frame_size": self.frame_size, "frame_blake3": "blake3:" + self.frame_blake3}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> FrameRef:
        return cls(parse(str(doc["raw_hash"])), int(doc["raw_size"]),  # type: ignore[arg-type]
                   int(doc["frame_size"]), parse(str(doc["frame_blake3"])))  # type: ignore[arg-type]


def _header_size(head: bytes) -> int:
    """Size of a zstd frame header (magic included) from its first bytes."""
    if len(head) < 5 or head[:4] != ZSTD_MAGIC:
        raise FrameError("not a zstd frame (bad magic number)")
    fhd = head[4]
    fcs_flag, single_segment, reserved, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, fhd & 3
    if reserved:
        raise FrameError("zstd frame header has the reserved bit set")
    size = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    return size


def read_frame(fh: BinaryIO) -> bytes | None:
    """Read exactly one zstd frame from ``fh``; None at a clean end of input."""
    first = fh.read(5)
    if not first:
        return None
    hsize = _header_size(first)
    buf = bytearray(first)
    rest = fh.read(hsize - 5)
    if len(rest) != hsize - 5:
        raise FrameError("truncated zstd frame header")
    buf += rest
    checksum = (first[4] >> 2) & 1
    while True:
        bh = fh.read(3)
        if len(bh) != 3:
            raise FrameError("truncated zstd block header")
        buf += bh
        value = int.from_bytes(bh, "little")
        last, btype, bsize = value & 1, (value >> 1) & 3, value >> 3
        if btype == 3:
            raise FrameError("zstd block of the reserved type")
        body = 1 if btype == BLOCK_RLE else bsize
        data = fh.read(body)
        if len(data) != body:
            raise FrameError("truncated zstd block")
        buf += data
        if last:
            break
    if checksum:
        tail = fh.read(4)
        if len(tail) != 4:
            raise FrameError("truncated zstd frame checksum")
        buf += tail
    return bytes(buf)


def decode_frame(frame: bytes, expected_size: int) -> bytes:
    """Decode one frame that must hold exactly ``expected_size`` bytes."""
    params = zstandard.get_frame_parameters(frame)
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise FrameError("zstd frame does not declare its content size")
    if params.content_size != expected_size or expected_size > MAX_FRAME_CONTENT:
        raise FrameError(f"zstd frame holds {params.content_size} bytes, expected {expected_size}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd frame does not decode: {exc}") from None
    if len(raw) != expected_size:
        raise FrameError(f"zstd frame decodes to {len(raw)} bytes, expected {expected_size}")
    return raw


def check_frame(frame: bytes, raw_hash: str, raw_size: int) -> bytes:
    """Decode ``frame`` and require it to be the chunk ``raw_hash``; returns the raw bytes."""
    raw = decode_frame(frame, raw_size)
    if blake3.blake3(raw).hexdigest() != raw_hash:
        raise FrameError(f"zstd frame does not decode to chunk blake3:{raw_hash}")
    return raw


def check_tar_member(info: tarfile.TarInfo) -> None:
    """Refuse entries that could write outside the unpack root or are not plain content."""
    name = info.name
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafePayload(f"payload entry {name!r} is an absolute or non-POSIX path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafePayload(f"payload entry {name!r} climbs out of the capsule root ('..')")
    if info.issym():
        target = info.linkname
        if not target or target.startswith("/"):
            raise UnsafePayload(f"payload symlink {name!r} -> {target!r} is absolute")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafePayload(f"payload symlink {name!r} -> {target!r} points outside the capsule root")
    elif not (info.isfile() or info.isdir()):
        raise UnsafePayload(f"payload entry {name!r} is not a regular file, directory or symlink")


def scan_tar(stream: io.RawIOBase, sidecars: dict[str, bytes] | None = None) -> int:
    """Walk a payload tar from a stream, checking every entry; returns the entry count.

    Payload-root files named in :data:`SIDECARS` are copied into ``sidecars`` on the way.
    """
    count = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as tf:
            for info in tf:
                check_tar_member(info)
                count += 1
                if sidecars is not None and info.isreg() and info.size <= MAX_SIDECAR:
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    if name in SIDECARS:
                        fh = tf.extractfile(info)
                        if fh is not None:
                            sidecars[name] = fh.read()
    except tarfile.TarError as exc:
        raise UnsafePayload(f"payload is not a readable tar: {exc}") from None
    return count


def iter_frames(window: BinaryIO, manifest: PayloadManifest,
                hasher: blake3.blake3) -> Iterator[tuple[FrameRef, bytes, bytes]]:
    """Yield ``(ref, frame, raw)`` for each chunk of the payload read from ``window``.

    Every frame's bytes also go into ``hasher``. Raises :class:`NotSpliceable` when the
    frames do not match the chunks one to one.
    """
    for i, chunk in enumerate(manifest.chunks):
        try:
            frame = read_frame(window)
            if frame is None:
                raise FrameError("payload ends before its last chunk")
            hasher.update(frame)
            raw = check_frame(frame, chunk.raw_hash, chunk.raw_size)
        except FrameError as exc:
            raise NotSpliceable(f"payload frame {i} is not chunk blake3:{chunk.raw_hash}: {exc}") from None
        yield FrameRef(chunk.raw_hash, chunk.raw_size, len(frame), blake3.blake3(frame).hexdigest()), frame, raw
    if window.read(1):
        raise NotSpliceable("payload.tar.zst holds bytes after its last chunk's frame")


def iter_chunks(window: BinaryIO, manifest: PayloadManifest, hasher: blake3.blake3) -> Iterator[bytes]:
    """Decode a payload of any frame layout, yielding each chunk after checking its size and BLAKE3.

    Raises :class:`PayloadCorrupt` naming the first chunk that does not match.
    """
    def hashed() -> Iterator[bytes]:
        while data := window.read(1 << 20):
            hasher.update(data)
            yield data

    source = hashed()
    reader = zstandard.ZstdDecompressor().stream_reader(ChunkStream(source), read_across_frames=True)
    try:
        for i, ref in enumerate(manifest.chunks):
            raw = reader.read(ref.raw_size)
            while len(raw) < ref.raw_size:
                more = reader.read(ref.raw_size - len(raw))
                if not more:
                    break
                raw += more
            if len(raw) != ref.raw_size or blake3.blake3(raw).hexdigest() != ref.raw_hash:
                raise PayloadCorrupt(f"payload chunk {i} (blake3:{ref.raw_hash}) does not match its digest",
                                     chunk="blake3:" + ref.raw_hash)
            yield raw
        if reader.read(1):
            raise PayloadCorrupt("payload.tar.zst holds more data than its manifest lists")
        for _data in source:  # hash whatever the decoder did not need to read
            pass
    except zstandard.ZstdError as exc:
        raise PayloadCorrupt(f"payload.tar.zst does not decode: {exc}") from None


@dataclass(frozen=True)
class PayloadScan:
    """What one pass over ``payload.tar.zst`` established.

    Every chunk decoded to its manifest digest (or the scan raised); ``frames`` is None when the
    frames are not the chunks one to one (a valid capsule that cannot be spliced, ``reason`` says
    why); ``unsafe`` says why the tar must never be unpacked, or is None.
    """

    payload_hash: str  # hex BLAKE3 of the payload member's bytes
    frames: tuple[FrameRef, ...] | None
    entries: int
    unsafe: str | None = None
    reason: str | None = None
    sidecars: dict[str, bytes] = field(default_factory=dict)


def _scan_pass(fh: BinaryIO, offset: int, size: int, manifest: PayloadManifest, spliced: bool) -> PayloadScan:
    fh.seek(0)
    window = io.BufferedReader(FileSlice(fh, offset, size), 1 << 20)
    hasher = blake3.blake3()
    refs: list[FrameRef] = []
    if spliced:
        def raws() -> Iterator[bytes]:
            for ref, _frame, raw in iter_frames(window, manifest, hasher):
                refs.append(ref)
                yield raw
        gen = raws()
    else:
        gen = iter_chunks(window, manifest, hasher)
    sidecars: dict[str, bytes] = {}
    unsafe = None
    entries = 0
    try:
        entries = scan_tar(ChunkStream(gen), sidecars)
    except UnsafePayload as exc:
        unsafe = str(exc)
    for _raw in gen:  # the tar scanner stops at the end-of-archive marker: every chunk is still checked
        pass
    return PayloadScan(hasher.hexdigest(), tuple(refs) if spliced else None, entries, unsafe, None, sidecars)


_SCANS: OrderedDict[tuple[object, ...], PayloadScan] = OrderedDict()
_SCAN_MEMO = 8
_SCANS_LOCK = threading.Lock()


def scan_payload(path: str | os.PathLike[str], offset: int, size: int, manifest: PayloadManifest) -> PayloadScan:
    """Decode the payload at ``[offset, offset+size)`` of ``path`` once: every chunk, every frame, every entry.

    Publish, the registry, install and the trust check all need these facts about the same
    file; they are kept for this process, keyed by the file's identity and change time
    (ctime moves on any write and cannot be set back) plus the manifest, so a second caller
    gets them without decoding again.
    Raises :class:`PayloadCorrupt` when a chunk does not match the manifest.
    """
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
               offset, size, manifest.artifact_hash)
        with _SCANS_LOCK:
            found = _SCANS.get(key)
            if found is not None:
                _SCANS.move_to_end(key)
                return found
        try:
            scan = _scan_pass(fh, offset, size, manifest, spliced=True)
        except NotSpliceable as exc:
            scan = replace(_scan_pass(fh, offset, size, manifest, spliced=False), reason=str(exc))
    with _SCANS_LOCK:  # the registry server scans uploads on several threads
        _SCANS[key] = scan
        while len(_SCANS) > _SCAN_MEMO:
            _SCANS.popitem(last=False)
    return scan


@dataclass
class PayloadLayout:
    frames: list[FrameRef] | None  # None when not spliceable
    entries: int
    reason: str | None = None  # why it is not spliceable


def split_payload(path: str, offset: int, size: int, manifest: PayloadManifest,
                  sink: Callable[[FrameRef, bytes, int], None] | None = None) -> PayloadLayout:
    """The frames of a payload (checked by :func:`scan_payload`), refusing a dangerous tar entry.

    ``sink(ref, frame, frame_offset)`` then sees each verified frame in order.
    Raises :class:`UnsafePayload` for a dangerous tar entry, whatever the frame layout, and
    :class:`PayloadCorrupt` for a chunk that does not match the manifest.
    """
    scan = scan_payload(path, offset, size, manifest)
    if scan.unsafe is not None:
        raise UnsafePayload(scan.unsafe)
    if scan.frames is None:
        return PayloadLayout(None, scan.entries, scan.reason)
    if sink is not None:
        with open(path, "rb") as fh:
            fh.seek(offset)
            pos = offset
            for ref in scan.frames:
                frame = fh.read(ref.frame_size)
                if len(frame) != ref.frame_size or blake3.blake3(frame).hexdigest() != ref.frame_blake3:
                    raise PayloadCorrupt(f"payload frame of chunk blake3:{ref.raw_hash} changed after it was checked")
                sink(ref, frame, pos)
                pos += len(frame)
    return PayloadLayout(list(scan.frames), scan.entries)
