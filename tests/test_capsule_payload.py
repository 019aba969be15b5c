"""zstd frame walking, payload splitting, the payload scan and tar-entry safety (stages.capsule)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import blake3
import pytest
import zstandard

from cas.objects import compress
from pipeline.manifest import SIDECAR_NAME
from stages.capsule import NO_CEILING, read_capsule, verify
from stages.capsule import payload as fr
from stages.capsule import verifier as verify_module
from stages.capsule.entries import TreeModel, UnsafeEntry
from stages.capsule.payload_tar import Entry
from tests.e2e.registry_support import forge_capsule


def test_read_frame_walks_blocks_checksums_and_concatenations() -> None:
    parts = [os.urandom(250_000), b"a" * 200_000, b"xyz" * 1000, b"q"]
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


def test_no_frame_may_decode_to_more_than_one_chunk() -> None:
    big = b"\0" * (fr.MAX_CHUNK + 1)
    with pytest.raises(fr.FrameError, match="chunk ceiling"):
        fr.check_frame(compress(big), blake3.blake3(big).hexdigest(), len(big))


def test_check_frame_refuses_wrong_content_and_missing_size() -> None:
    frame = compress(b"payload bytes")
    with pytest.raises(fr.FrameError, match="expected 99"):
        fr.check_frame(frame, blake3.blake3(b"payload bytes").hexdigest(), 99)
    with pytest.raises(fr.FrameError, match="does not decode to chunk"):
        fr.check_frame(frame, "0" * 64, len(b"payload bytes"))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"payload bytes")
    with pytest.raises(fr.FrameError, match="content size"):
        fr.check_frame(no_size, blake3.blake3(b"payload bytes").hexdigest(), len(b"payload bytes"))


def _entry(name: str, kind: str = "file", link: str = "") -> Entry:
    return Entry(name, kind, 0, 0o644, link)


def _add_all(*entries: Entry) -> None:
    model = TreeModel()
    for e in entries:
        model.add(e)
    model.finish()


@pytest.mark.parametrize("entries", [
    [_entry("../x")], [_entry("/abs")], [_entry("a/../../b")], [_entry("a\\b")], [_entry("C:/x")], [_entry("")],
    [_entry("ok/link", "symlink", "../../out")], [_entry("ok/link", "symlink", "/etc/passwd")],
    [_entry("hard", "hardlink", "x")], [_entry("dev", "character device")], [_entry("fifo", "FIFO")],
    [_entry("a"), _entry("a")],
    [_entry("a/b/l", "symlink", "../.."), _entry("esc", "symlink", "a/b/l/../../../x")],
    [_entry("d", "symlink", "."), _entry("x", "symlink", "d/../out")],
    [_entry("l", "symlink", "sub"), _entry("l/f")],
])
def test_unsafe_tar_entries_are_refused(entries: list[Entry]) -> None:
    with pytest.raises(UnsafeEntry):
        _add_all(*entries)


@pytest.mark.parametrize("entries", [
    [_entry("a/b.txt")], [_entry("./a.txt")], [_entry("dir", "directory")], [_entry("a/b/link", "symlink", "../c")],
    [_entry("a..b/c..d")], [_entry("f"), _entry("h", "hardlink", "f")],
    [_entry("a/b/l", "symlink", "../.."), _entry("in", "symlink", "a/b/l/a")],
])
def test_safe_tar_entries_pass(entries: list[Entry]) -> None:
    _add_all(*entries)


def test_split_payload_layout_matches_build_layout(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "x-1.0.0.capsule", "x", "1.0.0",
                        members=[("a.bin", os.urandom(300_000)), ("b.txt", b"b" * 90_000)])
    verdict = verify(art, NO_CEILING).require()
    capsule, scan = verdict.capsule, verdict.scan
    assert scan.frames is not None and scan.entries == 2
    assert [f.raw_hash for f in scan.frames] == [c.raw_hash for c in capsule.payload_manifest.chunks]
    with open(art, "rb") as fh:
        seen = [(ref, off) for ref, _frame, off in fr.stream_frames(fh, capsule.payload_offset, scan.frames)]
    assert seen[0][1] == capsule.payload_offset
    data = art.read_bytes()
    for ref, off in seen:
        frame = data[off:off + ref.frame_size]
        assert blake3.blake3(frame).hexdigest() == ref.frame_blake3
    assert sum(f.frame_size for f in scan.frames) == capsule.payload_size
    assert fr.FrameRef.from_json(scan.frames[0].to_json()) == scan.frames[0]


def test_single_frame_payload_is_valid_but_not_spliceable(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "y-1.0.0.capsule", "y", "1.0.0", members=[("a.bin", os.urandom(300_000))],
                        single_frame=True)
    verdict = verify(art, NO_CEILING).require()
    assert len(verdict.capsule.payload_manifest.chunks) > 1
    assert verdict.scan.frames is None and verdict.scan.entries == 1 and "frame" in (verdict.scan.reason or "")


def test_unsafe_entry_is_found_whatever_the_frame_layout(tmp_path: Path) -> None:
    for single in (False, True):
        art = forge_capsule(tmp_path / f"z{single}.capsule", "z", "1.0.0",
                            members=[("a.bin", os.urandom(200_000)), ("../evil", b"x")], single_frame=single)
        err = verify(art, NO_CEILING).error
        assert err is not None and err.code == "E208" and "'..' component" in err.message
        assert err.details["reason"] == "unsafe_entry"


def test_scan_hashes_the_payload_member_and_captures_the_delivery_sidecar(tmp_path: Path) -> None:
    sidecar = b'schema_version = "0.1"\n'
    for single in (False, True):
        art = forge_capsule(tmp_path / f"s{single}.capsule", "s", "1.0.0", single_frame=single,
                            members=[("a.bin", os.urandom(200_000)), (SIDECAR_NAME, sidecar),
                                     ("sub/ato.delivery.toml", b"not the root one")])
        capsule = read_capsule(art)
        scan = verify(art, NO_CEILING).require().scan
        payload = art.read_bytes()[capsule.payload_offset:capsule.payload_offset + capsule.payload_size]
        assert scan.payload_hash == blake3.blake3(payload).hexdigest()
        assert scan.sidecars == {SIDECAR_NAME: sidecar}
        assert scan.entries == 3
        assert (scan.frames is None) is single


def test_verdict_is_one_pass_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second caller gets the first pass's verdict; any write to the file makes the next caller decode again,
    even a same-size write within the same clock tick."""
    art = forge_capsule(tmp_path / "m-1.0.0.capsule", "m", "1.0.0", members=[("a.bin", os.urandom(200_000))])
    passes = []
    real = verify_module._verify_file
    monkeypatch.setattr(verify_module, "_verify_file", lambda *a, **k: passes.append(1) or real(*a, **k))
    first = verify(art, NO_CEILING)
    assert verify(art, NO_CEILING) is first and first.ok and len(passes) == 1
    offset = read_capsule(art).payload_offset
    data = bytearray(art.read_bytes())
    data[offset + 100] ^= 0xFF  # same size, same path, different bytes
    with open(art, "r+b") as fh:
        fh.write(data)
    err = verify(art, NO_CEILING).error
    assert err is not None and "does not match its digest" in err.message
    assert len(passes) == 2


