"""The zstd frame of one chunk: how it is made, and how it is decoded without trusting it.

One self-contained frame per chunk, with its content size in the header, so the concatenation
of a payload's frames is itself a valid ``payload.tar.zst``. Compression is deterministic: level
3, no checksum, compressed on the calling thread (``threads=0``) so the bytes never depend on the
machine's core count.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence

import zstandard

from cas.chunker import MAX_SIZE

COMPRESSION_LEVEL = 3
_local = threading.local()


class ChunkError(Exception):
    """A chunk is missing from the store, or the bytes stored for it are not what its name promises."""

    def __init__(self, kind: str, hex_digest: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "missing" | "corrupt"
        self.hex_digest = hex_digest


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "compressor", None)  # one per thread: they are not thread-safe
    if comp is None:
        comp = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL, write_content_size=True,
                                        write_checksum=False, threads=0)
        _local.compressor = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = zstandard.ZstdDecompressor()
        _local.decompressor = dec
    return dec


def compress(raw: bytes | memoryview) -> bytes:
    """The deterministic zstd frame for one chunk."""
    return _compressor().compress(raw)


def compress_spans(data: bytes | bytearray | memoryview, spans: Sequence[tuple[int, int]],
                   threads: int) -> list[memoryview]:
    """The frames of the chunks at ``spans`` (offset, length) of ``data``, each exactly :func:`compress`'s.

    One call into zstd, which compresses on ``threads`` threads of its own without holding the
    GIL: the frames are the same bytes (the same parameters on a fresh context per chunk; tests
    compare them), made without a Python-level hand-over per chunk.
    """
    if not spans:
        return []
    comp = _compressor()
    if not hasattr(comp, "multi_compress_to_buffer"):  # a zstandard backend without it (cffi)
        return [memoryview(compress(memoryview(data)[o:o + n])) for o, n in spans]
    segments = array("Q", [v for span in spans for v in span]).tobytes()
    out = comp.multi_compress_to_buffer(zstandard.BufferWithSegments(data, segments), threads=max(1, threads))
    return [memoryview(out[i]) for i in range(len(out))]


def declared_size(frame: bytes | memoryview) -> int | None:
    """The content size a frame declares, when it is one a chunk can have (1 byte to the CDC maximum)."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return None
    return size if 0 < size <= MAX_SIZE else None


def decompress_frame(frame: bytes | memoryview, size: int) -> bytes | None:
    """The ``size`` bytes one frame holds, or None when it is not exactly one frame declaring that size.

    Never allocates more than ``size`` bytes, whatever the frame claims.
    """
    try:
        if zstandard.frame_content_size(frame) != size:
            return None
        raw = _decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError:
        return None
    return raw if len(raw) == size else None
