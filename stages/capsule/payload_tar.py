"""The payload tar read as a stream, with every header bounded: the one tar reader for payloads.

``tarfile`` reads a PAX or GNU long-name header of any declared size into memory, so a few KB
of compressed payload could make a reader allocate hundreds of MB. This reader takes the
subset of tar that payload writers produce — POSIX ustar (with its 155-byte prefix), PAX
``x``/``g`` extended headers, GNU ``L``/``K`` long names, v7 — and refuses everything else:
a bad checksum, a number it cannot read, an extended header over :data:`MAX_EXTENDED`, a
non-UTF-8 name, data after a non-file header, a truncated entry, or anything but zero bytes
after the end-of-archive marker. Which entries are *safe* is not decided here but by
:mod:`stages.capsule.entries`; this module only says what the bytes claim.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

BLOCK = 512
MAX_EXTENDED = 64 * 1024  # a PAX or GNU long-name header: far above any real path
_COPY = 1 << 20

KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink", b"5": "directory",
         b"3": "character device", b"4": "block device", b"6": "FIFO", b"S": "sparse file",
         b"D": "GNU dump directory", b"V": "volume label", b"M": "multi-volume continuation"}


class TarFormatError(ValueError):
    """Bytes that are not a payload tar this reader accepts."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file | hardlink | symlink | directory | character device | ... (see KINDS)
    size: int  # data bytes that follow (only files carry data)
    mode: int
    linkname: str


def _number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256, positive
        return int.from_bytes(field[1:], "big")
    if field[:1] and field[0] & 0x80:
        raise TarFormatError(f"tar header holds a negative {what}")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"tar header {what} {text[:20]!r} is not an octal number") from None


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156], "checksum")
    except TarFormatError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:  # the usual case: sum() over bytes runs in C (a byte-by-byte generator cost 80 µs a header)
        return True
    high = sum(1 for b in block[:148] + block[156:] if b > 127)  # old writers summed signed chars
    return stored == unsigned - 256 * high


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError(f"payload {what} {raw[:80]!r} is not UTF-8") from None


def _cstring(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records; every length must be exact."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:] == b"\0" * (len(data) - pos):
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise TarFormatError("malformed PAX record (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("malformed PAX record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarFormatError("malformed PAX record (length does not match)")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise TarFormatError("malformed PAX record (no '=')")
        out[_text(key, "PAX key")] = _text(value, "PAX value")
        pos = end
    return out


class TarReader:
    """Iterate the entries of a tar stream; a file entry's data is read with :meth:`data` or skipped."""

    def __init__(self, stream: Readable) -> None:
        self.stream = stream
        self.entries = 0
        self._left = 0  # data bytes of the current entry not yet consumed
        self._pad = 0
        self._scratch: memoryview | None = None

    def _read(self, n: int) -> bytes:
        parts = []
        want = n
        while want > 0:
            data = self.stream.read(min(want, _COPY))
            if not data:
                raise TarFormatError("the payload tar is truncated (it ends inside an entry)")
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        """Pass over ``n`` bytes (data nobody reads, padding) without keeping or joining them."""
        readinto = getattr(self.stream, "readinto", None)
        if readinto is None:
            while n > 0:
                n -= len(self._read(min(n, _COPY)))
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_COPY))
        while n > 0:
            got = readinto(self._scratch[:min(n, _COPY)])
            if not got:
                raise TarFormatError("the payload tar is truncated (it ends inside an entry)")
            n -= got

    def data(self) -> Iterator[bytes]:
        """The current file entry's data, in pieces (call at most once per entry)."""
        while self._left > 0:
            piece = self._read(min(self._left, _COPY))
            self._left -= len(piece)
            yield piece

    def _finish_entry(self) -> None:
        self._skip(self._left + self._pad)  # what padding holds means nothing to tar; its chunk is hashed anyway
        self._left = self._pad = 0

    def _block(self) -> bytes:
        """The next header block; shorter only at the end of the stream."""
        block = b""
        while len(block) < BLOCK:
            data = self.stream.read(BLOCK - len(block))
            if not data:
                break
            block += data
        return block

    def _extended(self, size: int, what: str) -> bytes:
        if size > MAX_EXTENDED:
            raise TarFormatError(f"a {what} header of {size} bytes is over the {MAX_EXTENDED}-byte limit")
        data = self._read(size)
        self._skip((-size) % BLOCK)
        return data

    def __iter__(self) -> Iterator[Entry]:
        pending: dict[str, str] = {}
        while True:
            self._finish_entry()
            block = self._block()
            if len(block) < BLOCK:
                raise TarFormatError("the payload tar is empty or truncated: it ends before its end-of-archive "
                                     "marker")
            if block == b"\0" * BLOCK:
                if pending:
                    raise TarFormatError("the payload tar ends right after an extended header")
                self._trailing_zeros()
                return
            if not _checksum_ok(block):
                what = "is not a tar" if self.entries == 0 and not pending else \
                    f"has a corrupt header after entry {self.entries}"
                raise TarFormatError(f"the payload {what} (header checksum mismatch)")
            typeflag = block[156:157]
            size = _number(block[124:136], "size")
            if typeflag in (b"x", b"g"):
                records = _pax_records(self._extended(size, "PAX"))
                if typeflag == b"x":
                    pending.update({k: v for k, v in records.items() if k in ("path", "linkpath", "size")})
                continue
            if typeflag in (b"L", b"K"):
                value = _text(_cstring(self._extended(size, "GNU long-name")), "GNU long name")
                pending["path" if typeflag == b"L" else "linkpath"] = value
                continue
            kind = KINDS.get(typeflag, f"unknown type {typeflag!r}")
            name_raw = _cstring(block[0:100])
            if block[257:263] == b"ustar\0":
                prefix = _cstring(block[345:500])
                if prefix:
                    name_raw = prefix + b"/" + name_raw
            name = pending.pop("path", None)
            if name is None:
                name = _text(name_raw, "entry name")
            linkname = pending.pop("linkpath", None)
            if linkname is None:
                linkname = _text(_cstring(block[157:257]), "link target")
            if "size" in pending:
                text = pending.pop("size")
                if not text.isdigit() or len(text) > 20:
                    raise TarFormatError(f"PAX size {text[:20]!r} is not a number")
                size = int(text)
            pending.clear()
            mode = _number(block[100:108], "mode")
            if kind != "file" and size:
                raise TarFormatError(f"payload entry {name[:200]!r} ({kind}) carries {size} bytes of data")
            self.entries += 1
            self._left, self._pad = size, (-size) % BLOCK
            yield Entry(name, kind, size, mode, linkname)

    def _trailing_zeros(self) -> None:
        """After the end-of-archive marker only zero bytes may follow (the writer's record padding)."""
        while data := self.stream.read(_COPY):
            if data.count(0) != len(data):
                raise TarFormatError("the payload holds non-zero bytes after the tar's end-of-archive marker")
