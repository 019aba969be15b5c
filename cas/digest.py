"""BLAKE3 digests in the label form ``blake3:<64 lowercase hex>`` used everywhere."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import blake3

PREFIX = "blake3:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
READ_SIZE = 1 << 20


class DigestError(ValueError):
    """A digest string that is not ``blake3:<64 hex>``."""


def label(hex_digest: str) -> str:
    return PREFIX + hex_digest


def parse(value: str) -> str:
    """Return the lowercase hex of a digest label; accepts upper case and a bare hex."""
    text = value.strip()
    if text[: len(PREFIX)].lower() == PREFIX:
        text = text[len(PREFIX):]
    text = text.lower()
    if not _HEX64.match(text):
        raise DigestError(f"not a BLAKE3 digest: {value!r} (expected blake3:<64 hex>)")
    return text


def is_label(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX) and bool(_HEX64.match(value[len(PREFIX):]))


def blake3_bytes(data: bytes | memoryview) -> str:
    """Hex BLAKE3 of ``data``."""
    return blake3.blake3(data).hexdigest()


def blake3_file(path: str | Path) -> str:
    """Hex BLAKE3 of a file's bytes, streamed (multi-threaded for large files)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size > (8 << 20) else 1)
        while chunk := fh.read(READ_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_SIZE):
            h.update(chunk)
    return h.hexdigest()


def write_hashed(out: Path, pieces: Iterable[bytes | memoryview]) -> tuple[str, str, int]:
    """Stream ``pieces`` into ``out`` (fsynced) while hashing: (sha256 hex, blake3 hex, size).

    For downloads and spliced artifacts, which are checked against both published digests.
    On any error ``out`` is removed.
    """
    sha, b3, size = hashlib.sha256(), blake3.blake3(), 0
    try:
        with open(out, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
                sha.update(piece)
                b3.update(piece)
                size += len(piece)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    return sha.hexdigest(), b3.hexdigest(), size
