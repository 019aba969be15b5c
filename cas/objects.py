"""The one-file-per-chunk layout of earlier versions: still read, and moved into a pack by gc.

Layout ``<root>/objects/blake3/<hh>/<hh>/<hex>.zst``, each file one zstd frame of a chunk keyed by
the BLAKE3 of its raw bytes (every read re-verifies it). The store now keeps chunks in pack files
(:mod:`cas.packs`); nothing writes this layout any more but ``put``, which tests use to make a
store as an earlier ato left it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import blake3

from cas.atomic import write_bytes_atomic
from cas.digest import parse
from cas.frames import ChunkError, compress, declared_size, decompress_frame

# The one frame format and error type of the store (cas.frames); these names stay for callers.
ObjectError = ChunkError


class ObjectStore:
    """A directory of content-addressed chunk objects."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects" / "blake3"
        self.tmp = self.root / "tmp"  # every temp file of the store, so a sweep lists one directory

    def path(self, hex_digest: str) -> Path:
        h = parse(hex_digest)
        return self.objects / h[:2] / h[2:4] / f"{h}.zst"

    def has(self, hex_digest: str) -> bool:
        return self.path(hex_digest).is_file()

    def put_frame(self, hex_digest: str, frame: bytes) -> bool:
        """Store a frame the caller has checked; True when newly inserted.

        An existing object is kept (first writer wins); one that fails verification
        is replaced, so a damaged store heals on the next write of that chunk.
        """
        target = self.path(hex_digest)
        if target.exists():
            try:
                self.read_frame(hex_digest)
                return False
            except ObjectError:
                write_bytes_atomic(target, frame, temp_dir=self.tmp)
                return True
        return write_bytes_atomic(target, frame, no_clobber=True, temp_dir=self.tmp)

    def put(self, raw: bytes | memoryview) -> tuple[str, bytes, bool]:
        """Hash, compress and store raw bytes: ``(hex, frame, inserted)``.

        When the chunk is already stored (and verifies) its frame is reused, which
        is cheaper than compressing again and keeps the bytes identical.
        """
        hex_digest = blake3.blake3(raw).hexdigest()
        if self.path(hex_digest).exists():
            with contextlib.suppress(ObjectError):
                return hex_digest, self.read_frame(hex_digest, len(raw)), False
        frame = compress(raw)
        inserted = self.put_frame(hex_digest, frame)
        return hex_digest, frame, inserted

    def read_frame(self, hex_digest: str, expected_size: int | None = None) -> bytes:
        """The stored frame, after checking that it decodes to the named bytes."""
        frame = self._read(hex_digest)
        self._check(hex_digest, frame, expected_size)
        return frame

    def get(self, hex_digest: str, expected_size: int | None = None) -> bytes:
        """The raw chunk bytes, verified against their name."""
        frame = self._read(hex_digest)
        return self._check(hex_digest, frame, expected_size)

    def _read(self, hex_digest: str) -> bytes:
        try:
            return self.path(hex_digest).read_bytes()
        except FileNotFoundError:
            raise ObjectError("missing", hex_digest, f"CAS object missing: blake3:{hex_digest}") from None

    def _check(self, hex_digest: str, frame: bytes, expected_size: int | None) -> bytes:
        size = expected_size if expected_size is not None else declared_size(frame)
        raw = decompress_frame(frame, size) if size is not None else None
        if raw is None:
            raise ObjectError("corrupt", hex_digest, f"CAS object blake3:{hex_digest} is not one zstd frame of "
                                                     f"{size if size is not None else 'a chunk'}'s size")
        if blake3.blake3(raw).hexdigest() != hex_digest:
            raise ObjectError("corrupt", hex_digest, f"CAS object blake3:{hex_digest} content does not match its digest")
        return raw

    def iter_hexes(self) -> Iterator[str]:
        if not self.objects.is_dir():
            return
        for a in sorted(self.objects.iterdir()):
            if not a.is_dir():
                continue
            for b in sorted(a.iterdir()):
                if not b.is_dir():
                    continue
                for f in sorted(b.iterdir()):
                    if f.name.endswith(".zst") and not f.name.startswith("."):
                        yield f.name[:-4]

    def remove(self, hex_digest: str) -> int:
        """Delete one object; returns the bytes freed (0 if it was not there)."""
        p = self.path(hex_digest)
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0
