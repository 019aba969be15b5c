"""`cap` end to end through the installed console script: the seed's quick start, every
troubleshooting message from its situation, failure shapes, and concurrent publishers."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_schema, cli_path
from test_cap_sample import base_manifest, make_package, url_manifest, write_manifest

REGISTRY = "registry/packages.json"


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_seed_quick_start(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "my-tool")

    res = cap(["init", "acme/my-tool"], cwd=pkg)
    assert res.code == 0, res.stderr
    assert "wrote capability.json" in res.stdout
    manifest = json.loads((pkg / "capability.json").read_text())
    assert_schema(manifest, "cap-manifest")
    assert manifest["id"] == "acme/my-tool" and manifest["schema"] == "cap-manifest.v0"

    before = tree(pkg)
    res = cap(["preview", "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    preview = res.json()
    assert_schema(preview, "cap-preview")
    assert res.stderr == "", "--json keeps stderr quiet on success"
    assert tree(pkg) == before, "preview must not write"
    assert preview["summary"]["bins"] == ["my-tool"] and preview["review"]["status"] == "passed"
    assert [w["id"] for w in preview["warnings"]] == ["output.structured"]
    assert preview["capabilityCard"]["mcpTools"] == ["my_tool_report", "my_tool_repair"]

    res = cap(["review", "--run-trials", "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    review = res.json()
    assert_schema(review, "cap-review")
    assert res.stderr == ""
    assert review["passed"] is True and review["blocking_failures"] == 0
    assert [(t["command"], t["status"]) for t in review["trials"]["results"]] == [("my-tool --help", "passed")]
    assert tree(pkg) == before, "review --run-trials must not write into the package"

    res = cap(["publish", "--local", "--registry", REGISTRY, "--dry-run", "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    dry = res.json()
    assert_schema(dry, "cap-publish")
    assert dry["dry_run"] is True and dry["action"] == "added"
    assert not (pkg / "registry").exists(), "a dry run writes nothing"

    res = cap(["publish", "--local", "--registry", REGISTRY, "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    published = res.json()
    assert_schema(published, "cap-publish")
    assert published["package"] == dry["package"]
    # publish runs the safe trials (preview compiles without running anything): only that differs
    assert published["package"]["review"]["trials"] == "passed" and preview["package"]["review"]["trials"] == "not-run"
    assert {**published["package"], "review": None} == {**preview["package"], "review": None}
    assert [(t["command"], t["status"]) for t in published["trials"]["results"]] == [("my-tool --help", "passed")]

    registry = json.loads((pkg / REGISTRY).read_text())
    assert registry["schema"] == "cap-registry.v0"
    [entry] = registry["packages"]
    assert entry == published["package"]
    assert (entry["id"], entry["version"], entry["review"]["status"]) == ("acme/my-tool", "0.1.0", "passed")
    assert entry["install"] == \
        {"backend": "local-bin", "source": {"path": ".."}, "bins": {"my-tool": "bin/my-tool"}}
    file_sha = hashlib.sha256((pkg / "bin" / "my-tool").read_bytes()).hexdigest()
    assert entry["files"] == {"bin/my-tool": f"sha256:{file_sha}"}
    assert entry["digest"] == published["digest"]
    assert entry["skills"] == ["skills/my-tool/SKILL.md"]
    assert sorted(p.name for p in (pkg / "registry").iterdir()) == ["packages.json", "packages.json.lock"]

    # The registry is reproducible: publishing the same bytes again with --force rewrites it identically.
    first = (pkg / REGISTRY).read_bytes()
    res = cap(["publish", "--local", "--registry", REGISTRY, "--force"], cwd=pkg)
    assert res.code == 0, res.stderr
    assert "replaced acme/my-tool@0.1.0" in res.stdout
    assert (pkg / REGISTRY).read_bytes() == first


def test_global_json_flag_and_human_output(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    res = cap(["--json", "preview"], cwd=pkg)
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "cap-preview")
    res = cap(["review"], cwd=pkg)
    assert res.code == 0 and "review acme/my-tool@0.1.0: passed" in res.stdout
    assert "skip  trials.run" in res.stdout


# --- troubleshooting: each message from the situation it describes -----------------------------

def _fails(res: Any, message: str, as_json: bool) -> None:
    assert res.code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    if as_json:
        err = json.loads(lines[0])["error"]
        assert message in err["message"] and err["code"]
    else:
        assert message in lines[0] and lines[0].startswith("error[")


TROUBLE: dict[str, tuple[dict[str, Any], str]] = {
    "bad-id": (base_manifest(id="my-tool"), 'Package id must look like "namespace/name"'),
    "no-task": (base_manifest(tasks=[]), "Capability card must declare at least one task"),
    "trial-bin": (base_manifest(safeTrials=[{"command": "node bin/my-tool.js --help"}]),
                  "Safe trial \"node bin/my-tool.js --help\" must start with one of this package's declared bins"),
    "bin-path": (base_manifest(commands=[{"name": "my-tool", "path": "bin/my-tool.js"}],
                               install={"backend": "local-bin", "bins": {"my-tool": "bin/my-tool.js"}}),
                 "Declared bin path does not exist"),
    "sha-pin": (url_manifest(source={"url": "https://example.com/downloaded-tool"}),
                "single-file-url packages must pin install.source.sha256"),
    "not-semver": (base_manifest(version="1.0"), 'Package version must be a semantic version like 1.0.0'),
    "v-prefix": (base_manifest(version="v1.0.0"), 'Package version must be a semantic version like 1.0.0'),
    "word": (base_manifest(version="latest"), 'Package version must be a semantic version like 1.0.0'),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
@pytest.mark.parametrize("case", list(TROUBLE))
def test_manifest_errors_block_publish(tmp_path: Path, cap, case: str, as_json: bool) -> None:
    doc, message = TROUBLE[case]
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, doc)
    res = cap(["publish", "--local", "--registry", REGISTRY] + (["--json"] if as_json else []), cwd=pkg)
    _fails(res, message, as_json)
    assert res.stdout == ""
    assert not (pkg / "registry").exists(), "a refused publish writes nothing"


TRIAL_FAILURES = {
    "exit-code": ("#!/bin/sh\necho broken >&2\nexit 3\n", 'Safe trial "my-tool --help" failed: exited with code 3'),
    "undeclared-write": ("#!/bin/sh\necho state > \"$HOME/.my-tool-state\"\necho usage\n",
                         'Safe trial "my-tool --help" failed: wrote outside its declared writes: ~/.my-tool-state'),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["publish", "dry-run"])
@pytest.mark.parametrize("case", list(TRIAL_FAILURES))
def test_a_failing_safe_trial_blocks_publish(tmp_path: Path, cap, case: str, dry_run: bool) -> None:
    """cap publish --local runs the same blocking review as cap review --run-trials."""
    script, message = TRIAL_FAILURES[case]
    pkg = make_package(tmp_path / "pkg", script=script)
    write_manifest(pkg, base_manifest())
    assert cap(["review"], cwd=pkg).code == 0  # the static checks alone pass
    review = cap(["review", "--run-trials", "--json"], cwd=pkg)
    assert review.code == 1 and review.json()["checks"][-1]["message"] == message
    res = cap(["publish", "--local", "--registry", REGISTRY, "--json"] + (["--dry-run"] if dry_run else []), cwd=pkg)
    _fails(res, message, True)
    assert json.loads(res.stderr)["error"]["details"]["failed"] == ["trials.run"]
    assert not (pkg / "registry").exists()
    # declaring the write makes the same package publishable
    if case == "undeclared-write":
        write_manifest(pkg, base_manifest(safeTrials=[
            {"command": "my-tool --help", "writes": ["~/.my-tool-state"], "network": []}]))
        ok = cap(["publish", "--local", "--registry", REGISTRY, "--json"], cwd=pkg)
        assert ok.code == 0, ok.stderr
        assert_schema(ok.json(), "cap-publish")
        assert ok.json()["trials"]["results"][0]["status"] == "passed"


def test_a_self_asserted_verified_publisher_is_never_recorded_as_verified(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest(publisher={"verified": True, "identity": "github:acme",
                                                 "method": "github-org", "badge": "verified"}))
    res = cap(["publish", "--local", "--registry", REGISTRY, "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    [entry] = json.loads((pkg / REGISTRY).read_text())["packages"]
    assert entry["publisher"] == {"identity": "github:acme", "method": "github-org", "verified": False,
                                  "claimedVerified": True}
    assert entry["capabilityCard"]["publisher"]["verified"] is False
    assert '"verified": true' not in (pkg / REGISTRY).read_text()


def test_review_reports_the_failure_and_exits_non_zero(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest(id="my-tool"))
    res = cap(["review", "--json"], cwd=pkg)
    assert res.code == 1
    doc = res.json()
    assert_schema(doc, "cap-review")
    assert doc["passed"] is False and doc["blocking_failures"] == 1
    [failure] = [c for c in doc["checks"] if c["status"] == "fail"]
    assert failure["id"] == "package.id"
    [err] = res.stderr_json_lines()
    assert err["error"]["message"] == 'Package id must look like "namespace/name"'


def test_init_with_a_bad_id(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    res = cap(["init", "my-tool"], cwd=pkg)
    _fails(res, 'Package id must look like "namespace/name"', as_json=False)
    assert not (pkg / "capability.json").exists()


@pytest.mark.parametrize("command", ["publish --local", "preview", "review"])
def test_http_registry_is_refused(tmp_path: Path, cap, command: str) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    res = cap([*command.split(), "--registry", "https://registry.example/packages.json", "--json"], cwd=pkg)
    _fails(res, "Local publish commands require a filesystem registry path", as_json=True)


def test_publish_without_local_is_not_implemented(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    res = cap(["publish", "--registry", REGISTRY], cwd=pkg)
    _fails(res, "Remote publish is not implemented", as_json=False)
    assert not (pkg / "registry").exists()


def test_same_id_version_is_refused_unless_forced(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    assert cap(["publish", "--local"], cwd=pkg).code == 0
    first = (pkg / REGISTRY).read_bytes()
    for extra in ([], ["--dry-run"]):
        res = cap(["publish", "--local", *extra], cwd=pkg)
        _fails(res, "Same id@version already present: acme/my-tool@0.1.0", as_json=False)
    assert (pkg / REGISTRY).read_bytes() == first
    res = cap(["preview", "--json"], cwd=pkg)
    assert res.json()["registry"]["present"] is True
    write_manifest(pkg, base_manifest(version="0.2.0"))
    res = cap(["publish", "--local", "--json"], cwd=pkg)
    assert res.code == 0 and res.json()["packages"] == 2


@pytest.mark.parametrize(("text", "code"), [(None, "CAP_MANIFEST_NOT_FOUND"), ("{oops", "E002")])
def test_missing_or_broken_manifest(tmp_path: Path, cap, text: str | None, code: str) -> None:
    if text is not None:
        (tmp_path / "capability.json").write_text(text)
    for command in (["preview"], ["review"], ["publish", "--local"]):
        res = cap([*command, "--json"], cwd=tmp_path)
        assert res.code == 1 and res.stdout == ""
        [err] = res.stderr_json_lines()
        assert err["error"]["code"] == code


def test_malformed_registry_is_not_overwritten(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    (pkg / "registry").mkdir()
    (pkg / REGISTRY).write_text("{ not json")
    res = cap(["publish", "--local"], cwd=pkg)
    assert res.code == 1 and "registry is not valid JSON" in res.stderr
    assert (pkg / REGISTRY).read_text() == "{ not json"


@pytest.mark.parametrize("registry", ["capability.json/packages.json", "registry"])
def test_unusable_registry_location_is_a_clean_error(tmp_path: Path, cap, registry: str) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, base_manifest())
    (pkg / "registry").mkdir()
    res = cap(["publish", "--local", "--registry", registry, "--json"], cwd=pkg)
    assert res.code == 1 and res.stdout == ""
    [err] = res.stderr_json_lines()
    assert err["error"]["code"] == "CAP_IO" and "registry" in err["error"]["message"]


# --- concurrency --------------------------------------------------------------------------------

def test_parallel_publishers_do_not_lose_entries(tmp_path: Path) -> None:
    registry = tmp_path / "shared" / "packages.json"
    procs = []
    for i in range(8):
        pkg = make_package(tmp_path / f"pkg{i}", package_json=False)
        manifest = write_manifest(pkg, base_manifest(id=f"acme/tool-{i}"))
        procs.append(subprocess.Popen(
            [cli_path("cap"), "publish", "--local", "--manifest", str(manifest), "--registry", str(registry),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert_schema(json.loads(out), "cap-publish")
    ids = [e["id"] for e in json.loads(registry.read_text())["packages"]]
    assert ids == [f"acme/tool-{i}" for i in range(8)]
    assert sorted(p.name for p in registry.parent.iterdir()) == ["packages.json", "packages.json.lock"]
