"""``payload.tar.zst``: zstd frames, one per CAS chunk, decoding to the payload tar.

``ato build`` writes ``payload.tar.zst`` as the concatenation of the CAS frames of its chunks,
in order. Exact delta transfer rests on that: an artifact is its *skeleton* (the bytes before
and after the payload member) plus its frames, so a client that already holds most frames needs
only the missing ones to rebuild the published bytes exactly.

:class:`PayloadScanner` decodes a payload once without trusting anything, fed its bytes as they
arrive (from a file or a download). Each frame's extent is read from
the zstd frame format itself (header, block headers, optional checksum); each frame, or when the
frames are not the chunks one to one, the decoded stream, must give exactly the chunk the payload
manifest names at that position (size and BLAKE3). A decoder never produces more than one chunk
(at most :data:`cas.payload_manifest.MAX_CHUNK` bytes) at a time and never more than the manifest's
``total_raw_size`` in all, so a decompression bomb costs neither memory nor disk. The decoded tar
is walked by :mod:`stages.capsule.payload_tar` and every entry judged by
:class:`stages.capsule.entries.TreeModel`, the same rules the unpacker applies. An artifact whose
frames do not line up with its chunks is still a valid capsule; it is just not spliceable
(``frames`` is None), and is then served whole.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import BinaryIO

import blake3
import zstandard

from cas.digest import parse
from cas.payload_manifest import MAX_CHUNK, PayloadManifest
from cas.streams import ChunkStream, FileSlice
from pipeline.errors import E_INTEGRITY, E_NAME_TOO_LONG
from pipeline.manifest.delivery import SIDECAR_NAME
from stages.capsule.entries import TreeModel, UnsafeEntry
from stages.capsule.errors import UNREADABLE_TAR, CapsuleError
from stages.capsule.payload_tar import TarFormatError, TarReader

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SIDECARS = frozenset({SIDECAR_NAME})  # payload-root files install reads before anything is unpacked
MAX_SIDECAR = 1 << 20
BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED = 0, 1, 2
READ = 1 << 20
MAX_FRAME = MAX_CHUNK + (64 << 10)  # a frame of one chunk, even of incompressible bytes, is never larger


class FrameError(ValueError):
    """Bytes that are not a well-formed single zstd frame of the expected chunk."""


class NotSpliceable(ValueError):
    """The payload's frames do not correspond one-to-one to its manifest's chunks."""


class PayloadCorrupt(ValueError):
    """A payload chunk does not decode to the size and BLAKE3 its manifest lists."""


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


# ---------------------------------------------------------------- frames


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


def read_frame(fh: BinaryIO, limit: int = MAX_FRAME) -> bytes | None:
    """Read exactly one zstd frame from ``fh``; None at a clean end of input. A frame longer than
    ``limit`` bytes is refused while it is read (it cannot be one chunk's frame)."""
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
        if len(buf) + body > limit:
            raise FrameError(f"zstd frame is longer than {limit} bytes: more than one chunk's frame")
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


def _declared(frame: bytes, expected_size: int) -> None:
    """The header of a frame that must hold exactly ``expected_size`` bytes (at most one chunk)."""
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd frame header does not parse: {exc}") from None
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise FrameError("zstd frame does not declare its content size")
    if expected_size > MAX_CHUNK:
        raise FrameError(f"a chunk of {expected_size} bytes is over the {MAX_CHUNK}-byte chunk ceiling")
    if params.content_size != expected_size:
        raise FrameError(f"zstd frame holds {params.content_size} bytes, expected {expected_size}")


def decode_frame(frame: bytes, expected_size: int) -> bytes:
    """Decode one frame that must hold exactly ``expected_size`` bytes (at most one chunk)."""
    _declared(frame, expected_size)
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"zstd frame does not decode: {exc}") from None
    if len(raw) != expected_size:
        raise FrameError(f"zstd frame decodes to {len(raw)} bytes, expected {expected_size}")
    return raw


def _decode_batch(decoder: zstandard.ZstdDecompressor, frames: list[bytes], sizes: list[int]) -> list[bytes] | None:
    """The frames decoded in one call that releases the GIL once (None when one does not decode: the
    caller then decodes them one by one to name it). Every frame's header was checked by
    :func:`_declared`, so each output is bounded by the chunk size its manifest names."""
    try:
        out = decoder.multi_decompress_to_buffer(frames, decompressed_sizes=struct.pack(f"={len(sizes)}Q", *sizes),
                                                 threads=1)
    except zstandard.ZstdError:
        return None
    raws = [out[i] for i in range(len(out))]
    return raws if len(raws) == len(frames) and all(len(r) == n for r, n in zip(raws, sizes, strict=True)) else None