def test_a_corrupt_chunk_and_an_unsafe_entry_give_one_verdict_whatever_the_frames(tmp_path: Path) -> None:
    messages = set()
    for single in (False, True):
        art = forge_capsule(tmp_path / f"c{single}.capsule", "c", "1.0.0", single_frame=single,
                            members=[("../evil", b"x"), ("a.bin", os.urandom(300_000))])
        messages.add(verify(art, NO_CEILING).error.message.split(": ", 1)[1])
    assert len(messages) == 1, messages


def test_a_frame_longer_than_one_chunk_is_refused_while_it_is_read() -> None:
    """read_frame stops at MAX_FRAME instead of collecting a long run of blocks into memory."""
    header = fr.ZSTD_MAGIC + bytes([0x00, 0x70])  # no content size, one window-descriptor byte
    raw_block = (16384 << 3).to_bytes(3, "little") + b"\0" * 16384  # a raw block, not the last one
    stream = io.BytesIO(header + raw_block * 40)
    with pytest.raises(fr.FrameError, match="longer than"):
        fr.read_frame(stream)
    assert stream.tell() < fr.MAX_FRAME + 20_000


def _frames_of(parts: list[bytes]) -> tuple[list[bytes], object]:
    from cas.payload_manifest import ChunkRef, PayloadManifest
    return [compress(p) for p in parts], PayloadManifest([ChunkRef(blake3.blake3(p).hexdigest(), len(p)) for p in parts])


