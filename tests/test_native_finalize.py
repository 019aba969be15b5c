"""Finalize: a fresh derived dir per run, the parent never touched, ato-sign on Linux, codesign's
allowlisted run, and every refusal deleting its partial derived dir."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cas.canonical import canonical_json
from pipeline import native_delivery, paths
from pipeline.errors import AtoError
from pipeline.manifest.delivery import host_arch
from stages import finalize as finalize_stage
from stages import native_build
from tests.conftest import assert_schema
from tests.native_support import (
    HOST_TARGET,
    build_in_process,
    independent_tree_digest,
    mac_app_project,
    native_project,
    need_cc,
    trust,
)

FINALIZE_FIELDS = ["fetched_dir", "output_dir", "derived_app_path", "provenance_path", "parent_digest",
                   "derived_digest", "schema_version"]
PROVENANCE_FIELDS = ["schema_version", "scoped_id", "version", "registry", "artifact_blake3", "parent_digest",
                     "derived_digest", "framework", "target", "finalized_locally", "finalize_tool", "finalized_at",
                     "local_signature"]
OTHER_ARCH = "arm64" if host_arch() == "x86_64" else "x86_64"


def _build(root: Path, **kwargs) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("ATO_HOME", str(root / "home" / ".ato"))
        return Path(build_in_process(native_project(root / "proj", **kwargs))["artifact"])


@pytest.fixture(scope="module")
def native_capsule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def darwin_capsule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("darwin")
    proj = mac_app_project(root / "proj")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("ATO_HOME", str(root / "home" / ".ato"))
        return Path(build_in_process(proj)["artifact"])


def fetched(capsule_path: Path) -> Path:
    return Path(native_delivery.fetch_local(capsule_path, trust=trust())["cache_dir"])


def refused(fn, *args, **kwargs) -> AtoError:
    kwargs.setdefault("trust", trust())
    with pytest.raises(AtoError) as info:
        fn(*args, **kwargs)
    return info.value


def derived_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("derived-*")) if root.exists() else []


def test_finalize_derives_a_signed_copy_and_leaves_the_parent_alone(native_capsule: Path, tmp_path: Path) -> None:
    cache = fetched(native_capsule)
    parent_before = independent_tree_digest(cache / "artifact")
    result = finalize_stage.finalize(cache, tmp_path / "dist", trust=trust())
    doc = result.envelope
    assert list(doc) == FINALIZE_FIELDS
    assert_schema(doc, "finalize")
    out = Path(doc["output_dir"])
    assert out.parent == tmp_path / "dist" and re.fullmatch(r"derived-\d{8}T\d{6}Z-[0-9a-f]{8}", out.name)
    assert doc["derived_app_path"] == str(out / "hello") and doc["provenance_path"] == str(out / "local-derivation.json")
    assert sorted(p.name for p in out.iterdir()) == ["hello", "local-derivation.json"]
    assert (out / "hello").read_bytes() == (cache / "artifact" / "dist" / "hello").read_bytes()
    assert doc["parent_digest"] == parent_before == independent_tree_digest(cache / "artifact")
    assert doc["derived_digest"] == independent_tree_digest(out / "hello")
    prov = json.loads((out / "local-derivation.json").read_text())
    assert list(prov) == PROVENANCE_FIELDS
    assert_schema(prov, "local-derivation")
    record = json.loads((cache / "fetch.json").read_text())
    for key in ("scoped_id", "version", "registry", "artifact_blake3", "parent_digest"):
        assert prov[key] == record[key]
    assert (prov["derived_digest"], prov["framework"], prov["target"], prov["finalize_tool"]) == \
        (doc["derived_digest"], "c", HOST_TARGET, "ato-sign")
    assert prov["finalized_locally"] is True and prov["finalized_at"].endswith("Z")
    # the signature is Ed25519 over the documented statement, checkable with plain `cryptography`
    sig = prov["local_signature"]
    statement = canonical_json({"type": "ato-local-derivation/1", "parent_digest": prov["parent_digest"],
                                "derived_digest": prov["derived_digest"], "target": prov["target"]})
    Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"])).verify(
        base64.b64decode(sig["signature"]), statement)
    key = paths.keys_dir() / "local-derivation-key.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert json.loads(key.read_text())["key_id"] == sig["key_id"]
    assert finalize_stage.check_derivation(out / "hello", prov) == []


def test_two_finalizes_make_two_dirs_from_one_parent_with_one_key(native_capsule: Path, tmp_path: Path) -> None:
    cache = fetched(native_capsule)
    a = finalize_stage.finalize(cache, tmp_path / "dist", trust=trust())
    b = finalize_stage.finalize(cache, tmp_path / "dist", trust=trust())
    assert a.envelope["output_dir"] != b.envelope["output_dir"]
    assert a.envelope["parent_digest"] == b.envelope["parent_digest"]
    assert a.envelope["derived_digest"] == b.envelope["derived_digest"]
    assert a.provenance["local_signature"]["key_id"] == b.provenance["local_signature"]["key_id"]


def test_a_tampered_fetched_tree_is_refused(native_capsule: Path, tmp_path: Path) -> None:
    cache = fetched(native_capsule)
    before = independent_tree_digest(cache / "artifact")
    (cache / "artifact" / "extra.txt").write_text("injected")
    err = refused(finalize_stage.finalize, cache, tmp_path / "dist")
    assert err.code == "E208" and [p.code for p in err.problems] == ["ATO_ERR_INTEGRITY_FAILURE"]
    assert err.message.startswith(f"Fetched artifact integrity mismatch: expected {before}, got blake3:")
    assert derived_dirs(tmp_path / "dist") == []


@pytest.mark.parametrize(("host", "message"), [
    (f"linux/{OTHER_ARCH}", f"finalize target {HOST_TARGET} does not match this host's arch (linux/{OTHER_ARCH})"),
    ("darwin/arm64", f"finalize target {HOST_TARGET} does not match this host (darwin/arm64): a linux app can only "
                     "be finalized on a linux host"),
])
def test_host_target_mismatch_is_refused(native_capsule: Path, tmp_path: Path, host: str, message: str) -> None:
    err = refused(finalize_stage.finalize, fetched(native_capsule), tmp_path / "dist", host=host)
    assert (err.code, err.message) == ("E301", message)
    assert derived_dirs(tmp_path / "dist") == []


def test_a_tool_this_host_does_not_allow_is_refused(tmp_path: Path) -> None:
    art = _build(tmp_path / "b", tool="codesign", args=["--sign", "-", "dist/hello"])
    err = refused(finalize_stage.finalize, fetched(art), tmp_path / "dist")
    assert err.message == "finalize tool 'codesign' is not allowed on linux hosts (allowed: ato-sign)"
    assert derived_dirs(tmp_path / "dist") == []


def fake_codesign(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "codesign"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)


def test_codesign_missing_on_a_macos_host(darwin_capsule: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    err = refused(finalize_stage.finalize, fetched(darwin_capsule), tmp_path / "dist", host="darwin/arm64")
    assert (err.code, err.message) == ("E102", "finalize tool 'codesign' was not found on PATH")
    assert [p.code for p in err.problems] == ["ATO_ERR_ENGINE_MISSING"]
    assert derived_dirs(tmp_path / "dist") == []


def test_codesign_failure_deletes_the_partial_derived_dir(darwin_capsule: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake_codesign(tmp_path / "bin", "echo 'MyApp.app: boom' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    err = refused(finalize_stage.finalize, fetched(darwin_capsule), tmp_path / "dist", host="darwin/arm64")
    assert (err.code, err.message) == ("E102", "codesign failed with status 1: MyApp.app: boom")
    assert derived_dirs(tmp_path / "dist") == []


def test_codesign_runs_on_the_copy_with_rebased_args(darwin_capsule: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "args.txt"
    fake_codesign(tmp_path / "bin", f'pwd > "{log}"\nfor a in "$@"; do echo "$a" >> "{log}"; done\n'
                                    'mkdir -p MyApp.app/Contents/_CodeSignature\necho sig > MyApp.app/Contents/_CodeSignature/CodeResources\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    cache = fetched(darwin_capsule)
    parent = independent_tree_digest(cache / "artifact")
    doc = finalize_stage.finalize(cache, tmp_path / "dist", host="darwin/arm64", trust=trust()).envelope
    lines = log.read_text().splitlines()
    assert lines == [doc["output_dir"], "--deep", "--force", "--sign", "-", "MyApp.app"]
    prov = json.loads(Path(doc["provenance_path"]).read_text())
    assert prov["finalize_tool"] == "codesign" and "local_signature" not in prov
    assert (Path(doc["derived_app_path"]) / "Contents" / "_CodeSignature").is_dir()
    assert not (cache / "artifact" / "MyApp.app" / "Contents" / "_CodeSignature").exists()
    assert independent_tree_digest(cache / "artifact") == parent == doc["parent_digest"]
    assert doc["derived_digest"] == independent_tree_digest(Path(doc["derived_app_path"]))


def test_an_app_without_an_executable_is_refused(tmp_path: Path) -> None:
    # a capsule whose app lost its x bit (built with the build-side check switched off)
    with pytest.MonkeyPatch.context() as mp:  # not monkeypatch.undo(): that would also undo the isolated HOME
        mp.setattr(native_build, "check_app", lambda *a, **k: None)
        mp.setattr(native_build, "check_payload_input", lambda *a, **k: None)
        art = _build(tmp_path / "b", build_sh=f"set -e\nmkdir -p dist\n{need_cc()} -o dist/hello hello.c\n"
                                              "chmod 644 dist/hello\n")
    err = refused(finalize_stage.finalize, fetched(art), tmp_path / "dist")
    assert err.code == "E101" and err.message.startswith("executable bit is missing for ")
    assert derived_dirs(tmp_path / "dist") == []


def test_a_fetch_without_delivery_metadata_is_not_native(tmp_path: Path) -> None:
    from tests.e2e.registry_support import forge_capsule
    art = forge_capsule(tmp_path / "plain.capsule", "plain", "0.1.0", members=[("main.py", b"print(1)\n")])
    err = refused(finalize_stage.finalize, fetched(art), tmp_path / "dist")
    assert "has no ato.delivery.toml at its payload root" in err.message
    assert derived_dirs(tmp_path / "dist") == []


def test_check_derivation_detects_alteration(native_capsule: Path, tmp_path: Path) -> None:
    result = finalize_stage.finalize(fetched(native_capsule), tmp_path / "dist", trust=trust())
    app, prov = result.derived_app, dict(result.provenance)
    assert finalize_stage.check_derivation(app, prov) == []
    # someone re-signs with their own key: valid signature, but not this machine's key
    other = Ed25519PrivateKey.generate()
    from stages.capsule import keys as sign
    forged = dict(prov["local_signature"])
    public = other.public_key().public_bytes_raw()
    statement = finalize_stage.statement(prov["parent_digest"], prov["derived_digest"], prov["target"])
    forged.update(public_key=sign.b64(public), key_id=sign.did_key(public), signature=sign.b64(other.sign(statement)))
    assert finalize_stage.check_derivation(app, {**prov, "local_signature": forged}) == ["derived_signature_untrusted"]
    bad = dict(prov["local_signature"], signature=sign.b64(bytes(64)))
    assert finalize_stage.check_derivation(app, {**prov, "local_signature": bad}) == ["derived_signature_invalid"]
    assert finalize_stage.check_derivation(app, {k: v for k, v in prov.items() if k != "local_signature"}) == \
        ["derived_signature_missing"]
    with open(app, "ab") as fh:
        fh.write(b"\0")
    assert finalize_stage.check_derivation(app, prov) == ["derived_digest_mismatch"]
    app.unlink()
    assert finalize_stage.check_derivation(app, prov) == ["derived_app_missing"]


def test_a_local_key_readable_by_others_is_refused(native_capsule: Path, tmp_path: Path) -> None:
    cache = fetched(native_capsule)
    finalize_stage.finalize(cache, tmp_path / "dist", trust=trust())
    key = paths.keys_dir() / "local-derivation-key.json"
    key.chmod(0o644)
    err = refused(finalize_stage.finalize, cache, tmp_path / "dist2")
    assert err.message == f"the local derivation key {key} is readable by others (mode 644); expected 0600"
    assert derived_dirs(tmp_path / "dist2") == []
