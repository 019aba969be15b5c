"""Unpack a ``.capsule`` payload for running: verified first, extracted safely, once per digest.

The payload tar comes from someone else, so every member is checked before it
touches the disk: no absolute paths, no ``..``, no device/fifo/hardlink members,
and no symlink whose target leaves the extraction dir. Extraction happens in a
temp dir that is renamed into ``$ATO_HOME/unpacked/<manifest-hash>`` only when
complete, so a crash never leaves a half-extracted tree that a later run trusts.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path

import zstandard

from cas.digest import parse
from cas.tempfiles import temp_name
from pipeline import paths
from pipeline.errors import E_INTEGRITY, AtoError
from stages.artifact import open_capsule, toml_bytes, verify_capsule

COMPLETE = ".ato-unpacked"


def _unsafe(message: str, member: str) -> AtoError:
    return AtoError(E_INTEGRITY, f"refusing to unpack payload member {member!r}: {message}",
                    details={"member": member})


def check_member(info: tarfile.TarInfo) -> str:
    """The normalized relative path of a safe member; raise for anything that could escape."""
    name = info.name
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise _unsafe("absolute path", name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _unsafe("path escapes the extraction dir", name)
    rel = "/".join(parts)
    if info.issym():
        target = info.linkname
        if not target or target.startswith("/"):
            raise _unsafe(f"symlink to absolute path {target!r}", name)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if joined == ".." or joined.startswith("../") or joined.startswith("/"):
            raise _unsafe(f"symlink {target!r} points outside the extraction dir", name)
    elif not (info.isfile() or info.isdir()):
        raise _unsafe("only regular files, directories and contained symlinks are allowed", name)
    return rel


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def extract_payload(tar_stream: io.BufferedIOBase, dest: Path) -> int:
    """Extract a payload tar stream into ``dest`` (which must be empty); returns the file count."""
    count = 0
    with tarfile.open(fileobj=tar_stream, mode="r|") as tf:
        for info in tf:
            rel = check_member(info)
            out = dest / rel
            # A member must not be written through a symlink an earlier member created.
            if not _inside(dest, out.parent):
                raise _unsafe("parent directory is a symlink leaving the extraction dir", info.name)
            if info.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.is_symlink() or out.exists():
                raise _unsafe("duplicate member", info.name)
            if info.issym():
                os.symlink(info.linkname, out)
                continue
            src = tf.extractfile(info)
            assert src is not None
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if info.mode & 0o111
                         else 0o644)
            with os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(src, fh, 1 << 20)
            count += 1
    return count


def unpack_capsule(artifact: Path) -> tuple[Path, dict]:
    """Verify ``artifact`` and return (its unpacked project dir, the verification summary)."""
    summary = verify_capsule(artifact)
    opened = open_capsule(artifact)
    key = parse(summary["manifest_hash"])
    dest = paths.unpacked_dir() / key
    if (dest / COMPLETE).is_file():
        return dest, summary
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / temp_name(key[:16])
    os.mkdir(tmp, 0o700)
    try:
        with open(artifact, "rb") as fh:
            fh.seek(opened.payload_offset)
            compressed = fh.read(opened.payload_size)
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True)
        try:
            extract_payload(reader, tmp)  # type: ignore[arg-type]
        except (tarfile.TarError, zstandard.ZstdError) as exc:
            raise AtoError(E_INTEGRITY, f"{artifact.name}: payload does not unpack: {exc}") from None
        # The artifact's own manifest and lock are the verified ones; they win over payload copies.
        for name, data in (("capsule.toml", toml_bytes(opened.manifest)),
                           ("capsule.lock.json", json.dumps(opened.lock, indent=2).encode("utf-8"))):
            target = tmp / name
            if target.is_symlink() or target.exists():
                target.unlink()
            target.write_bytes(data)
        (tmp / COMPLETE).write_text(json.dumps({"artifact": str(artifact), **summary}) + "\n", "utf-8")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / COMPLETE).is_file():  # lost a race to a concurrent unpack: theirs is as good
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, summary