def test_frames_are_decoded_in_batches_and_a_bad_one_is_named_after_the_good_ones_before_it() -> None:
    """iter_frames decodes FRAME_BATCH frames per call; a frame in the middle of a batch that is not its
    chunk is refused by its own index, after every good frame before it was yielded (the order a
    frame-by-frame pass gives), and every raw chunk is the right one."""
    parts = [os.urandom(3000) + bytes([i]) * 5000 for i in range(2 * fr.FRAME_BATCH + 7)]
    frames, manifest = _frames_of(parts)
    bad = fr.FRAME_BATCH + 5
    frames[bad] = compress(parts[bad][:-1] + b"\x00")  # same size, other bytes: decodes, to the wrong chunk
    seen: list[bytes] = []
    with pytest.raises(fr.NotSpliceable, match=f"payload frame {bad} "):
        for _ref, _frame, raw in fr.iter_frames(io.BytesIO(b"".join(frames)), manifest, blake3.blake3()):
            seen.append(bytes(raw))
    assert seen == parts[:bad]
    frames[bad] = compress(parts[bad])
    hasher = blake3.blake3()
    out = [bytes(raw) for _r, _f, raw in fr.iter_frames(io.BytesIO(b"".join(frames)), manifest, hasher)]
    assert out == parts and hasher.hexdigest() == blake3.blake3(b"".join(frames)).hexdigest()
    frames[bad] = frames[bad][:-3] + b"\xff\xff\xff"  # a frame whose last block does not decode
    with pytest.raises(fr.NotSpliceable, match=f"payload frame {bad} "):
        list(fr.iter_frames(io.BytesIO(b"".join(frames)), manifest, blake3.blake3()))


def test_a_refused_or_abandoned_scan_leaves_no_thread_behind() -> None:
    """The scan's thread ends with the scan, whether it was refused by the walk, by a frame, or abandoned
    while it waited for bytes (a long-lived registry must not collect threads)."""
    import threading
    import time

    from stages.capsule.errors import CapsuleError

    parts = [os.urandom(9000) for _ in range(2 * fr.FRAME_BATCH + 8)]
    frames, manifest = _frames_of(parts)
    data = b"".join(frames)
    first = len(b"".join(frames[:fr.FRAME_BATCH + 3]))  # more than a batch: the walk sees the first chunk

    def threads() -> int:
        return sum(t.name == "payload-scan" for t in threading.enumerate())

    walked = fr.PayloadScanner(manifest)  # the frames are the chunks; their bytes are not a tar
    walked.feed(data[:first])  # refused while the rest has not come
    assert walked._done.wait(30)
    with pytest.raises(CapsuleError):
        walked.finish()
    abandoned = fr.PayloadScanner(manifest)
    abandoned.feed(data[:len(data) // 2])
    abandoned.close()
    refused = fr.PayloadScanner(manifest, frames=[])
    refused.feed(data)
    with pytest.raises(CapsuleError, match="published frame"):
        refused.finish()
    deadline = time.monotonic() + 30
    while threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threads() == 0
