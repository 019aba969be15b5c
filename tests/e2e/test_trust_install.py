"""Trust at install time, against a real `ato registry serve`: TOFU, key change, rotation, revocation, unsigned."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from cas import tempfiles
from pipeline import paths
from tests.conftest import assert_schema, cli_path, forget_local_builds
from tests.e2e.registry_support import CountingProxy
from tests.e2e.test_trust_cli import build, failure, gen_key, ok_json
from tests.test_trust_sign import make_project

SLUG = "signed-app"  # the manifest name in make_project


@pytest.fixture
def registry(tmp_path: Path):
    """A local registry on a free port, stopped (by its pid) at teardown."""
    proc = subprocess.Popen([cli_path("ato"), "registry", "serve", "--port", "0", "--json",
                             "--data-dir", str(tmp_path / "registry")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        text = ""
        for line in proc.stdout:
            text += line
            if line.rstrip() == "}":
                break
        doc = json.loads(text)
        yield doc["url"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def publish(ato, registry: str, artifact: Path, publisher: str = "acme") -> None:
    res = ato(["publish", "--registry", registry, "--artifact", str(artifact), "--scoped-id",
               f"{publisher}/{SLUG}", "--json"])
    assert res.code == 0, res.stderr


def release(ato, registry: str, tmp_path: Path, version: str, key: Path | None) -> Path:
    out = tmp_path / f"{SLUG}-{version}.capsule"
    build(ato, make_project(tmp_path / f"src-{version}", version), out, key)
    publish(ato, registry, out)
    return out


def install(ato, registry: str, *extra: str):
    return ato(["install", f"acme/{SLUG}", "--registry", registry, "--json", *extra])


def installed(version: str) -> Path:
    return paths.store_dir() / "acme" / SLUG / version / f"{SLUG}-{version}.capsule"


def test_first_install_pins_and_the_next_version_installs_silently(ato, registry: str, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    release(ato, registry, tmp_path, "1.0.0", tmp_path / "k.json")
    res = install(ato, registry)  # non-interactive first sight without --yes
    failure(res, "E301", "ATO_ERR_CONSENT_REQUIRED")
    assert not installed("1.0.0").exists() and not paths.trust_store_path().exists()
    doc = ok_json(install(ato, registry, "--yes"), "install")
    assert doc["signed"] and doc["signer"]["key_id"] == k["key_id"]
    assert doc["trust"]["status"] == "new-pin" and doc["trust"]["identity"] == "acme"
    assert installed("1.0.0").is_file()

    release(ato, registry, tmp_path, "1.1.0", tmp_path / "k.json")
    res = install(ato, registry)  # no --yes: the pinned key needs no consent
    doc = ok_json(res, "install")
    assert doc["version"] == "1.1.0" and doc["trust"]["status"] == "pinned"
    release(ato, registry, tmp_path, "1.2.0", tmp_path / "k.json")
    human = ato(["install", f"acme/{SLUG}", "--registry", registry])  # human mode: notes would show on stderr
    assert human.code == 0 and k["short_fingerprint"] in human.stdout and "1.2.0" in human.stdout
    assert "first sight" not in human.stderr and "trust" not in human.stderr.lower(), human.stderr


def test_another_key_for_the_publisher_fails_closed(ato, registry: str, tmp_path: Path) -> None:
    gen_key(ato, tmp_path / "k.json")
    other = gen_key(ato, tmp_path / "other.json")
    release(ato, registry, tmp_path, "1.0.0", tmp_path / "k.json")
    ok_json(install(ato, registry, "--yes"), "install")
    release(ato, registry, tmp_path, "1.1.0", tmp_path / "other.json")
    res = install(ato, registry, "--yes")
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert "acme is pinned to" in err["message"] and other["key_id"] in err["message"]
    assert f"ato trust pin acme {other['key_id']} --replace" in err["details"]["hint"]
    assert not installed("1.1.0").exists()
    assert not list(tempfiles.find(installed("1.1.0").parent.parent, recursive=True))


def test_rotation_inside_the_overlap_installs_and_pins_the_new_key(ato, registry: str, tmp_path: Path) -> None:
    key = tmp_path / "k.json"
    old = gen_key(ato, key)
    release(ato, registry, tmp_path, "1.0.0", key)
    ok_json(install(ato, registry, "--yes"), "install")
    new = ok_json(ato(["key", "rotate", "--key", str(key), "--overlap", "1d", "--json"]), "key")
    release(ato, registry, tmp_path, "2.0.0", key)
    res = install(ato, registry)
    doc = ok_json(res, "install")
    assert doc["trust"]["status"] == "rotated" and doc["trust"]["pinned_key"] == old["key_id"]
    assert "rotated keys" in doc["trust"]["message"] and res.stderr == ""  # --json: no notes on stderr
    ls = ok_json(ato(["trust", "ls", "--json"]), "trust")
    assert ls["identities"][0]["key_id"] == new["key_id"] and ls["identities"][0]["via"] == "rotation"


def test_revoked_key_fails_even_for_an_installed_version(ato, registry: str, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    release(ato, registry, tmp_path, "1.0.0", tmp_path / "k.json")
    ok_json(install(ato, registry, "--yes"), "install")
    lst = tmp_path / "revoked.json"
    lst.write_text(json.dumps({"revoked": [{"id": k["key_id"], "reason": "key leaked"}]}))
    ok_json(ato(["trust", "revoke", "--from", str(lst), "--json"]), "trust")
    res = install(ato, registry)  # already installed: re-verified, refused
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert "revoked (key leaked)" in err["message"]
    res = ato(["verify", f"acme/{SLUG}", "--json"])
    failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert_schema(res.json(), "verify")


def test_unsigned_needs_allow_unsigned_and_is_reported(ato, registry: str, tmp_path: Path) -> None:
    release(ato, registry, tmp_path, "1.0.0", None)
    forget_local_builds()  # the consumer is another machine
    res = install(ato, registry, "--yes")
    failure(res, "E301", "ATO_ERR_POLICY_VIOLATION")
    assert not installed("1.0.0").exists()
    doc = ok_json(install(ato, registry, "--allow-unsigned"), "install")
    assert doc["signed"] is False and doc["signer"] is None and doc["trust"]["status"] == "unsigned"
    human = ato(["install", f"acme/{SLUG}", "--registry", registry, "--allow-unsigned"])
    assert human.code == 0 and "unsigned" in human.stdout


def test_publish_signs_with_the_publisher_key(ato, registry: str, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "publisher.json")
    project = make_project(tmp_path / "src", "3.0.0")
    res = ato(["publish", "--registry", registry, "--scoped-id", f"acme/{SLUG}", "--key", str(tmp_path / "publisher.json"),
               "--json"], cwd=project)
    assert res.code == 0, res.stderr
    doc = ok_json(install(ato, registry, "--yes"), "install")
    assert doc["version"] == "3.0.0" and doc["signed"] and doc["signer"]["key_id"] == k["key_id"]
    res = ato(["publish", "--registry", registry, "--artifact", str(installed("3.0.0")), "--key",
               str(tmp_path / "publisher.json")])
    assert res.code == 1 and "ato sign" in res.stderr


def _big_release(ato, registry: str, tmp_path: Path, version: str, key: Path | None) -> Path:
    """A release whose payload (3 MB of random bytes) dwarfs its skeleton."""
    project = make_project(tmp_path / f"src-{version}", version)
    (project / "blob.bin").write_bytes(os.urandom(3 << 20))
    out = tmp_path / f"{SLUG}-{version}.capsule"
    build(ato, project, out, key)
    publish(ato, registry, out)
    shutil.rmtree(paths.cas_root())  # the consumer is another machine: none of the chunks are local
    return out


def test_install_decides_trust_before_it_downloads_the_payload(ato, registry: str, tmp_path: Path) -> None:
    """An unsigned artifact, or a first-seen signer without consent, is refused from the skeleton (its small
    members): no payload chunk crosses the wire, and nothing is stored."""
    unsigned = _big_release(ato, registry, tmp_path, "1.0.0", None)
    forget_local_builds()  # the consumer is another machine
    proxy = CountingProxy(registry)
    try:
        failure(install(ato, proxy.url), "E301", "ATO_ERR_POLICY_VIOLATION")
        assert proxy.down < unsigned.stat().st_size // 10, (proxy.down, unsigned.stat().st_size)
        assert not installed("1.0.0").exists()
        proxy.reset()
        ok_json(install(ato, proxy.url, "--allow-unsigned"), "install")
        assert proxy.down > 3 << 20  # now the payload came

        gen_key(ato, tmp_path / "k.json")
        signed = _big_release(ato, registry, tmp_path, "2.0.0", tmp_path / "k.json")
        proxy.reset()
        failure(install(ato, proxy.url), "E301", "ATO_ERR_CONSENT_REQUIRED")  # first sight, no --yes
        assert proxy.down < signed.stat().st_size // 10, (proxy.down, signed.stat().st_size)
        assert not installed("2.0.0").exists() and not paths.trust_store_path().exists()
    finally:
        proxy.close()


def test_an_unsigned_artifact_of_a_pinned_publisher_is_refused_even_with_allow_unsigned(
        ato, registry: str, tmp_path: Path) -> None:
    """Stripping the signature is a downgrade: E208 naming the pinned key and how to forget it."""
    k = gen_key(ato, tmp_path / "k.json")
    release(ato, registry, tmp_path, "1.0.0", tmp_path / "k.json")
    ok_json(install(ato, registry, "--yes"), "install")
    unsigned = _big_release(ato, registry, tmp_path, "1.1.0", None)
    forget_local_builds()
    proxy = CountingProxy(registry)
    try:
        res = install(ato, proxy.url, "--allow-unsigned", "--yes")
        err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
        assert "acme is pinned to" in err["message"] and k["key_id"] in err["message"]
        assert "ato trust forget acme" in err["details"]["hint"]
        assert proxy.down < unsigned.stat().st_size // 10
        assert not installed("1.1.0").exists()
    finally:
        proxy.close()
    human = ato(["verify", str(unsigned), "--allow-unsigned", "--identity", "acme"])
    assert human.code == 1 and "error[E208]: " in human.stderr and "ato trust forget acme" in human.stderr
    ok_json(ato(["trust", "forget", "acme", "--json"]), "trust")
    doc = ok_json(install(ato, registry, "--allow-unsigned"), "install")  # the user chose to forget the pin
    assert doc["version"] == "1.1.0" and doc["trust"]["status"] == "unsigned"
