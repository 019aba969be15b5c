"""The trust store file: atomic replace across a crash, corruption reported (never reset), locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cas import tempfiles
from pipeline import paths
from pipeline.errors import AtoError
from pipeline.trust import store as trust_store
from stages.capsule import keys as sign
from tests.conftest import assert_schema

REPO = Path(__file__).resolve().parents[1]


def run_child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=60)


def seeded() -> tuple[Path, bytes, str]:
    k = sign.generate_key()
    with trust_store.transaction() as s:
        s.pin("acme", k.did, "tofu")
        s.set_petname(k.did, "acme release key")
    path = paths.trust_store_path()
    return path, path.read_bytes(), k.did


def test_store_file_layout_and_permissions() -> None:
    path, data, did = seeded()
    assert path == Path(os.environ["HOME"]) / ".capsule" / "trust_store.json"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    doc = json.loads(data)
    assert_schema(doc, "trust-store")
    assert doc["identities"]["acme"]["key_id"] == did
    assert doc["keys"][did]["petname"] == "acme release key"


@pytest.mark.parametrize("stage", ["before-rename", "while-writing"])
def test_a_writer_killed_mid_write_leaves_the_old_store(stage: str) -> None:
    path, before, did = seeded()
    other = sign.generate_key().did
    hook = {
        # temp file written and fsynced, then SIGKILL instead of the rename
        "before-rename": "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)",
        # SIGKILL after the first bytes of the temp file are written
        "while-writing": "atomic.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)",
    }[stage]
    proc = run_child(f"""
        import os, signal
        import cas.atomic as atomic
        from pipeline.trust import store
        {hook}
        with store.transaction() as s:
            s.pin("evil", {other!r}, "pin")
            s.forget_identity("acme")
    """)
    assert proc.returncode == -9, proc.stderr
    leftovers = list(tempfiles.find(path.parent))
    assert leftovers, "the child should have died with its temp file written"
    assert path.read_bytes() == before  # the old store, byte for byte
    s = trust_store.load()
    assert s.pinned("acme")["key_id"] == did and s.pinned("evil") is None
    with trust_store.transaction() as s:  # the next writer cleans up and works
        s.pin("next", other, "pin")
    assert not list(tempfiles.find(path.parent))
    assert trust_store.load().pinned("next")["key_id"] == other


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated
    lambda b: b.replace(b'"identities"', b'"identitiez"'),  # valid JSON, wrong shape
    lambda b: b"\x00\xff" + b,  # garbage
    lambda b: b.replace(b'"fingerprint": "', b'"fingerprint": "0', 1),  # 65-digit fingerprint
])
def test_a_corrupted_store_is_reported_and_never_reset(damage) -> None:
    path, before, _ = seeded()
    damaged = damage(before)
    path.write_bytes(damaged)
    with pytest.raises(AtoError) as err:
        trust_store.load()
    e = err.value
    assert e.code == "E208" and "corrupted" in e.message and str(path) in e.message
    assert "move it aside" in e.hint and e.details["path"] == str(path)
    with pytest.raises(AtoError):
        with trust_store.transaction() as s:
            s.pin("x", sign.generate_key().did, "pin")
    assert path.read_bytes() == damaged  # untouched: no silent reset


def test_key_entry_with_a_wrong_fingerprint_is_corruption() -> None:
    path, before, did = seeded()
    doc = json.loads(before)
    doc["keys"][did]["fingerprint"] = "0" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(AtoError) as err:
        trust_store.load()
    assert "does not match its fingerprint" in err.value.message


def test_concurrent_writers_lose_nothing() -> None:
    keys = [sign.generate_key().did for _ in range(2)]
    code = """
        import sys
        from pipeline.trust import store
        did, tag = sys.argv[1], sys.argv[2]
        for i in range(15):
            with store.transaction() as s:
                s.pin(f"{tag}-{i}", did, "pin")
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), did, f"w{n}"], env=env)
             for n, did in enumerate(keys)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    pins = trust_store.load().identities
    assert len(pins) == 30 and {pins[f"w{n}-{i}"]["key_id"] for n in range(2) for i in range(15)} == set(keys)


def test_key_references_resolve_by_did_petname_and_fingerprint() -> None:
    _, _, did = seeded()
    s = trust_store.load()
    fp = s.keys[did]["fingerprint"]
    assert s.resolve_key(did) == did
    assert s.resolve_key("acme release key") == did
    assert s.resolve_key(fp) == did and s.resolve_key(fp.upper()) == did
    assert s.resolve_key(sign.short_fingerprint(fp)) == did and s.resolve_key(fp[:16]) == did
    with pytest.raises(AtoError):
        s.resolve_key("nobody")
    unknown = "ab" * 32
    assert s.resolve_key(unknown, allow_unknown_fingerprint=True) == unknown
    with pytest.raises(AtoError):
        s.set_petname(sign.generate_key().did, "acme release key")  # petnames are unique
