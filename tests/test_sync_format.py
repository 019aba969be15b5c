"""The `.sync` format in-process: manifest rules, host allow-lists, what the signature covers."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
import tomli_w

from pipeline.errors import AtoError
from stages.capsule.keys import generate_key
from stages.sync import build_sync, read_sync
from stages.sync.manifest import manifest_document, parse_manifest


def _doc(**changes: object) -> dict:
    doc = manifest_document(content_type="text/csv", display_ext="csv", created_by="ato",
                            created_at="2026-01-01T00:00:00Z", ttl=60)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        doc.setdefault(section, {})[key] = value
    return doc


@pytest.mark.parametrize(("change", "key"), [
    ({"sync__content_type": "not a mime"}, "sync.content_type"),
    ({"sync__display_ext": "../etc/passwd"}, "sync.display_ext"),
    ({"sync__variant": "weird"}, "sync.variant"),
    ({"meta__created_at": "yesterday"}, "meta.created_at"),
    ({"meta__hash_algo": "md5"}, "meta.hash_algo"),
    ({"policy__ttl": -1}, "policy.ttl"),
    ({"policy__ttl": True}, "policy.ttl"),
    ({"policy__timeout": 0}, "policy.timeout"),
    ({"source__url": "http://example.org/x.sync"}, "source.url"),
    ({"source__url": "https://user:pw@example.org/x.sync"}, "source.url"),
    ({"permissions__allow_hosts": ["a b"]}, "permissions.allow_hosts"),
])
def test_manifest_rules_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(AtoError) as err:
        parse_manifest(tomli_w.dumps(_doc(**change)).encode())
    assert err.value.code == "E002" and err.value.details["key"] == key


def test_toml_dates_are_refused_because_the_signature_hashes_json() -> None:
    text = tomli_w.dumps(_doc()).replace('created_at = "2026-01-01T00:00:00Z"', "created_at = 2026-01-01T00:00:00Z")
    with pytest.raises(AtoError) as err:
        parse_manifest(text.encode())
    assert "quoted RFC 3339" in err.value.message


def test_wildcard_hosts_match_only_at_a_dot() -> None:
    m = parse_manifest(tomli_w.dumps(_doc(permissions__allow_hosts=["*.example.com", "data.test"])).encode())
    assert m.host_allowed("a.example.com") and m.host_allowed("DATA.test")
    assert not m.host_allowed("evil-example.com") and not m.host_allowed("example.com")
    assert not parse_manifest(tomli_w.dumps(_doc()).encode()).host_allowed("anything")  # empty allows nothing


def test_source_host_is_allowed_by_the_builder() -> None:
    doc = manifest_document(content_type="text/csv", display_ext="csv", created_by="ato",
                            created_at="2026-01-01T00:00:00Z", ttl=60, source_url="https://data.example.org/q.sync")
    assert doc["permissions"]["allow_hosts"] == ["data.example.org"]


def test_every_member_is_signed(tmp_path: Path) -> None:
    payload = tmp_path / "p.json"
    payload.write_text("{}")
    key = generate_key()
    out = tmp_path / "p.sync"
    build_sync(payload, out, content_type="application/json", display_ext="json", ttl=60, created_at=time.time(),
               key=key, context={"a": 1})
    with read_sync(out) as pkg:
        assert pkg.signature.signed and pkg.signature.key_id == key.did
        assert set(pkg.digests.members) == {"context.json", "sync.wasm"}
        assert pkg.display_name() == "p.json"
    with zipfile.ZipFile(out) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    for name, data in (("context.json", b'{"a":2}'), ("sync.proof", b"proof")):
        changed = dict(members, **{name: data})
        bad = tmp_path / f"bad-{name}.sync"
        with zipfile.ZipFile(bad, "w") as zout:
            for n, d in changed.items():
                zout.writestr(n, d)
        with pytest.raises(AtoError) as err:
            read_sync(bad)
        assert err.value.code == "E208" and name in err.value.message


def test_a_signature_is_bound_to_its_signer(tmp_path: Path) -> None:
    """Replacing created_by with another key's did (keeping the signature) does not verify."""
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    out = tmp_path / "p.sync"
    key, other = generate_key(), generate_key()
    build_sync(payload, out, content_type="text/plain", display_ext="txt", ttl=60, created_at=time.time(), key=key)
    with zipfile.ZipFile(out) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    members["manifest.toml"] = members["manifest.toml"].replace(key.did.encode(), other.did.encode())
    bad = tmp_path / "bad.sync"
    with zipfile.ZipFile(bad, "w") as zout:
        for n, d in members.items():
            zout.writestr(n, d)
    with pytest.raises(AtoError) as err:
        read_sync(bad)
    assert err.value.code == "E208"
