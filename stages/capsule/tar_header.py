"""Tar headers written byte for byte here, not by ``tarfile``.

Two reasons: ``tarfile``'s output for the same member has changed between Python
releases (device fields, PAX details), which would break "same inputs, same bytes
on any machine"; and building ten thousand headers through ``TarInfo`` is a large
part of a build's time. The format is POSIX ustar, with a PAX extended header
(``././@PaxHeader``, like Python's) only for names, link targets or sizes that
ustar cannot hold. GNU tar and Python's tarfile read it.
"""

from __future__ import annotations

BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK
REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
_PAX = b"x"
_MAGIC = b"ustar\x0000"
_MAX_OCTAL_11 = 8**11 - 1


def _octal(value: int, width: int) -> bytes:
    """``width-1`` zero-padded octal digits and a NUL, as ustar numeric fields are written."""
    return b"%0*o" % (width - 1, value) + b"\0"


def _field(text: bytes, width: int) -> bytes:
    return text + b"\0" * (width - len(text))


def _ustar(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes) -> bytes:
    head = (_field(name, 100) + _octal(mode, 8) + _octal(0, 8) + _octal(0, 8) + _octal(size, 12)
            + _octal(mtime, 12))
    tail = typeflag + _field(linkname, 100) + _MAGIC + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    checksum = sum(head) + sum(tail) + 8 * ord(" ")
    return head + b"%06o\0 " % checksum + tail


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def header(name: str, *, size: int = 0, mode: int = 0o644, mtime: int = 0, symlink_to: str | None = None,
           typeflag: bytes | None = None, linkname: str | None = None) -> bytes:
    """The header block(s) for one regular file or symlink member.

    ``typeflag``/``linkname`` write any other entry type (a hard link, a directory, a device):
    the builder never does, but tests build hostile payloads with them.
    """
    if typeflag is None:
        typeflag = SYMLINK if symlink_to is not None else REGULAR
    if linkname is None:
        linkname = symlink_to
    raw_name = name.encode("utf-8")
    raw_link = (linkname or "").encode("utf-8")
    records = b""
    if len(raw_name) > 100 or not name.isascii():
        records += _pax_record("path", name)
        raw_name = raw_name[:100].decode("utf-8", "ignore").encode("ascii", "replace")
    if len(raw_link) > 100 or not (linkname or "").isascii():
        records += _pax_record("linkpath", linkname or "")
        raw_link = raw_link[:100].decode("utf-8", "ignore").encode("ascii", "replace")
    if size > _MAX_OCTAL_11:
        records += _pax_record("size", str(size))
    out = b""
    if records:
        out += _ustar(b"././@PaxHeader", 0o644, len(records), mtime, _PAX, b"")
        out += records + b"\0" * ((-len(records)) % BLOCK)
    return out + _ustar(raw_name, mode, 0 if size > _MAX_OCTAL_11 else size, mtime, typeflag, raw_link)


def padding(size: int) -> bytes:
    """Zero bytes that round a member's data up to a whole block."""
    return b"\0" * ((-size) % BLOCK)
