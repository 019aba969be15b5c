"""Fetch: the content-addressed fetch cache, safe extraction, no-op re-runs, ref parsing."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import blake3
import pytest

from cas import tempfiles
from pipeline import native_delivery, paths
from pipeline.errors import AtoError
from stages.capsule import read_capsule
from stages.fetch import parse_ref
from tests.conftest import assert_schema
from tests.e2e.registry_support import forge_capsule
from tests.native_support import build_in_process, independent_tree_digest, native_project, trust

FETCH_FIELDS = ["schema_version", "scoped_id", "version", "cache_dir", "artifact_dir", "parent_digest", "registry"]
RECORD_FIELDS = ["schema_version", "scoped_id", "version", "registry", "fetched_at", "parent_digest",
                 "artifact_blake3"]


@pytest.fixture(scope="module")
def native_capsule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native-build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("ATO_HOME", str(root / "home" / ".ato"))
        doc = build_in_process(native_project(root / "proj"))
    return Path(doc["artifact"])


def no_temp_dirs() -> bool:
    root = paths.fetches_dir()
    return not root.exists() or not list(tempfiles.find(root))


def test_fetch_materializes_the_cache_entry(native_capsule: Path) -> None:
    doc = native_delivery.fetch_local(native_capsule, trust=trust())
    assert list(doc) == FETCH_FIELDS
    assert_schema(doc, "fetch")
    cache = Path(doc["cache_dir"])
    assert cache == paths.fetches_dir() / doc["parent_digest"].removeprefix("blake3:")
    assert doc["artifact_dir"] == str(cache / "artifact")
    assert doc["parent_digest"] == independent_tree_digest(cache / "artifact")
    assert (doc["scoped_id"], doc["version"], doc["registry"]) == ("local/hello-native", "0.1.0",
                                                                   native_capsule.as_uri())
    assert sorted(p.name for p in cache.iterdir()) == ["artifact", "artifact.capsule", "fetch.json"]
    assert (cache / "artifact.capsule").read_bytes() == native_capsule.read_bytes()
    record = json.loads((cache / "fetch.json").read_text())
    assert list(record) == RECORD_FIELDS
    assert_schema(record, "fetch-record")
    assert record["artifact_blake3"] == "blake3:" + blake3.blake3(native_capsule.read_bytes()).hexdigest()
    assert record["parent_digest"] == doc["parent_digest"] and record["fetched_at"].endswith("Z")
    assert os.stat(cache / "artifact" / "dist" / "hello").st_mode & 0o777 == 0o755
    assert (cache / "artifact" / "ato.delivery.toml").is_file()
    assert no_temp_dirs()


def test_fetching_again_is_a_noop(native_capsule: Path) -> None:
    first = native_delivery.fetch_local(native_capsule, trust=trust())
    cache = Path(first["cache_dir"])
    before = ((cache / "fetch.json").read_bytes(), os.stat(cache / "artifact").st_ino,
              os.stat(cache / "fetch.json").st_mtime_ns)
    assert native_delivery.fetch_local(native_capsule, trust=trust()) == first
    assert ((cache / "fetch.json").read_bytes(), os.stat(cache / "artifact").st_ino,
            os.stat(cache / "fetch.json").st_mtime_ns) == before
    assert no_temp_dirs()


def test_same_payload_under_other_labels_keeps_the_tree_and_rewrites_fetch_json(native_capsule: Path) -> None:
    first = native_delivery.fetch_local(native_capsule, trust=trust())
    cache = Path(first["cache_dir"])
    ino = os.stat(cache / "artifact").st_ino
    second = native_delivery.fetch_local(native_capsule, trust=trust(), scoped_id="acme/hello", version="0.2.0",
                                         registry="http://127.0.0.1:1")
    assert second["parent_digest"] == first["parent_digest"] and second["cache_dir"] == first["cache_dir"]
    record = json.loads((cache / "fetch.json").read_text())
    assert (record["scoped_id"], record["version"], record["registry"]) == ("acme/hello", "0.2.0", "http://127.0.0.1:1")
    assert os.stat(cache / "artifact").st_ino == ino


def test_a_damaged_cache_entry_is_repaired(native_capsule: Path) -> None:
    first = native_delivery.fetch_local(native_capsule, trust=trust())
    binary = Path(first["artifact_dir"]) / "dist" / "hello"
    binary.chmod(0o644)
    again = native_delivery.fetch_local(native_capsule, trust=trust())
    assert again == first
    assert independent_tree_digest(Path(again["artifact_dir"])) == first["parent_digest"]
    assert no_temp_dirs()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


UNSAFE = {
    "dotdot": ([(_info("../evil"), b"x")], "'../evil' ('..' component)"),
    "nested-dotdot": ([(_info("a/../../evil"), b"x")], "'..' component"),
    "absolute": ([(_info("/tmp/evil-abs"), b"x")], "absolute or non-POSIX path"),
    "symlink-escape": ([(_info("link", tarfile.SYMTYPE, "../../outside"), b"")], "resolves outside the payload root"),
    "symlink-absolute": ([(_info("link", tarfile.SYMTYPE, "/etc/passwd"), b"")], "absolute, empty or over-long"),
    "through-symlink": ([(_info("sub", tarfile.DIRTYPE, mode=0o755), b""), (_info("link", tarfile.SYMTYPE, "sub"), b""),
                         (_info("link/file"), b"x")], "its parent 'link' is a symlink"),
    "hardlink-absolute": ([(_info("a"), b"x"), (_info("b", tarfile.LNKTYPE, "/etc/passwd"), b"")],
                          "hard link to '/etc/passwd'"),
    "hardlink-later": ([(_info("b", tarfile.LNKTYPE, "a"), b""), (_info("a"), b"x")], "not an earlier regular file"),
    "fifo": ([(_info("pipe", tarfile.FIFOTYPE), b"")], "FIFO entries are not allowed"),
    "duplicate": ([(_info("a"), b"x"), (_info("a"), b"y")], "duplicate entry"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_payloads_are_refused_without_leftovers(case: str, tmp_path: Path) -> None:
    entries, why = UNSAFE[case]
    art = forge_capsule(tmp_path / "evil.capsule", "evil", "0.1.0", raw_entries=entries)
    with pytest.raises(AtoError) as info:
        native_delivery.fetch_local(art, trust=trust())
    assert info.value.code == "E208"
    assert "Refusing to unpack unsafe payload path: " in info.value.message and why in info.value.message
    root = paths.fetches_dir()
    assert not root.exists() or list(root.iterdir()) == []  # refused by the verifier: nothing is even created
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()


def test_a_hard_link_to_an_earlier_file_is_unpacked_as_one_inode(tmp_path: Path) -> None:
    art = forge_capsule(tmp_path / "links.capsule", "links", "0.1.0",
                        raw_entries=[(_info("a"), b"same bytes\n"), (_info("b", tarfile.LNKTYPE, "a"), b"")])
    doc = native_delivery.fetch_local(art, trust=trust())
    a, b = Path(doc["artifact_dir"]) / "a", Path(doc["artifact_dir"]) / "b"
    assert b.read_bytes() == b"same bytes\n" and os.path.samefile(a, b)


def test_a_corrupted_capsule_is_refused_before_anything_is_written(native_capsule: Path, tmp_path: Path) -> None:
    data = bytearray(native_capsule.read_bytes())
    data[read_capsule(native_capsule).payload_offset + 40] ^= 0xFF  # inside payload.tar.zst
    bad = tmp_path / "bad.capsule"
    bad.write_bytes(bytes(data))
    with pytest.raises(AtoError) as info:
        native_delivery.fetch_local(bad, scoped_id="local/x", version="1", registry="file:///x", trust=trust())
    assert info.value.code == "E208"
    root = paths.fetches_dir()
    assert not root.exists() or list(root.iterdir()) == []


REFS = [
    (("acme/My-App@1.2.0", "http://r:1", None), ("acme", "my-app", "1.2.0", "http://r:1")),
    (("acme/app", None, "2.0.0"), ("acme", "app", "2.0.0", None)),
    (("localhost:8080/my-tauri-app:unsigned-0.1.0", None, None),
     ("local", "my-tauri-app", "unsigned-0.1.0", "http://localhost:8080")),
    (("https://127.0.0.1:8787/Koh0920/sample-native-capsule:0.1.0", None, None),
     ("koh0920", "sample-native-capsule", "0.1.0", "https://127.0.0.1:8787")),
    (("127.0.0.1:9/app", None, None), ("local", "app", None, "http://127.0.0.1:9")),
]


@pytest.mark.parametrize(("args", "want"), REFS, ids=[r[0][0] for r in REFS])
def test_parse_ref(args: tuple, want: tuple) -> None:
    ref = parse_ref(*args)
    assert (ref.publisher, ref.slug, ref.version, ref.registry) == want


REF_ERRORS = [
    (("localhost:8080/", None, None), "invalid_fetch_ref: missing capsule path after registry host"),
    (("localhost:8080/a/b/c", None, None), "invalid_fetch_ref: use <registry>/<slug>:<version> or "
                                           "<registry>/<publisher>/<slug>:<version>"),
    (("localhost:8080/:1.0", None, None), "invalid_fetch_ref: missing capsule slug before version"),
    (("localhost:8080/app", "http://other:1", None), "conflicting_registry_request: ref specifies registry "
                                                     "'http://localhost:8080' but --registry requested 'http://other:1'"),
    (("acme/app@1", None, "2"), "conflicting_version_request: ref specifies version '1' but --version requested '2'"),
    (("app", None, None), "scoped_id_required: use <publisher>/<slug> (got 'app')"),
    (("missing.capsule", None, None), "no such .capsule file: missing.capsule"),
]


@pytest.mark.parametrize(("args", "message"), REF_ERRORS, ids=[r[0][0] for r in REF_ERRORS])
def test_parse_ref_errors(args: tuple, message: str) -> None:
    with pytest.raises(AtoError) as info:
        parse_ref(*args)
    assert info.value.message == message and info.value.code == "E100"
