"""zstd frame walking, payload splitting and tar-entry safety (stages.payload_frames)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard

from cas.objects import compress
from pipeline.manifest import SIDECAR_NAME
from stages import payload_frames as fr
from stages.artifact import open_capsule
from tests.e2e.registry_support import forge_capsule


def test_read_frame_walks_blocks_checksums_and_concatenations() -> None:
    parts = [os.urandom(300_000), b"a" * 200_000, b"xyz" * 1000, b"q"]
    encoded = [compress(parts[0]), compress(parts[1]),
               zstandard.ZstdCompressor(write_checksum=True).compress(parts[2]),
               zstandard.ZstdCompressor(write_content_size=True).compress(parts[3])]
    stream = io.BytesIO(b"".join(encoded))
    for raw, enc in zip(parts, encoded, strict=True):
        frame = fr.read_frame(stream)
        assert frame == enc
        assert fr.check_frame(frame, blake3.blake3(raw).hexdigest(), len(raw)) == raw
    assert fr.read_frame(stream) is None


@pytest.mark.parametrize("data, message", [
    (b"\x00\x01\x02\x03\x04", "bad magic"),
    (compress(b"hello world" * 100)[:-3], "truncated"),
    (fr.ZSTD_MAGIC + b"\x08", "reserved bit"),
])
def test_read_frame_refuses_malformed_frames(data: bytes, message: str) -> None:
    with pytest.raises(fr.FrameError, match=message):
        fr.read_frame(io.BytesIO(data))


def test_check_frame_refuses_wrong_content_and_missing_size() -> None:
    frame = compress(b"payload bytes")
    with pytest.raises(fr.FrameError, match="expected 99"):
        fr.check_frame(frame, blake3.blake3(b"payload bytes").hexdigest(), 99)
    with pytest.raises(fr.FrameError, match="does not decode to chunk"):
        fr.check_frame(frame, "0" * 64, len(b"payload bytes"))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"payload bytes")
    with pytest.raises(fr.FrameError, match="content size"):
        fr.check_frame(no_size, blake3.blake3(b"payload bytes").hexdigest(), len(b"payload bytes"))


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("info", [
    _info("../x"), _info("/abs"), _info("a/../../b"), _info("a\\b"), _info("C:/x"), _info(""),
    _info("ok/link", tarfile.SYMTYPE, "../../out"), _info("ok/link", tarfile.SYMTYPE, "/etc/passwd"),
    _info("hard", tarfile.LNKTYPE, "x"), _info("dev", tarfile.CHRTYPE), _info("fifo", tarfile.FIFOTYPE),
])
def test_unsafe_tar_entries_are_refused(info: tarfile.TarInfo) -> None:
    with pytest.raises(fr.UnsafePayload):
        fr.check_tar_member(info)


@pytest.mark.parametrize("info", [
    _info("a/b.txt"), _info("./a.txt"), _info("dir", tarfile.DIRTYPE), _info("a/b/link", tarfile.SYMTYPE, "../c"),
    _info("a..b/c..d"),
])
def test_safe_tar_entries_pass(info: tarfile.TarInfo) -> None:
    fr.check_tar_member(info)


def test_split_payload_layout_matches_build_layout(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "x-1.0.0.capsule", "x", "1.0.0",
                        members=[("a.bin", os.urandom(300_000)), ("b.txt", b"b" * 90_000)])
    opened = open_capsule(art)
    seen = []
    layout = fr.split_payload(str(art), opened.payload_offset, opened.payload_size, opened.payload_manifest,
                              lambda ref, frame, off: seen.append((ref, off)))
    assert layout.frames is not None and layout.entries == 2
    assert [f.raw_hash for f in layout.frames] == [c.raw_hash for c in opened.payload_manifest.chunks]
    assert seen[0][1] == opened.payload_offset
    data = art.read_bytes()
    for ref, off in seen:
        frame = data[off:off + ref.frame_size]
        assert blake3.blake3(frame).hexdigest() == ref.frame_blake3
    assert sum(f.frame_size for f in layout.frames) == opened.payload_size
    assert fr.FrameRef.from_json(layout.frames[0].to_json()) == layout.frames[0]


def test_single_frame_payload_is_valid_but_not_spliceable(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "y-1.0.0.capsule", "y", "1.0.0", members=[("a.bin", os.urandom(300_000))],
                        single_frame=True)
    opened = open_capsule(art)
    assert len(opened.payload_manifest.chunks) > 1
    layout = fr.split_payload(str(art), opened.payload_offset, opened.payload_size, opened.payload_manifest)
    assert layout.frames is None and layout.entries == 1 and "frame" in (layout.reason or "")


def test_unsafe_entry_is_found_whatever_the_frame_layout(tmp_path: Path) -> None:
    for single in (False, True):
        art = forge_capsule(tmp_path / f"z{single}.capsule", "z", "1.0.0",
                            members=[("a.bin", os.urandom(200_000)), ("../evil", b"x")], single_frame=single)
        opened = open_capsule(art)
        with pytest.raises(fr.UnsafePayload, match="climbs out"):
            fr.split_payload(str(art), opened.payload_offset, opened.payload_size, opened.payload_manifest)


def _scan(art: Path) -> fr.PayloadScan:
    opened = open_capsule(art)
    return fr.scan_payload(art, opened.payload_offset, opened.payload_size, opened.payload_manifest)


def test_scan_hashes_the_payload_member_and_captures_the_delivery_sidecar(tmp_path: Path) -> None:
    sidecar = b'schema_version = "0.1"\n'
    for single in (False, True):
        art = forge_capsule(tmp_path / f"s{single}.capsule", "s", "1.0.0", single_frame=single,
                            members=[("a.bin", os.urandom(200_000)), (SIDECAR_NAME, sidecar),
                                     ("sub/ato.delivery.toml", b"not the root one")])
        opened = open_capsule(art)
        scan = _scan(art)
        payload = art.read_bytes()[opened.payload_offset:opened.payload_offset + opened.payload_size]
        assert scan.payload_hash == blake3.blake3(payload).hexdigest()
        assert scan.sidecars == {SIDECAR_NAME: sidecar}
        assert scan.entries == 3 and scan.unsafe is None
        assert (scan.frames is None) is single


def test_scan_is_one_pass_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second caller gets the first pass's facts; any write to the file makes the next caller decode again."""
    art = forge_capsule(tmp_path / "m-1.0.0.capsule", "m", "1.0.0", members=[("a.bin", os.urandom(200_000))])
    passes = []
    real = fr._scan_pass
    monkeypatch.setattr(fr, "_scan_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    first = _scan(art)
    assert _scan(art) is first and len(passes) == 1
    opened = open_capsule(art)
    data = bytearray(art.read_bytes())
    data[opened.payload_offset + 100] ^= 0xFF  # same size, same path, different bytes
    with open(art, "r+b") as fh:
        fh.write(data)
    with pytest.raises(fr.PayloadCorrupt, match="does not match its digest"):
        _scan(art)
    assert len(passes) == 3  # the frame pass found a bad frame, the layout-agnostic pass named the chunk


def test_scan_records_an_unsafe_entry_but_still_checks_every_chunk(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "u.capsule", "u", "1.0.0", members=[("../evil", b"x"), ("a.bin", os.urandom(9))])
    scan = _scan(art)
    assert scan.unsafe is not None and "climbs out" in scan.unsafe
    assert scan.frames is not None


def test_install_refuses_an_artifact_whose_payload_is_unsafe(tmp_path: Path) -> None:
    """The install's verifying pass refuses ``..`` entries even when every digest is right."""
    from pipeline.errors import AtoError
    from stages import install

    art = forge_capsule(tmp_path / "e-1.0.0.capsule", "e", "1.0.0", members=[("../evil", b"x")])
    with pytest.raises(AtoError, match="unsafe.*climbs out"):
        install._check_frames(art, None)
    safe = forge_capsule(tmp_path / "f-1.0.0.capsule", "f", "1.0.0", members=[("ok.txt", b"x")])
    install._check_frames(safe, None)
