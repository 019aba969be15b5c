"""Property tests of the artifact reader and verifier (Hypothesis): mutate valid artifacts — flip,
truncate, insert and delete bytes, reorder members — and require a verdict, never a crash.

Any change to a valid artifact must be refused (every byte is covered by a digest, a signature or
the canonical framing), and the refusal must be the project's own error (AtoError, E208/E212),
never another exception. The payload tar reader and the entry rules get arbitrary bytes too.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import AtoError
from stages.capsule import NO_CEILING, read_capsule, unpack_payload, verify, verify_skeleton
from stages.capsule import keys as keymod
from stages.capsule.entries import TreeModel, UnsafeEntry
from stages.capsule.payload_tar import TarFormatError, TarReader
from tests.hostile_support import Entry, capsule, tar_bytes

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz")
    entries = [Entry("main.py", b"print('fuzz')\n"), Entry("lib/data.bin", os.urandom(70_000)),
               Entry("lib/link", kind="symlink", link="data.bin"), Entry("docs", kind="dir"),
               Entry("docs/readme.txt", b"read me\n" * 50)]
    unsigned = capsule(root / "u.capsule", "fuzz-u", "1.0.0", entries)
    signed = capsule(root / "s.capsule", "fuzz-s", "1.0.0", entries, key=keymod.generate_key())
    out = {"unsigned": unsigned.read_bytes(), "signed": signed.read_bytes()}
    for name, data in out.items():  # the originals themselves are valid
        path = root / f"check-{name}.capsule"
        path.write_bytes(data)
        assert verify(path, NO_CEILING).ok, verify(path, NO_CEILING).error
    return out


def _mutated(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "reorder", "splice"]))
    n = len(data)
    if kind == "flip":
        at = draw(st.integers(0, n - 1))
        bit = draw(st.integers(1, 255))
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1:]
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if kind == "insert":
        at = draw(st.integers(0, n))
        return data[:at] + draw(st.binary(min_size=1, max_size=600)) + data[at:]
    if kind == "delete":
        at = draw(st.integers(0, n - 1))
        return data[:at] + data[min(n, at + draw(st.integers(1, 1024))):]
    if kind == "splice":  # overwrite a whole run with random bytes of the same length
        at = draw(st.integers(0, n - 1))
        junk = draw(st.binary(min_size=1, max_size=2048))
        junk = junk[:n - at]
        return data[:at] + junk + data[at + len(junk):] if junk != data[at:at + len(junk)] else data[:at]
    # reorder: swap two whole members (header + data + padding) of the outer tar
    spans = _member_blocks(data)
    i, j = draw(st.tuples(st.integers(0, len(spans) - 1), st.integers(0, len(spans) - 1)).filter(lambda t: t[0] != t[1]))
    blocks = [data[a:b] for a, b in spans]
    blocks[i], blocks[j] = blocks[j], blocks[i]
    return b"".join(blocks) + data[spans[-1][1]:]


def _member_blocks(data: bytes) -> list[tuple[int, int]]:
    out, at = [], 0
    while data[at:at + 512].strip(b"\0"):
        size = int(data[at + 124:at + 136].split(b"\0")[0] or b"0", 8)
        end = at + 512 + size + (-size) % 512
        out.append((at, end))
        at = end
    return out


def _verdict_or_fail(path: Path):
    try:
        verdict = verify(path, NO_CEILING)
    except Exception as exc:  # noqa: BLE001 - the property: nothing but a verdict
        pytest.fail(f"verify raised {type(exc).__name__}: {exc}")
    try:
        read_capsule(path)
    except AtoError:
        pass
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"read_capsule raised {type(exc).__name__}: {exc}")
    return verdict


@pytest.mark.parametrize("which", ["unsigned", "signed"])
@FUZZ
@given(data=st.data())
def test_any_change_to_a_valid_artifact_is_refused_with_the_projects_error(which: str, data: st.DataObject,
                                                                          originals: dict[str, bytes],
                                                                          tmp_path: Path) -> None:
    original = originals[which]
    mutated = _mutated(original, data.draw)
    if mutated == original:
        return
    path = tmp_path / f"m{next(_COUNTER)}.capsule"
    path.write_bytes(mutated)
    verdict = _verdict_or_fail(path)
    assert verdict.error is not None, "a changed artifact verified"
    assert isinstance(verdict.error, AtoError) and verdict.error.code in ("E208", "E212", "E213", "E108")
    assert [c.name for c in verdict.checks] == ["archive", "members", "signature", "digests"]
    assert sum(c.status == "failed" for c in verdict.checks) == 1
    path.unlink()


@FUZZ
@given(data=st.data())
def test_a_skeleton_of_any_split_gets_a_verdict(data: st.DataObject, originals: dict[str, bytes]) -> None:
    """The pre-download check on a registry's skeleton: arbitrary prefix/hole/suffix splits."""
    blob = originals[data.draw(st.sampled_from(["unsigned", "signed"]))]
    a = data.draw(st.integers(0, len(blob)))
    b = data.draw(st.integers(a, len(blob)))
    prefix, suffix = blob[:a], blob[b:]
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, max(0, len(prefix) - 1)))
        prefix = prefix[:at] + data.draw(st.binary(max_size=64)) + prefix[at + 1:]
    try:
        verdict = verify_skeleton(prefix, b - a, suffix)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"verify_skeleton raised {type(exc).__name__}: {exc}")
    assert verdict.error is None or isinstance(verdict.error, AtoError)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=4096),
                     st.builds(lambda n, cut: tar_bytes([Entry("a" * n, b"x" * cut)])[:cut * 3 + 700],
                               st.integers(1, 300), st.integers(0, 900))))
def test_the_payload_tar_reader_and_entry_rules_never_crash(raw: bytes) -> None:
    model = TreeModel()
    try:
        reader = TarReader(io.BytesIO(raw))
        for entry in reader:
            model.add(entry)
            for _piece in reader.data():
                pass
        model.finish()
    except (TarFormatError, UnsafeEntry):
        pass


@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(["a", "b", "a/b", "a/b/c", "l", "l/x", "../x", "c/../d", ".", "/e"]),
                                  st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]),
                                  st.sampled_from(["a", "b", "..", "../..", "a/b", "l/../..", "/etc", ".", ""])),
                        max_size=8))
def test_the_unpacker_agrees_with_the_verifier(entries: list[tuple[str, str, str]], tmp_path_factory) -> None:
    """Random trees of files, dirs, symlinks and hard links: whenever the verifier accepts one, the
    unpacker writes it without error and nothing lands outside the unpack dir; whenever it refuses
    one, so does the unpacker."""
    root = tmp_path_factory.mktemp("agree")
    tar = tar_bytes([Entry(n, b"x", kind=k, link=link) for n, k, link in entries])
    art = capsule(root / "t.capsule", "agree", "1.0.0", raw_tar=tar)
    verdict = verify(art, NO_CEILING)
    dest = root / "box" / "dest"
    dest.mkdir(parents=True)
    try:
        unpack_payload(read_capsule(art), dest)
        unpacked = True
    except AtoError:
        unpacked = False
    assert unpacked == verdict.ok, (entries, verdict.error)
    outside = sorted(p.name for p in (root / "box").iterdir())
    assert outside == ["dest"], outside
    for path in dest.rglob("*"):
        if path.is_symlink():
            resolved = path.resolve()
            assert resolved == dest.resolve() or dest.resolve() in resolved.parents, (path, resolved)