def check_frame(frame: bytes, raw_hash: str, raw_size: int) -> bytes:
    """Decode ``frame`` and require it to be the chunk ``raw_hash``; returns the raw bytes."""
    raw = decode_frame(frame, raw_size)
    if blake3.blake3(raw).hexdigest() != raw_hash:
        raise FrameError(f"zstd frame does not decode to chunk blake3:{raw_hash}")
    return raw


class FrameMismatch(ValueError):
    """A payload frame that is not the frame the caller was told to expect (a registry's skeleton)."""


FRAME_BATCH = 32  # frames decoded per call: the scan thread gives up the GIL once per batch, not per frame


def iter_frames(window: BinaryIO, manifest: PayloadManifest, hasher: blake3.blake3 | None,
                expected: Sequence[FrameRef] | None = None) -> Iterator[tuple[FrameRef, bytes, bytes]]:
    """Yield ``(ref, frame, raw)`` for each chunk of the payload read from ``window``.

    Every frame's bytes also go into ``hasher`` (None: the caller hashes them). Raises :class:`NotSpliceable` when the
    frames do not match the chunks one to one; with ``expected``, :class:`FrameMismatch` for the
    first frame that is not the expected one (checked before it is decoded). Frames are read, checked
    and decoded in batches of :data:`FRAME_BATCH`; a problem is raised after the good frames before it
    are yielded, so the refusal is the one a frame-by-frame pass finds first.
    """
    decoder = zstandard.ZstdDecompressor()
    chunks = manifest.chunks
    i = 0
    while i < len(chunks):
        batch: list[tuple[FrameRef, bytes]] = []
        problem: Exception | None = None
        for j in range(i, min(i + FRAME_BATCH, len(chunks))):
            chunk = chunks[j]
            try:
                frame = read_frame(window)
                if frame is None:
                    raise FrameError("payload ends before its last chunk")
            except FrameError as exc:
                if expected is not None:
                    problem = FrameMismatch(f"payload frame {j} is not the published frame of chunk "
                                            f"blake3:{chunk.raw_hash}: {exc}")
                else:
                    problem = NotSpliceable(f"payload frame {j} is not chunk blake3:{chunk.raw_hash}: {exc}")
                break
            digest = blake3.blake3(frame).hexdigest()
            if expected is not None and (j >= len(expected) or expected[j].frame_blake3 != digest
                                         or expected[j].frame_size != len(frame)):
                problem = FrameMismatch(f"payload frame {j} (chunk blake3:{chunk.raw_hash}) is not the published frame")
                break
            if hasher is not None:
                hasher.update(frame)
            try:
                _declared(frame, chunk.raw_size)
            except FrameError as exc:
                problem = NotSpliceable(f"payload frame {j} is not chunk blake3:{chunk.raw_hash}: {exc}")
                break
            batch.append((FrameRef(chunk.raw_hash, chunk.raw_size, len(frame), digest), frame))
        raws = _decode_batch(decoder, [f for _r, f in batch], [r.raw_size for r, _f in batch]) if batch else []
        for k, (ref, frame) in enumerate(batch):
            try:
                raw = raws[k] if raws is not None else decode_frame(frame, ref.raw_size)
            except FrameError as exc:
                raise NotSpliceable(f"payload frame {i + k} is not chunk blake3:{ref.raw_hash}: {exc}") from None
            if blake3.blake3(raw).hexdigest() != ref.raw_hash:
                raise NotSpliceable(f"payload frame {i + k} is not chunk blake3:{ref.raw_hash}: "
                                    f"zstd frame does not decode to chunk blake3:{ref.raw_hash}")
            yield ref, frame, raw
        if problem is not None:
            raise problem
        i += len(batch)
    if window.read(1):
        if expected is not None:
            raise FrameMismatch("payload.tar.zst holds bytes after its last published frame")
        raise NotSpliceable("payload.tar.zst holds bytes after its last chunk's frame")


def iter_chunks(window: BinaryIO, manifest: PayloadManifest, hasher: blake3.blake3) -> Iterator[bytes]:
    """Decode a payload of any frame layout, yielding each chunk after checking its size and BLAKE3.

    The decoder is asked for one chunk's bytes at a time, so what it holds is bounded by the
    chunk size whatever the frames claim. Raises :class:`PayloadCorrupt` naming the first chunk
    that does not match.
    """
    def hashed() -> Iterator[bytes]:
        while data := window.read(READ):
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
                raise PayloadCorrupt(f"payload chunk {i} (blake3:{ref.raw_hash}) does not match its digest")
            yield raw
        if reader.read(1):
            raise PayloadCorrupt("payload.tar.zst decodes to more data than its manifest's total_raw_size")
        for _data in source:  # hash whatever the decoder did not need to read
            pass
    except zstandard.ZstdError as exc:
        raise PayloadCorrupt(f"payload.tar.zst does not decode: {exc}") from None


