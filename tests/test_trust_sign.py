"""signature.json: keys, did:key, signing, and checking every byte of an artifact (stages/capsule, stages/sign.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.errors import AtoError
from pipeline.graph import run_build
from stages.build import BuildOptions, plan_build
from stages.capsule import NO_CEILING, read_capsule, verify
from stages.capsule import keys as sign
from stages.capsule.signature import check_signature
from stages.sign import sign_artifact

MANIFEST = """\
schema_version = "0.2"
name = "signed-app"
version = "1.0.0"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "main.py"
"""

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def make_project(root: Path, version: str = "1.0.0") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "capsule.toml").write_text(MANIFEST.replace('version = "1.0.0"', f'version = "{version}"'))
    (root / "main.py").write_text("print('hi')\n")
    (root / "data.bin").write_bytes(os.urandom(3000))
    (root / "README.md").write_text("# signed\n")
    return root


def build(project: Path, out: Path, key: sign.SigningKey | None = None, epoch: int = 0) -> Path:
    run_build(plan_build(project, BuildOptions(out=out, epoch=epoch, signing_key=key)))
    return out


@pytest.fixture
def key(tmp_path: Path) -> sign.SigningKey:
    k = sign.generate_key()
    sign.write_key_file(tmp_path / "key.json", k)
    return sign.load_signing_key(tmp_path / "key.json")


def first_failure(verdict):
    return next((c for c in verdict.checks if c.status == "failed"), None)


def member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tf:
        return tf.extractfile(name).read()


# ---------------------------------------------------------------- keys and did:key


def independent_b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        n = n * 58 + B58.index(c)
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + raw


def test_did_key_is_multicodec_ed25519_base58btc(key: sign.SigningKey) -> None:
    did = key.did
    assert did.startswith("did:key:z6Mk")
    raw = independent_b58decode(did[len("did:key:z"):])
    assert raw[:2] == b"\xed\x01" and raw[2:] == key.public and len(raw) == 34
    assert sign.public_from_did(did) == key.public
    assert key.fingerprint == hashlib.sha256(key.public).hexdigest()
    assert sign.short_fingerprint(key.fingerprint) == ":".join(key.fingerprint[i:i + 4] for i in range(0, 16, 4))


def test_did_key_known_vector() -> None:
    # The all-zero public key: multicodec 0xed01 + 32 zero bytes, base58btc.
    assert sign.did_key(b"\0" * 32) == "did:key:z6MkeTG3bFFSLYVU7VqhgZxqr6YzpaGrQtFMh1uvqGy1vDnP"
    with pytest.raises(ValueError):
        sign.public_from_did("did:key:z6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc")  # x25519, not ed25519
    for bad in ("did:web:example.com", "did:key:zzzz", "did:key:z0OIl"):
        assert not sign.is_did(bad)


def test_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "k.json"
    k = sign.generate_key()
    sign.write_key_file(path, k)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    with pytest.raises(AtoError) as err:
        sign.write_key_file(path, sign.generate_key())
    assert "--force" in (err.value.hint or "")
    assert path.read_bytes() == before
    sign.write_key_file(path, sign.generate_key(), force=True)
    assert path.read_bytes() != before and path.stat().st_mode & 0o777 == 0o600


def test_key_formats_raw_pem_json_and_mismatch(tmp_path: Path) -> None:
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    (tmp_path / "raw.key").write_bytes(seed)
    (tmp_path / "k.pem").write_bytes(priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    a = sign.load_signing_key(tmp_path / "raw.key")
    b = sign.load_signing_key(tmp_path / "k.pem")
    assert a.did == b.did
    doc = a.to_file_json()
    doc["public_key"] = base64.b64encode(sign.generate_key().public).decode()
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(AtoError) as err:
        sign.load_signing_key(tmp_path / "bad.json")
    assert err.value.code == "E100" and "does not belong" in err.value.message
    with pytest.raises(AtoError) as err:
        sign.load_signing_key(tmp_path / "missing.json")
    assert err.value.code == "E201"
    (tmp_path / "short.key").write_bytes(b"x" * 31)
    with pytest.raises(AtoError):
        sign.load_signing_key(tmp_path / "short.key")


# ---------------------------------------------------------------- sign -> verify


def test_signed_build_verifies_and_is_reproducible(tmp_path: Path, key: sign.SigningKey) -> None:
    project = make_project(tmp_path / "p")
    a = build(project, tmp_path / "a.capsule", key)
    b = build(project, tmp_path / "b.capsule", key)
    assert a.read_bytes() == b.read_bytes()
    check = verify(a, NO_CEILING)
    assert check.ok, check.checks
    assert [c.name for c in check.checks] == ["archive", "members", "signature", "digests"]
    assert check.signature.signed and check.signature.key_id == key.did
    doc = json.loads(member(a, "signature.json"))
    assert doc["signed_at"] == "1970-01-01T00:00:00Z" and doc["alg"] == "ed25519" and doc["version"] == 1
    assert set(doc["members"]) == {"capsule.toml", "capsule.lock.json", "sbom.spdx.json", "payload.v3.manifest.json",
                                   "README.md"}


def test_signed_at_comes_from_the_build_epoch(tmp_path: Path, key: sign.SigningKey) -> None:
    a = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", key, epoch=1_700_000_000)
    assert json.loads(member(a, "signature.json"))["signed_at"] == "2023-11-14T22:13:20Z"


def test_sign_after_build_equals_build_with_key(tmp_path: Path, key: sign.SigningKey) -> None:
    project = make_project(tmp_path / "p")
    signed = build(project, tmp_path / "signed.capsule", key, epoch=1234)
    unsigned = build(project, tmp_path / "unsigned.capsule", epoch=1234)
    assert not verify(unsigned, NO_CEILING).signature.signed
    before = {n: member(unsigned, n) for n in ("capsule.toml", "payload.tar.zst", "capsule.lock.json")}
    sign_artifact(unsigned, key)
    assert unsigned.read_bytes() == signed.read_bytes()
    assert {n: member(unsigned, n) for n in before} == before


def test_sign_refuses_a_broken_artifact(tmp_path: Path, key: sign.SigningKey) -> None:
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule")
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 1
    art.write_bytes(bytes(data))
    with pytest.raises(AtoError) as err:
        sign_artifact(art, key)
    assert err.value.code == "E208" and "refusing to sign" in err.value.message
    assert art.read_bytes() == bytes(data)


def test_openssl_verifies_the_signature_over_the_jcs_bytes(tmp_path: Path, key: sign.SigningKey) -> None:
    """A second Ed25519 implementation (OpenSSL) accepts the signature over RFC 8785 bytes."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", key)
    raw = member(art, "signature.json")
    doc = json.loads(raw)
    assert rfc8785.dumps(doc) == raw  # the member itself is JCS
    signed = {k: v for k, v in doc.items() if k != "signature"}
    for field in ("version", "alg", "key_id", "signed_at", "manifest_hash", "payload_hash"):
        assert field in signed
    (tmp_path / "msg.bin").write_bytes(rfc8785.dumps(signed))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(doc["signature"]))
    public = independent_b58decode(doc["key_id"][len("did:key:z"):])[2:]
    spki = bytes.fromhex("302a300506032b6570032100") + public  # SubjectPublicKeyInfo for Ed25519 (RFC 8410)
    (tmp_path / "pub.der").write_bytes(spki)

    def verify(msg: str) -> subprocess.CompletedProcess:
        return subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.der"),
                               "-keyform", "DER", "-rawin", "-in", str(tmp_path / msg),
                               "-sigfile", str(tmp_path / "sig.bin")], capture_output=True, text=True)

    ok = verify("msg.bin")
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stdout + ok.stderr
    tampered = json.loads(rfc8785.dumps(signed))
    tampered["payload_hash"] = "blake3:" + "0" * 64
    (tmp_path / "bad.bin").write_bytes(rfc8785.dumps(tampered))
    assert verify("bad.bin").returncode != 0


