"""ato key / sign / verify / trust end to end, through the installed CLI."""

from __future__ import annotations

import calendar
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from pipeline import paths
from tests.conftest import assert_schema, cli_path, forget_local_builds
from tests.test_trust_sign import make_project


def ok_json(res, schema: str):
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, schema)
    return doc


def failure(res, code: str, problem: str | None = None) -> dict:
    """The --json error object on stderr (and the ATO_ERR_* line when expected)."""
    assert res.code == 1, (res.code, res.stdout, res.stderr)
    lines = res.stderr_json_lines()
    errors = [x for x in lines if "error" in x]
    assert errors and errors[-1]["error"]["code"] == code, res.stderr
    if problem:
        assert any(x.get("code") == problem for x in lines), res.stderr
    return errors[-1]["error"]


def gen_key(ato, path: Path) -> dict:
    return ok_json(ato(["key", "gen", "--out", str(path), "--json"]), "key")


def build(ato, project: Path, out: Path, key: Path | None = None) -> dict:
    args = ["build", str(project), "-o", str(out), "--json"]
    if key:
        args += ["--key", str(key)]
    return ok_json(ato(args), "build")


def install_into_store(artifact: Path, publisher: str, slug: str, version: str) -> Path:
    """Stand-in for `ato install`: the artifact where the store keeps it."""
    dest = paths.store_dir() / publisher / slug / version / f"{slug}-{version}.capsule"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact, dest)
    return dest


def test_key_gen_show_and_refusal_to_overwrite(ato, tmp_path: Path) -> None:
    doc = gen_key(ato, tmp_path / "k.json")
    assert doc["key_id"].startswith("did:key:z6Mk") and doc["path"] == str(tmp_path / "k.json")
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
    assert "secret" not in json.dumps(doc)
    res = ato(["key", "gen", "--out", str(tmp_path / "k.json")])
    assert res.code == 1 and "--force" in res.stderr
    shown = ok_json(ato(["key", "show", str(tmp_path / "k.json"), "--json"]), "key")
    assert shown["key_id"] == doc["key_id"]
    forced = ok_json(ato(["key", "gen", "--out", str(tmp_path / "k.json"), "--force", "--json"]), "key")
    assert forced["key_id"] != doc["key_id"]
    default = ok_json(ato(["--json", "key", "gen"]), "key")
    assert default["path"] == str(paths.keys_dir() / "signing-key.json")
    human = ato(["key", "show"])
    assert human.code == 0 and default["key_id"] in human.stdout and default["short_fingerprint"] in human.stdout


def test_build_with_key_then_verify_pins_and_second_version_is_silent(ato, tmp_path: Path) -> None:
    gen_key(ato, tmp_path / "k.json")
    b1 = build(ato, make_project(tmp_path / "p1", "1.0.0"), tmp_path / "v1.capsule", tmp_path / "k.json")
    assert b1["signed"] is True and b1["signer"]["key_id"].startswith("did:key:")
    v1 = install_into_store(tmp_path / "v1.capsule", "acme", "app", "1.0.0")
    res = ato(["verify", "acme/app", "--json"])  # non-interactive first sight without --yes: fail closed
    failure(res, "E301", "ATO_ERR_CONSENT_REQUIRED")
    report = res.json()
    assert_schema(report, "verify")
    assert report["ok"] is False and report["trust"]["status"] == "rejected"
    doc = ok_json(ato(["verify", "acme/app", "--yes", "--json"]), "verify")
    assert doc["ok"] and doc["artifact"] == str(v1) and doc["scoped_id"] == "acme/app"
    assert doc["trust"]["status"] == "new-pin" and doc["trust"]["identity"] == "acme"
    assert [c["status"] for c in doc["checks"]] == ["ok"] * 5
    ls = ok_json(ato(["trust", "ls", "--json"]), "trust")
    assert [(i["identity"], i["key_id"], i["via"]) for i in ls["identities"]] == [("acme", b1["signer"]["key_id"], "tofu")]

    build(ato, make_project(tmp_path / "p2", "1.1.0"), tmp_path / "v2.capsule", tmp_path / "k.json")
    install_into_store(tmp_path / "v2.capsule", "acme", "app", "1.1.0")
    res = ato(["verify", "acme/app"])
    assert res.code == 0 and res.stderr == "", res.stderr  # silent: no prompt, no note
    assert "1.1.0" in res.stdout
    doc = ok_json(ato(["verify", "acme/app", "--version", "1.0.0", "--json"]), "verify")
    assert doc["version"] == "1.0.0" and doc["trust"]["status"] == "pinned"