# ---------------------------------------------------------------- the entries


def walk(chunks: Iterator[bytes], on_entry: Callable[[TarReader, object], None] | None = None,
         sidecars: dict[str, bytes] | None = None) -> int:
    """Walk the payload tar decoded from ``chunks`` through the entry rules; returns the entry count.

    ``on_entry(reader, placed)`` sees each :class:`~stages.capsule.entries.Placed` entry (the
    unpacker writes it); payload-root files named in :data:`SIDECARS` are copied into ``sidecars``.
    Raises :class:`~stages.capsule.entries.UnsafeEntry` or :class:`TarFormatError`.
    """
    reader = TarReader(io.BufferedReader(ChunkStream(chunks), READ))
    model = TreeModel()
    for entry in reader:
        placed = model.add(entry)
        if placed is None:
            continue
        if sidecars is not None and placed.kind == "file" and placed.rel in SIDECARS and entry.size <= MAX_SIDECAR:
            sidecars[placed.rel] = b"".join(reader.data())
        if on_entry is not None:
            on_entry(reader, placed)
    model.finish()
    return reader.entries


def refusal(exc: Exception) -> CapsuleError:
    """The E208 a payload problem found while decoding or walking is reported as (E108 for a name no
    filesystem holds: the user's to fix, with the code ENAMETOOLONG gets everywhere else)."""
    if isinstance(exc, UnsafeEntry):
        code = E_NAME_TOO_LONG if exc.reason == "name_too_long" else E_INTEGRITY
        return CapsuleError("digests", str(exc), code=code, reason=exc.reason, path=exc.name[:300])
    if isinstance(exc, TarFormatError):
        return CapsuleError("digests", f"payload.tar.zst is not a readable tar: {exc}", reason=UNREADABLE_TAR)
    if isinstance(exc, FrameMismatch):
        return CapsuleError("digests", str(exc), reason="frame_mismatch")
    return CapsuleError("digests", str(exc))


# ---------------------------------------------------------------- one pass over a payload


@dataclass(frozen=True)
class PayloadScan:
    """What one pass over ``payload.tar.zst`` established (every chunk decoded to its digest, every
    entry safe): ``frames`` is None when the frames are not the chunks one to one (``reason`` says
    why); ``sidecars`` holds the payload-root files install reads before unpacking."""

    payload_hash: str  # hex BLAKE3 of the payload member's bytes
    frames: tuple[FrameRef, ...] | None
    entries: int
    reason: str | None = None
    sidecars: dict[str, bytes] = field(default_factory=dict)


def _file_pieces(fh: BinaryIO, offset: int, size: int) -> Iterator[bytes]:
    window = FileSlice(fh, offset, size)
    while data := window.read(READ):
        yield data


def _pass(pieces: Iterator[bytes], manifest: PayloadManifest, spliced: bool,
          expected: Sequence[FrameRef] | None = None, hashed: bool = False) -> PayloadScan:
    """The one scan: ``pieces`` are the payload member's bytes in order (any split). ``hashed``: the
    caller hashes the pieces itself (the scan's ``payload_hash`` is then empty). One thread: a second one
    that decoded ahead of the walk cost more in GIL hand-offs than it overlapped on 2 cores (measured)."""
    window = io.BufferedReader(ChunkStream(pieces), READ)
    hasher = blake3.blake3()
    refs: list[FrameRef] = []
    if spliced:
        def raws() -> Iterator[bytes]:
            for ref, _frame, raw in iter_frames(window, manifest, None if hashed else hasher, expected):
                refs.append(ref)
                yield raw
        chunks = raws()
    else:
        chunks = iter_chunks(window, manifest, hasher)
    sidecars: dict[str, bytes] = {}
    entries = walk(chunks, sidecars=sidecars)
    for _raw in chunks:  # the walk reads to the end of the stream; this only makes that explicit
        pass
    return PayloadScan("" if hashed else hasher.hexdigest(), tuple(refs) if spliced else None, entries, None,
                       sidecars)