# ---------------------------------------------------------------- one flipped byte anywhere


def regions(path: Path) -> list[tuple[str, int]]:
    """(label, offset) for a byte in every region: each header, member data, padding, end of archive."""
    layout = read_capsule(path).layout
    out = []
    for name, at, size in ((m.name, m.offset, m.size) for m in layout.members):
        out.append((f"{name} header", at - 512 + 105))  # inside the mode field
        out.append((f"{name} data start", at))
        out.append((f"{name} data middle", at + size // 2))
        out.append((f"{name} data end", at + size - 1))
        if size % 512:
            out.append((f"{name} padding", at + size + 3))
    last_at, last_size = layout.members[-1].offset, layout.members[-1].size
    end = last_at + last_size + (-(last_at + last_size)) % 512
    out.append(("end-of-archive marker", end + 7))
    out.append(("record padding", path.stat().st_size - 1))
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_any_flipped_byte_fails_and_names_what_broke(tmp_path: Path, key: sign.SigningKey, signed: bool) -> None:
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", key if signed else None)
    good = art.read_bytes()
    bad_path = tmp_path / "bad.capsule"
    seen = set()
    for where, offset in regions(art):
        for flip in (0x01, 0x80):
            data = bytearray(good)
            data[offset] ^= flip
            bad_path.write_bytes(bytes(data))
            check = verify(bad_path, NO_CEILING)
            failure = first_failure(check)
            assert failure is not None, f"flip {flip:#x} at {where} (offset {offset}) went unnoticed"
            err = check.error
            assert err.code == "E208" and failure.name in err.message
            name = where.split(" ")[0]
            if "header" in where or "padding" in where or "archive" in where:
                assert failure.name == "archive", (where, failure)
            elif name in ("capsule.toml", "capsule.lock.json", "sbom.spdx.json", "payload.v3.manifest.json",
                          "README.md"):
                assert failure.name == "members" and name in failure.message, (where, failure)
            elif name == "payload.tar.zst":
                assert failure.name == "digests" and "payload" in failure.message, (where, failure)
            else:
                assert name == "signature.json" and failure.name in ("members", "signature"), (where, failure)
            seen.add(failure.name)
    assert {"archive", "members", "digests"} <= seen


def test_appended_and_truncated_bytes_fail(tmp_path: Path) -> None:
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule")
    good = art.read_bytes()
    art.write_bytes(good + b"\0" * 512)
    assert first_failure(verify(art, NO_CEILING)).name == "archive"
    art.write_bytes(good[:-512])
    assert first_failure(verify(art, NO_CEILING)).name == "archive"


def test_resigned_by_someone_else_still_verifies_but_as_their_key(tmp_path: Path, key: sign.SigningKey) -> None:
    """Replacing signature.json with another valid signature is not an integrity failure: trust decides."""
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", key)
    other = sign.generate_key()
    sign_artifact(art, other)
    check = verify(art, NO_CEILING)
    assert check.ok and check.signature.key_id == other.did != key.did


def test_signature_over_altered_fields_fails(tmp_path: Path, key: sign.SigningKey) -> None:
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", key)
    doc = json.loads(member(art, "signature.json"))
    doc["signed_at"] = "2030-01-01T00:00:00Z"
    with pytest.raises(AtoError) as err:
        check_signature(doc)
    assert err.value.code == "E208" and "does not verify" in err.value.message


# ---------------------------------------------------------------- rotation proofs


def test_rotation_proof_binds_old_key_new_key_and_window() -> None:
    old, new = sign.generate_key(), sign.generate_key()
    proof = sign.make_rotation_proof(old, new.did, 1_000, 1_000 + 3600)
    sign.check_rotation_proof(proof, new.did)
    with pytest.raises(ValueError):
        sign.check_rotation_proof(proof, sign.generate_key().did)  # vouches for another key
    stretched = dict(proof, overlap_until="2099-01-01T00:00:00Z")
    with pytest.raises(ValueError):
        sign.check_rotation_proof(stretched, new.did)  # the new key cannot extend its own window
    new.previous_key = proof
    assert new.attached_previous_key(now=2000) == proof
    assert new.attached_previous_key(now=1_000 + 3601) is None