def test_different_key_for_the_same_identity_fails_closed_until_repinned(ato, tmp_path: Path) -> None:
    gen_key(ato, tmp_path / "k.json")
    other = gen_key(ato, tmp_path / "other.json")
    build(ato, make_project(tmp_path / "p1", "1.0.0"), tmp_path / "v1.capsule", tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p2", "2.0.0"), tmp_path / "v2.capsule", tmp_path / "other.json")
    ok_json(ato(["verify", str(tmp_path / "v1.capsule"), "--identity", "acme", "--yes", "--json"]), "verify")
    res = ato(["verify", str(tmp_path / "v2.capsule"), "--identity", "acme", "--yes", "--json"])
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert f"ato trust pin acme {other['key_id']} --replace" in err["details"]["hint"]
    report = res.json()
    assert_schema(report, "verify")
    assert report["trust"]["status"] == "rejected" and report["signed"] is True
    human = ato(["verify", str(tmp_path / "v2.capsule"), "--identity", "acme"])
    assert human.code == 1 and "error[E208]" in human.stderr and "pinned to" in human.stderr
    # re-verification: the user pins the new key explicitly (needs --replace), then it passes
    res = ato(["trust", "pin", "acme", other["key_id"]])
    assert res.code == 1 and "--replace" in res.stderr
    doc = ok_json(ato(["trust", "pin", "acme", other["key_id"], "--replace", "--petname", "acme 2026", "--json"]),
                  "trust")
    assert doc["changed"] and doc["identities"][0]["petname"] == "acme 2026"
    doc = ok_json(ato(["verify", str(tmp_path / "v2.capsule"), "--identity", "acme", "--json"]), "verify")
    assert doc["trust"]["status"] == "pinned" and doc["trust"]["petname"] == "acme 2026"


def test_rotation_inside_the_overlap_pins_the_new_key(ato, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "k.json"
    old = gen_key(ato, key)
    build(ato, make_project(tmp_path / "p1", "1.0.0"), tmp_path / "v1.capsule", key)
    ok_json(ato(["verify", str(tmp_path / "v1.capsule"), "--identity", "acme", "--yes", "--json"]), "verify")
    rot = ok_json(ato(["key", "rotate", "--key", str(key), "--overlap", "48h", "--json"]), "key")
    assert rot["previous_key"]["key_id"] == old["key_id"] and rot["retired"]["key_id"] == old["key_id"]
    assert Path(rot["retired"]["path"]).is_file() and rot["path"] == str(key)
    b2 = build(ato, make_project(tmp_path / "p2", "1.1.0"), tmp_path / "v2.capsule", key)
    assert b2["signer"]["key_id"] == rot["key_id"] and b2["signer"]["previous_key"] == old["key_id"]
    res = ato(["verify", str(tmp_path / "v2.capsule"), "--identity", "acme", "--json"])  # no --yes needed
    doc = ok_json(res, "verify")
    assert doc["trust"]["status"] == "rotated" and doc["trust"]["pinned_key"] == old["key_id"]
    assert doc["signer"]["previous_key"]["key_id"] == old["key_id"]
    ls = ok_json(ato(["trust", "ls", "--json"]), "trust")
    acme = ls["identities"][0]
    assert acme["key_id"] == rot["key_id"] and acme["via"] == "rotation" and acme["previous"]["key_id"] == old["key_id"]
    # the old key's artifacts still verify during the overlap
    doc = ok_json(ato(["verify", str(tmp_path / "v1.capsule"), "--identity", "acme", "--json"]), "verify")
    assert doc["trust"]["status"] == "previous-key"


def test_rotation_seen_after_the_overlap_fails(ato, tmp_path: Path, monkeypatch) -> None:
    # The signature must be made inside the overlap window and verified after it. On a loaded
    # machine `ato sign` may start after a short window has ended, so widen the window and start
    # over (fresh ATO_HOME) until the signing lands inside it: a condition, not a sleep.
    for overlap in (3, 10, 30, 90):
        home = tmp_path / f"overlap-{overlap}"
        monkeypatch.setenv("ATO_HOME", str(home / ".ato"))
        key = home / "k.json"
        old = gen_key(ato, key)
        build(ato, make_project(home / "p1", "1.0.0"), home / "v1.capsule", key)
        build(ato, make_project(home / "p2", "1.1.0"), home / "v2.capsule")
        ok_json(ato(["verify", str(home / "v1.capsule"), "--identity", "acme", "--yes", "--json"]), "verify")
        rot = ok_json(ato(["key", "rotate", "--key", str(key), "--overlap", f"{overlap}s", "--json"]), "key")
        ok_json(ato(["sign", str(home / "v2.capsule"), "--key", str(key), "--json"]), "sign")
        signed = json.loads(_member(home / "v2.capsule", "signature.json"))
        assert signed["key_id"] == rot["key_id"]
        if "previous_key" in signed:  # signed inside the window
            break
    else:
        pytest.fail("ato sign never ran inside a 90 s rotation overlap")
    assert signed["previous_key"]["key_id"] == old["key_id"]
    until = calendar.timegm(time.strptime(signed["previous_key"]["overlap_until"], "%Y-%m-%dT%H:%M:%SZ"))
    time.sleep(max(0.0, until - time.time()) + 1.1)  # the clock must pass the window's end
    res = ato(["verify", str(home / "v2.capsule"), "--identity", "acme", "--json"])
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert err["details"]["reason"] == "rotation-overlap-ended"
    assert ok_json(ato(["trust", "ls", "--json"]), "trust")["identities"][0]["via"] == "tofu"  # pin unchanged


def _member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tf:
        return tf.extractfile(name).read()


def test_revoked_key_fails_even_for_an_installed_artifact(ato, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p", "1.0.0"), tmp_path / "v1.capsule", tmp_path / "k.json")
    install_into_store(tmp_path / "v1.capsule", "acme", "app", "1.0.0")
    ok_json(ato(["verify", "acme/app", "--yes", "--json"]), "verify")
    ok_json(ato(["trust", "petname", k["key_id"], "acme-ci", "--json"]), "trust")
    doc = ok_json(ato(["trust", "revoke", "acme-ci", "--reason", "leaked", "--json"]), "trust")
    assert doc["revoked"][0]["id"] == k["key_id"] and doc["keys"][0]["revoked"] is True
    res = ato(["verify", "acme/app", "--json"])
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    assert "revoked (leaked)" in err["message"] and err["details"]["reason"] == "revoked"
    assert_schema(res.json(), "verify")
    res = ato(["verify", "acme/app", "--signer", k["key_id"]])  # naming the key does not bypass revocation
    assert res.code == 1 and "revoked" in res.stderr


def test_revocation_list_file_is_merged_and_refreshed(ato, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule", tmp_path / "k.json")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--yes", "--json"]), "verify")
    lst = tmp_path / "revocations.json"
    lst.write_text(json.dumps({"revoked": []}))
    ok_json(ato(["trust", "revoke", "--from", str(lst), "--json"]), "trust")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--json"]), "verify")
    lst.write_text(json.dumps({"revoked": [{"id": k["fingerprint"], "reason": "rotated out"}]}))
    # honoured for one check without being stored...
    failure(ato(["verify", str(tmp_path / "a.capsule"), "--revocations", str(lst), "--json"]), "E208")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--json"]), "verify")
    # ...and stored by refresh, which re-reads every list merged before
    doc = ok_json(ato(["trust", "refresh", "--json"]), "trust")
    assert doc["revoked"][0]["source"] == str(lst) and doc["revocation_lists"][0]["entries"] == 1
    failure(ato(["verify", str(tmp_path / "a.capsule"), "--json"]), "E208", "ATO_ERR_INTEGRITY_FAILURE")


def test_unsigned_needs_allow_unsigned_and_is_reported_unsigned(ato, tmp_path: Path) -> None:
    b = build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule")
    assert b["signed"] is False and b["signer"] is None
    local = ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--json"]), "verify")
    assert local["signed"] is False and local["trust"]["status"] == "local-build"
    forget_local_builds()
    res = ato(["verify", str(tmp_path / "a.capsule"), "--json"])
    err = failure(res, "E301", "ATO_ERR_POLICY_VIOLATION")
    assert "--allow-unsigned" in err["details"]["hint"]
    assert res.json()["signed"] is False
    doc = ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--allow-unsigned", "--json"]), "verify")
    assert doc["ok"] and doc["signed"] is False and doc["signer"] is None and doc["trust"]["status"] == "unsigned"
    human = ato(["verify", str(tmp_path / "a.capsule"), "--allow-unsigned"])
    assert human.code == 0 and "UNSIGNED" in human.stdout


def test_sign_command_rewrites_only_signature_json(ato, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule")
    before = (tmp_path / "a.capsule").read_bytes()
    doc = ok_json(ato(["sign", str(tmp_path / "a.capsule"), "--key", str(tmp_path / "k.json"), "--json"]), "sign")
    assert doc["signed"] and doc["signer"]["key_id"] == k["key_id"] and doc["artifact"] == str(tmp_path / "a.capsule")
    assert json.loads(_member(tmp_path / "a.capsule", "signature.json"))["signed"] is True
    for name in ("capsule.toml", "capsule.lock.json", "sbom.spdx.json", "payload.tar.zst", "payload.v3.manifest.json"):
        assert _member(tmp_path / "a.capsule", name) == _member_bytes(before, name)
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--signer", doc["signer"]["key_id"], "--json"]), "verify")
    assert not paths.trust_store_path().exists()  # --signer pins nothing


def _member_bytes(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.extractfile(name).read()


@pytest.mark.parametrize("where", ["capsule.lock.json", "payload.tar.zst", "signature.json", "end"])
def test_verify_names_what_broke(ato, tmp_path: Path, where: str) -> None:
    gen_key(ato, tmp_path / "k.json")
    art = tmp_path / "a.capsule"
    build(ato, make_project(tmp_path / "p"), art, tmp_path / "k.json")
    data = bytearray(art.read_bytes())
    if where == "end":
        offset = len(data) - 3
    else:
        with tarfile.open(art) as tf:
            info = tf.getmember(where)
        offset = info.offset_data + info.size // 2
    data[offset] ^= 0x04
    art.write_bytes(bytes(data))
    res = ato(["verify", str(art), "--yes", "--json"])
    err = failure(res, "E208", "ATO_ERR_INTEGRITY_FAILURE")
    report = res.json()
    assert_schema(report, "verify")
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    assert failed and failed[0]["name"] in err["message"]
    expect = {"capsule.lock.json": ("members", "capsule.lock.json"), "payload.tar.zst": ("digests", "payload"),
              "signature.json": ("members", "signature.json"), "end": ("archive", "end-of-archive")}[where]
    assert failed[0]["name"] == expect[0] or (where == "signature.json" and failed[0]["name"] == "signature")
    assert expect[1] in failed[0]["message"] or where == "signature.json"
    assert report["trust"]["status"] == "not-checked" and not paths.trust_store_path().exists()


def test_corrupted_trust_store_is_reported_by_every_command(ato, tmp_path: Path) -> None:
    gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule", tmp_path / "k.json")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--yes", "--json"]), "verify")
    store = paths.trust_store_path()
    store.write_text(store.read_text()[:-40])
    damaged = store.read_bytes()
    for args in (["trust", "ls"], ["verify", str(tmp_path / "a.capsule")], ["trust", "forget", "capsule:signed-app"]):
        res = ato([*args, "--json"])
        err = failure(res, "E208")
        assert "corrupted" in err["message"] and str(store) in err["message"]
    res = ato(["trust", "ls"])
    assert res.code == 1 and "move it aside" in res.stderr
    assert store.read_bytes() == damaged