def scan_unspliced(fh: BinaryIO, offset: int, size: int, manifest: PayloadManifest, why: str) -> PayloadScan:
    """The scan of a payload whose frames are not its chunks one to one (:class:`PayloadScanner` said
    :class:`NotSpliceable`, for ``why``): the decoded stream must still be the chunks, in order."""
    try:
        scan_ = _pass(_file_pieces(fh, offset, size), manifest, spliced=False)
    except (UnsafeEntry, TarFormatError, PayloadCorrupt) as exc:
        raise refusal(exc) from None
    return PayloadScan(scan_.payload_hash, None, scan_.entries, why, scan_.sidecars)


class _Abandoned(Exception):
    """The feeder gave up (its download failed): the scan thread stops where it is."""


_END = object()


class PayloadScanner:
    """The one scan of a payload, fed its bytes as they arrive: every frame, chunk and entry.

    ``feed(data)`` hands over the next bytes of ``payload.tar.zst`` (split anywhere); the scan runs on
    a thread of its own, so decoding overlaps whatever produces the bytes (a download, a file read),
    and at most ``depth`` fed pieces wait for it. ``feed`` raises the refusal (CapsuleError, E208/E108)
    as soon as the scan has found it, so a download stops at the first bad frame or entry; a bomb is
    stopped by the same caps as a file (one chunk's frame, one chunk's bytes, the manifest's total).
    ``finish()`` (after the last byte) returns the :class:`PayloadScan`, raises the refusal, or raises
    :class:`NotSpliceable` when the frames are not the chunks one to one (the caller then scans the
    complete file with :func:`scan_unspliced`). ``close()`` abandons a scan (always safe to call).
    ``frames``: the frames the payload must consist of (a registry's skeleton names them); the first
    that differs is refused (E208) before it is decoded, and frames that are not the chunks are then
    a refusal, not a reason to scan again.
    """

    def __init__(self, manifest: PayloadManifest, depth: int = 4, frames: Sequence[FrameRef] | None = None) -> None:
        self._q: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._result: PayloadScan | None = None
        self._error: BaseException | None = None
        self._manifest = manifest
        self._frames = frames
        self._finished = False
        self._hasher = blake3.blake3()  # the payload's BLAKE3, on the feeding thread: a few big updates
        self._thread = threading.Thread(target=self._run, name="payload-scan", daemon=True)
        self._thread.start()

    def _pieces(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if self._stop.is_set():
                raise _Abandoned
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def _run(self) -> None:
        try:
            scan = _pass(self._pieces(), self._manifest, spliced=True, expected=self._frames, hashed=True)
            self._result = replace(scan, payload_hash=self._hasher.hexdigest())
        except _Abandoned:
            pass
        except (UnsafeEntry, TarFormatError, PayloadCorrupt, FrameMismatch) as exc:
            self._error = refusal(exc)
        except BaseException as exc:  # noqa: BLE001 - NotSpliceable, CapsuleError, or a bug: finish() raises it
            self._error = exc
        finally:
            self._done.set()
            while True:  # wake a feeder blocked on a full queue; what it still feeds is dropped
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    break

    def _raise_refusal(self) -> None:
        if self._error is not None and not isinstance(self._error, NotSpliceable):
            raise self._error

    def feed(self, data: bytes) -> None:
        """The next bytes of the payload (raises the refusal once the scan has found one)."""
        if self._done.is_set():
            self._raise_refusal()
            return  # not spliceable: finish() says so; the bytes are not needed
        if data:
            self._hasher.update(data)
            self._q.put(data)

    def finish(self) -> PayloadScan:
        """The scan of every byte fed; raises the refusal, or NotSpliceable."""
        if not self._done.is_set():
            self._q.put(_END)
        self._thread.join()
        self._finished = True
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the payload scan ended without a result")
        return self._result

    def close(self) -> None:
        """Abandon the scan (a no-op after :meth:`finish`)."""
        if self._finished:
            return
        self._stop.set()
        try:
            self._q.put_nowait(_END)
        except queue.Full:
            pass  # the thread takes a piece, sees the stop and ends
        self._thread.join()
        self._finished = True


def stream_frames(fh: BinaryIO, offset: int, frames: tuple[FrameRef, ...]) -> Iterator[tuple[FrameRef, bytes, int]]:
    """``(ref, frame, frame_offset)`` for each verified frame, re-read from the file and re-checked
    against the frame digest the scan recorded (the file may not change in between)."""
    pos = offset
    for ref in frames:
        fh.seek(pos)
        frame = fh.read(ref.frame_size)
        if len(frame) != ref.frame_size or blake3.blake3(frame).hexdigest() != ref.frame_blake3:
            raise CapsuleError("digests", f"payload frame of chunk blake3:{ref.raw_hash} changed after it was checked")
        yield ref, frame, pos
        pos += len(frame)
