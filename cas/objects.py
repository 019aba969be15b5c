"""CAS objects: zstd frames of raw chunks, keyed by BLAKE3 of the raw bytes.

Layout ``<root>/objects/blake3/<hh>/<hh>/<hex>.zst``. Writes go temp (in ``<root>/tmp``,
named by :mod:`cas.tempfiles`) -> fsync -> no-clobber link, so concurrent writers of the same chunk are safe and a reader
never sees a partial object. Every read re-verifies the BLAKE3 of the raw bytes.
Each object is one self-contained zstd frame with its content size, so the
concatenation of a payload's objects is itself a valid ``payload.tar.zst``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import blake3

from cas.atomic import write_bytes_atomic
from cas.digest import parse
from cas.frames import ChunkError, compress, declared_size, decompress_frame
from cas.stoppoints import stop_point
from cas.tempfiles import temp_path

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

    def write_temp(self, hex_digest: str, frame: bytes) -> Path:
        """First half of a batched put: the frame in a temp file, not yet synced."""
        target = self.path(hex_digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        tmp = temp_path(target, self.tmp)
        try:
            with open(tmp, "xb") as fh:
                fh.write(frame)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half an object behind
            raise
        return tmp

    def publish_temps(self, staged: list[tuple[str, Path]]) -> int:
        """Second half: one filesystem sync for the whole batch, then no-clobber links.

        Syncing once instead of once per object keeps a build of thousands of chunks
        fast while keeping the rule that no object becomes visible before its bytes
        are on disk. Returns the number of objects newly inserted.
        """
        inserted = 0
        stop_point("cas.publish-temps")  # crash tests: frames in temp files, none linked yet
        try:
            if staged:
                os.sync()
            for hex_digest, tmp in staged:
                try:
                    os.link(tmp, self.path(hex_digest))
                    inserted += 1
                except FileExistsError:
                    pass
            if staged:
                os.sync()
        finally:
            for _hex, tmp in staged:
                tmp.unlink(missing_ok=True)
        return inserted

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