def test_trust_forget_and_petname(ato, tmp_path: Path) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule", tmp_path / "k.json")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--yes", "--json"]), "verify")
    doc = ok_json(ato(["trust", "petname", k["short_fingerprint"], "me", "--json"]), "trust")
    assert doc["keys"][0]["petname"] == "me"
    assert "me" in ato(["trust", "ls"]).stdout
    doc = ok_json(ato(["trust", "forget", "capsule:signed-app", "--json"]), "trust")
    assert doc["identities"] == [] and doc["keys"][0]["key_id"] == k["key_id"]
    failure(ato(["verify", str(tmp_path / "a.capsule"), "--json"]), "E301", "ATO_ERR_CONSENT_REQUIRED")
    ok_json(ato(["verify", str(tmp_path / "a.capsule"), "--yes", "--json"]), "verify")
    doc = ok_json(ato(["trust", "forget", "me", "--json"]), "trust")
    assert doc["identities"] == [] and doc["keys"] == []


def test_verify_usage_errors(ato, tmp_path: Path) -> None:
    res = ato(["verify", str(tmp_path / "missing.capsule"), "--json"])
    assert res.code == 1 and "no artifact" in res.stderr
    res = ato(["verify", "acme/none", "--json"])
    assert res.code == 1 and "not installed" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("answer", ["y", "n"])
def test_first_sight_prompts_on_a_tty(ato, tmp_path: Path, answer: str) -> None:
    k = gen_key(ato, tmp_path / "k.json")
    build(ato, make_project(tmp_path / "p"), tmp_path / "a.capsule", tmp_path / "k.json")
    master, slave = os.openpty()
    proc = subprocess.Popen([cli_path("ato"), "verify", str(tmp_path / "a.capsule"), "--json"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=slave, env=dict(os.environ))
    os.close(slave)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            chunk = os.read(master, 4096)
            assert chunk, seen
            seen += chunk
        assert k["short_fingerprint"].encode() in seen and b"capsule:signed-app" in seen
        os.write(master, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    doc = json.loads(out)
    assert_schema(doc, "verify")
    if answer == "y":
        assert proc.returncode == 0 and doc["trust"]["status"] == "new-pin"
    else:
        assert proc.returncode == 1 and doc["trust"]["status"] == "rejected"
        assert not paths.trust_store_path().exists()
