"""The filesystem registry: URL refusal, id@version rules, atomic locked writes, relative sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_cap_sample import base_manifest, make_package, url_manifest, write_manifest

from pipeline.cap import registry as reg
from pipeline.cap.compile import compile_package, preview
from pipeline.cap.manifest import load
from pipeline.cap.review import review
from pipeline.envelope import validation_errors
from pipeline.errors import E_MANIFEST, E_USAGE, E_VERSION_CONFLICT, AtoError


def entry(package_id: str, version: str = "1.0.0") -> dict[str, Any]:
    return {"id": package_id, "version": version}


@pytest.mark.parametrize("value", ["http://registry.example/packages.json", "https://r.example/p.json",
                                   "HTTPS://R.EXAMPLE/p.json", "file:///tmp/p.json", "http:relative"])
def test_urls_are_not_registry_paths(value: str) -> None:
    with pytest.raises(AtoError) as exc:
        reg.registry_path(value)
    assert exc.value.code == E_USAGE
    assert exc.value.message == "Local publish commands require a filesystem registry path"


def test_missing_registry_reads_as_empty(tmp_path: Path) -> None:
    assert reg.read(tmp_path / "none.json") == {"schema": "cap-registry.v0", "packages": []}


@pytest.mark.parametrize("text", ["{", "[]", '{"packages": {}}', '{"packages": [{"id": 1}]}',
                                  '{"schema": "other.v1", "packages": []}'])
def test_malformed_registry_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "packages.json"
    path.write_text(text)
    with pytest.raises(AtoError) as exc:
        reg.read(path)
    assert exc.value.code == E_MANIFEST and str(path) in exc.value.message


def test_upsert_sorts_refuses_duplicates_and_force_replaces() -> None:
    doc = reg.empty()
    assert reg.upsert(doc, entry("b/x"), force=False) == "added"
    assert reg.upsert(doc, entry("a/x"), force=False) == "added"
    assert reg.upsert(doc, entry("a/x", "2.0.0"), force=False) == "added"
    assert [(p["id"], p["version"]) for p in doc["packages"]] == \
        [("a/x", "1.0.0"), ("a/x", "2.0.0"), ("b/x", "1.0.0")]
    with pytest.raises(AtoError) as exc:
        reg.upsert(doc, entry("a/x"), force=False)
    assert exc.value.code == E_VERSION_CONFLICT
    assert exc.value.message == "Same id@version already present: a/x@1.0.0"
    assert reg.upsert(doc, {**entry("a/x"), "summary": "new"}, force=True) == "replaced"
    assert len(doc["packages"]) == 3 and doc["packages"][0]["summary"] == "new"


def test_publish_keeps_foreign_entries_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry" / "packages.json"
    assert reg.publish(path, entry("a/x"), force=False, dry_run=True) == ("added", 1)
    assert not path.parent.exists()
    path.parent.mkdir()
    path.write_text(json.dumps({"packages": [{"id": "z/hand-written", "version": "0", "extra": [1]}]}))
    assert reg.publish(path, entry("a/x"), force=False, dry_run=False) == ("added", 2)
    doc = json.loads(path.read_text())
    assert doc["packages"][1] == {"id": "z/hand-written", "version": "0", "extra": [1]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["packages.json", "packages.json.lock"]


def test_source_path_is_relative_to_the_registry_file(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "src" / "pkg")
    m = load(write_manifest(pkg, base_manifest()))
    for registry, expected in [(tmp_path / "registry" / "packages.json", "../src/pkg"),
                               (pkg / "registry" / "packages.json", ".."),
                               (pkg / "packages.json", ".")]:
        package = compile_package(m, registry, review(m))
        assert package["install"]["source"] == {"path": expected}


def test_compiled_package_digests_bins_and_hides_self_asserted_verification(tmp_path: Path) -> None:
    import hashlib

    pkg = make_package(tmp_path / "pkg")
    m = load(write_manifest(pkg, base_manifest(publisher={"verified": True, "identity": "github:acme"})))
    doc = preview(m, tmp_path / "registry" / "packages.json")
    assert validation_errors(doc, "cap-preview") == []
    file_sha = hashlib.sha256((pkg / "bin" / "my-tool").read_bytes()).hexdigest()
    assert doc["package"]["files"] == {"bin/my-tool": f"sha256:{file_sha}"}
    assert doc["package"]["digest"].startswith("sha256:")
    assert doc["capabilityCard"]["publisher"] == {"identity": "github:acme", "verified": False}
    assert doc["installPlan"]["steps"][0] == {"action": "link-bin", "bin": "my-tool", "path": "bin/my-tool",
                                              "target": "$CAP_HOME/bin/my-tool", "sha256": f"sha256:{file_sha}"}
    # One changed byte in a bin changes the package digest.
    (pkg / "bin" / "my-tool").write_text((pkg / "bin" / "my-tool").read_text() + "#\n")
    assert preview(m, tmp_path / "r.json")["package"]["digest"] != doc["package"]["digest"]


def test_single_file_url_plan_downloads_and_verifies(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    m = load(write_manifest(pkg, url_manifest()))
    doc = preview(m, tmp_path / "r.json")
    assert validation_errors(doc, "cap-preview") == []
    assert doc["package"]["digest"] == "sha256:" + "ab" * 32
    assert doc["package"]["install"]["source"] == \
        {"url": "https://example.com/downloaded-tool", "sha256": "ab" * 32}
    assert [s["action"] for s in doc["installPlan"]["steps"]] == ["download", "verify-sha256", "install-bin"]
    assert doc["installPlan"]["network"] is True
