"""The verifier's streaming entry (:func:`stages.capsule.verify_stream`): the same bytes get the same
verdict and the same code as :func:`stages.capsule.verify` of the file, however the stream is split; a
stream that is cut, padded or not the skeleton it was judged by is refused; a placed verdict is
remembered only for the bytes it saw."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pipeline.errors import AtoError
from stages.capsule import placed, read_capsule, verify, verify_skeleton, verify_stream
from stages.capsule.errors import CapsuleError
from tests.e2e.hostile_cases import MAIN, VERSION
from tests.hostile_support import Entry, capsule


def _split(art: Path) -> tuple[bytes, int, bytes]:
    data = art.read_bytes()
    cap = read_capsule(art)
    return data[:cap.payload_offset], cap.payload_size, data[cap.payload_offset + cap.payload_size:]


def _stream(art: Path, out: Path, seed: int, data: bytes | None = None):
    """verify_stream over ``data`` (the file's bytes by default) fed in random pieces, written to ``out``."""
    prefix, size, suffix = _split(art)
    skeleton = verify_skeleton(prefix, size, suffix)
    if not skeleton.ok:
        return skeleton
    data = art.read_bytes() if data is None else data
    rng = random.Random(seed)
    check = verify_stream(skeleton, out)
    try:
        with open(out, "wb") as fh:
            pos = 0
            while pos < len(data):
                n = rng.choice((1, 7, 512, 4096, 65536, 1 << 20))
                fh.write(data[pos:pos + n])
                check.update(data[pos:pos + n])
                pos += n
        return check.finish()
    except AtoError as exc:  # update raised the refusal: finish() reports the same verdict
        verdict = check.finish()
        assert verdict.error is exc
        return verdict
    finally:
        check.close()


def _outcome(verdict) -> tuple:
    err = verdict.error
    return (verdict.ok, err.code if err else None, (err.details or {}).get("reason") if err else None,
            [(c.name, c.status) for c in verdict.checks])


def test_a_stream_gets_the_verdict_and_code_of_the_file(hostile_artifacts: dict[str, Path], tmp_path: Path) -> None:
    good = capsule(tmp_path / "good.capsule", "good", VERSION, [MAIN, Entry("b.bin", os.urandom(200_000))])
    for case, art in {**hostile_artifacts, "good": good}.items():
        try:
            read_capsule(art)
        except CapsuleError:
            continue  # no layout to split into a skeleton: refused before any stream (test_hostile_registry)
        whole = verify(art)
        for seed in range(3):
            streamed = _stream(art, tmp_path / f"{case}-{seed}.capsule", seed)
            assert _outcome(streamed) == _outcome(whole), case
            if whole.ok:
                assert streamed.complete and streamed.artifact_blake3 == whole.artifact_blake3
                assert streamed.size == whole.size and streamed.scan == whole.scan
                assert streamed.path == tmp_path / f"{case}-{seed}.capsule"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return capsule(tmp_path / "good.capsule", "good", VERSION, [MAIN, Entry("b.bin", os.urandom(300_000))])


def test_a_cut_stream_is_truncated(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    cut = _stream(good, tmp_path / "cut.capsule", 1, data[:-700])
    assert cut.error is not None and cut.error.code == "E213" and not cut.ok


def test_bytes_beyond_the_layout_are_refused(good: Path, tmp_path: Path) -> None:
    more = _stream(good, tmp_path / "more.capsule", 2, good.read_bytes() + b"\0" * 512)
    assert more.error is not None and more.error.code == "E208"


def test_a_prefix_other_than_the_judged_one_is_refused(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    data[100] ^= 1  # inside capsule.toml's header: the skeleton judged other bytes
    other = _stream(good, tmp_path / "other.capsule", 3, bytes(data))
    assert other.error is not None and other.error.code == "E208"
    assert "not the ones judged" in other.error.message


def test_a_file_that_differs_from_the_stream_is_not_complete(good: Path, tmp_path: Path) -> None:
    prefix, size, suffix = _split(good)
    out = tmp_path / "short.capsule"
    check = verify_stream(verify_skeleton(prefix, size, suffix), out)
    data = good.read_bytes()
    check.update(data)
    out.write_bytes(data[:-1])  # what reached the disk is not what was verified
    verdict = check.finish()
    assert verdict.error is not None and verdict.error.code == "E213"


def test_a_placed_verdict_is_reused_only_for_the_bytes_it_saw(good: Path, tmp_path: Path) -> None:
    out = tmp_path / "placed.capsule"
    verdict = _stream(good, out, 4)
    assert verdict.ok
    target = tmp_path / "target.capsule"
    os.replace(out, target)
    kept = placed(verdict, target, 0)
    assert kept.path == target and kept.capsule is not None and kept.capsule.path == target
    assert verify(target) is kept
    with open(target, "r+b") as fh:  # same size, same timestamps as far as the clock can tell: bytes differ
        fh.seek(kept.capsule.payload_offset + 20)
        byte = fh.read(1)
        fh.seek(kept.capsule.payload_offset + 20)
        fh.write(bytes([byte[0] ^ 0xFF]))
    again = verify(target)
    assert again is not kept and not again.ok


def test_an_abandoned_stream_stops_its_scan(good: Path, tmp_path: Path) -> None:
    prefix, size, suffix = _split(good)
    check = verify_stream(verify_skeleton(prefix, size, suffix), tmp_path / "x.capsule")
    check.update(good.read_bytes()[:len(prefix) + 1000])
    check.close()
    check.close()


def test_the_manifest_is_parsed_once_and_no_reader_changes_it(good: Path, tmp_path: Path) -> None:
    """Every caller gets the one parse of an artifact's capsule.toml (no copy per caller): so each reader
    of it must leave it as it was."""
    from cas.canonical import canonical_json
    from pipeline.registry.storage import display_manifest
    from stages.capsule.distribution import check, manifest_hash, toml_bytes
    from stages.install import record_facts

    first = read_capsule(good)
    assert read_capsule(good).manifest is first.manifest
    before = canonical_json(first.manifest)
    verdict = _stream(good, tmp_path / "m.capsule", 5)
    assert verdict.ok and verdict.capsule is not None and verdict.capsule.manifest is first.manifest
    assert verify(good).capsule.manifest is first.manifest  # type: ignore[union-attr]
    record_facts(good, first.manifest)
    display_manifest(first.manifest)
    manifest_hash(first.manifest)
    check(first.manifest, first.payload_manifest)
    toml_bytes(first.manifest)
    assert canonical_json(first.manifest) == before


def test_a_frame_other_than_the_published_one_stops_the_stream(good: Path, tmp_path: Path) -> None:
    """With the skeleton's frames named, the first other frame is refused while it streams (E208,
    reason frame_mismatch), before the rest arrives; the right frames give the file's own verdict."""
    from tests.hostile_support import spliced_layout

    layout = spliced_layout(good)
    assert layout is not None
    _manifest, pre, pay, _suf, frames = layout
    prefix, size, suffix = _split(good)
    skeleton = verify_skeleton(prefix, size, suffix)
    data = good.read_bytes()
    right = verify_stream(skeleton, tmp_path / "right.capsule", frames)
    (tmp_path / "right.capsule").write_bytes(data)
    right.update(data)
    assert _outcome(right.finish()) == _outcome(verify(good))
    bad = bytearray(data)
    bad[pre + 40] ^= 0xFF  # inside the first frame
    check = verify_stream(skeleton, tmp_path / "bad.capsule", frames)
    with pytest.raises(AtoError) as refused:
        for i in range(pre, len(bad), 4096):  # the prefix, then the payload a page at a time
            check.update(bytes(bad[:pre]) if i == pre else b"")
            check.update(bytes(bad[i:i + 4096]))
            if i > pre + pay:
                pytest.fail("the stream was not refused inside the payload")
    assert refused.value.code == "E208" and refused.value.details.get("reason") == "frame_mismatch"
    verdict = check.finish()
    assert verdict.error is refused.value and not verdict.ok
    check.close()
