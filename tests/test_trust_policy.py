"""The trust decision: TOFU pins, key mismatch, rotation overlap, revocation, unsigned (pipeline/trust)."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from pipeline.errors import AtoError
from pipeline.trust import policy, revocation
from pipeline.trust import store as trust_store
from pipeline.trust.keys import parse_duration
from pipeline.trust.verify import VerifyOptions, require_verified, verify_artifact
from stages.capsule import keys as sign
from stages.capsule.signature import SignatureInfo
from tests.conftest import assert_schema
from tests.test_trust_sign import build, make_project

NOW = 1_800_000_000.0
HOUR = 3600


def signed_by(key: sign.SigningKey, proof: dict | None = None) -> SignatureInfo:
    return SignatureInfo(True, key.did, "1970-01-01T00:00:00Z", proof)


def rotated(old: sign.SigningKey, at: float, overlap: float) -> sign.SigningKey:
    new = sign.generate_key()
    new.previous_key = sign.make_rotation_proof(old, new.did, at, at + overlap)
    return new


def decide(sig: SignatureInfo | None, identity: str = "acme", **kw) -> policy.Decision:
    return policy.decide(trust_store.load(), identity=identity, signature=sig, now=kw.pop("now", NOW), **kw)


def apply(decision: policy.Decision) -> None:
    with trust_store.transaction() as store:
        c = decision.change
        store.pin(c["identity"], c["key_id"], c["via"], c["previous"])


def pin(identity: str, key: sign.SigningKey) -> None:
    with trust_store.transaction() as store:
        store.pin(identity, key.did, "pin")


def test_first_sight_needs_consent_then_pins_and_same_key_is_silent() -> None:
    k = sign.generate_key()
    d = decide(signed_by(k))
    assert d.status == "new-pin" and d.needs_consent and d.change["key_id"] == k.did
    with pytest.raises(AtoError) as err:  # non-interactive, no --yes
        policy.settle(d, consent=None, assume_yes=False, decide_again=lambda s: d)
    assert err.value.code == "E301" and err.value.problems[0].code == "ATO_ERR_CONSENT_REQUIRED"
    assert "--yes" in err.value.hint and trust_store.load().pinned("acme") is None
    asked = []
    settled = policy.settle(d, consent=lambda q: asked.append(q) or True, assume_yes=False,
                            decide_again=lambda s: policy.decide(s, identity="acme", signature=signed_by(k), now=NOW))
    assert asked and k.did in asked[0] and settled.status == "new-pin"
    assert trust_store.load().pinned("acme")["key_id"] == k.did
    again = decide(signed_by(k))
    assert again.status == "pinned" and again.change is None and not again.needs_consent


def test_other_key_for_a_pinned_identity_fails_closed_with_next_action() -> None:
    k, other = sign.generate_key(), sign.generate_key()
    pin("acme", k)
    with pytest.raises(AtoError) as err:
        decide(signed_by(other))
    e = err.value
    assert e.code == "E208" and e.problems[0].code == "ATO_ERR_INTEGRITY_FAILURE"
    assert k.did in e.message and other.did in e.message
    assert f"ato trust pin acme {other.did} --replace" in e.hint and "no temporary allowance" in e.hint
    assert e.details["reason"] == "key-mismatch"
    assert trust_store.load().pinned("acme")["key_id"] == k.did  # nothing changed
    assert decide(signed_by(other), identity="other-publisher").status == "new-pin"  # identities are separate


def test_rotation_inside_the_overlap_pins_the_new_key() -> None:
    old = sign.generate_key()
    pin("acme", old)
    new = rotated(old, NOW - HOUR, 48 * HOUR)
    d = decide(signed_by(new, new.previous_key))
    assert d.status == "rotated" and not d.needs_consent and d.change["previous"]["key_id"] == old.did
    apply(d)
    rec = trust_store.load().pinned("acme")
    assert rec["key_id"] == new.did and rec["via"] == "rotation"
    assert decide(signed_by(new)).status == "pinned"  # later signatures need no proof
    assert decide(signed_by(old)).status == "previous-key"  # the old key coexists until the overlap ends
    with pytest.raises(AtoError) as err:
        decide(signed_by(old), now=NOW + 48 * HOUR)
    assert err.value.code == "E208" and err.value.details["reason"] == "previous-key-expired"


def test_rotation_outside_the_overlap_fails() -> None:
    old = sign.generate_key()
    pin("acme", old)
    new = rotated(old, NOW - 10 * HOUR, HOUR)
    with pytest.raises(AtoError) as err:
        decide(signed_by(new, new.previous_key))
    assert err.value.code == "E208" and err.value.details["reason"] == "rotation-overlap-ended"
    assert "ato trust pin acme" in err.value.hint
    assert trust_store.load().pinned("acme")["key_id"] == old.did


def test_rotation_vouched_for_by_a_key_that_is_not_pinned_fails() -> None:
    pinned, stranger = sign.generate_key(), sign.generate_key()
    pin("acme", pinned)
    new = rotated(stranger, NOW, HOUR)
    with pytest.raises(AtoError) as err:
        decide(signed_by(new, new.previous_key))
    assert err.value.details["reason"] == "key-mismatch"


def test_rotation_vouched_for_by_a_revoked_key_fails() -> None:
    old = sign.generate_key()
    pin("acme", old)
    with trust_store.transaction() as s:
        s.revoke(old.did, "stolen", "local")
    new = rotated(old, NOW, HOUR)
    with pytest.raises(AtoError) as err:
        decide(signed_by(new, new.previous_key))
    assert err.value.details["reason"] == "rotation-by-revoked-key"


def test_revoked_key_fails_even_when_pinned_by_did_or_fingerprint_or_extra_list() -> None:
    k = sign.generate_key()
    pin("acme", k)
    assert decide(signed_by(k)).status == "pinned"
    with pytest.raises(AtoError) as err:
        decide(signed_by(k), extra_revoked=(k.fingerprint,))
    assert err.value.code == "E208" and err.value.details["reason"] == "revoked"
    with trust_store.transaction() as s:
        s.revoke(k.fingerprint, "compromised", "local")
    with pytest.raises(AtoError) as err:
        decide(signed_by(k))
    assert "revoked (compromised)" in err.value.message
    with pytest.raises(AtoError):  # --signer does not bypass revocation
        decide(signed_by(k), expected_signer=k.did)


def test_unsigned_is_refused_unless_allowed() -> None:
    with pytest.raises(AtoError) as err:
        decide(SignatureInfo(False))
    assert err.value.code == "E301" and "--allow-unsigned" in err.value.hint
    assert err.value.problems[0].code == "ATO_ERR_POLICY_VIOLATION"
    d = decide(SignatureInfo(False), allow_unsigned=True)
    assert d.status == "unsigned" and d.key_id is None and d.change is None


def test_a_pinned_publisher_never_accepts_a_stripped_signature() -> None:
    """Unsigned under a pinned identity is a downgrade: E208 naming the pin, whatever --allow-unsigned says."""
    k = sign.generate_key()
    pin("acme", k)
    for allow in (False, True):
        with pytest.raises(AtoError) as err:
            decide(SignatureInfo(False), allow_unsigned=allow)
        assert err.value.code == "E208" and err.value.details["reason"] == "unsigned-but-pinned"
        assert k.did in err.value.message and "ato trust forget acme" in err.value.hint
        assert err.value.problems[0].code == "ATO_ERR_INTEGRITY_FAILURE"
    assert decide(SignatureInfo(False), identity="other", allow_unsigned=True).status == "unsigned"
    # the exact bytes this ATO_HOME built are its own, pinned publisher or not
    assert decide(SignatureInfo(False), built_here=True).status == "local-build"


def test_expected_signer() -> None:
    k, other = sign.generate_key(), sign.generate_key()
    assert decide(signed_by(k), expected_signer=k.did).status == "expected-signer"
    with pytest.raises(AtoError) as err:
        decide(signed_by(other), expected_signer=k.did)
    assert err.value.details["reason"] == "signer-mismatch"
    assert trust_store.load().pinned("acme") is None


def test_identity_rules() -> None:
    assert policy.identity_for(scoped_id="acme/app", name="x") == "acme"
    assert policy.identity_for(name="hello") == "capsule:hello"
    assert policy.identity_for(explicit="team@example", scoped_id="acme/app") == "team@example"
    with pytest.raises(AtoError):
        policy.identity_for(explicit="has space")


def test_durations() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("7d") == 7 * 86400
    for bad in ("", "7x", "-1d", "400d"):
        with pytest.raises(AtoError):
            parse_duration(bad)


# ---------------------------------------------------------------- the verify flow on real artifacts


def test_verify_flow_pins_then_passes_silently_then_fails_on_key_change(tmp_path: Path) -> None:
    k, other = sign.generate_key(), sign.generate_key()
    v1 = build(make_project(tmp_path / "p1", "1.0.0"), tmp_path / "v1.capsule", k)
    v2 = build(make_project(tmp_path / "p2", "1.1.0"), tmp_path / "v2.capsule", k)
    v3 = build(make_project(tmp_path / "p3", "1.2.0"), tmp_path / "v3.capsule", other)
    first = verify_artifact(v1, scoped_id="acme/app")
    assert first.error is not None and first.error.code == "E301"  # no consent, no pin
    assert_schema(first.report, "verify")
    first = require_verified(v1, scoped_id="acme/app", options=VerifyOptions(assume_yes=True))
    assert first.report["trust"]["status"] == "new-pin" and first.notes
    second = require_verified(v2, scoped_id="acme/app")
    assert second.report["trust"]["status"] == "pinned" and not second.notes
    assert_schema(second.report, "verify")
    third = verify_artifact(v3, scoped_id="acme/app", options=VerifyOptions(assume_yes=True))
    assert third.error.code == "E208" and not third.report["ok"]
    assert third.report["trust"]["status"] == "rejected" and third.report["checks"][-1]["status"] == "failed"
    assert_schema(third.report, "verify")


def test_verify_flow_never_pins_a_broken_artifact(tmp_path: Path) -> None:
    art = build(make_project(tmp_path / "p"), tmp_path / "a.capsule", sign.generate_key())
    data = bytearray(art.read_bytes())
    data[-20000 if len(data) > 20000 else len(data) // 2] ^= 1
    art.write_bytes(bytes(data))
    out = verify_artifact(art, scoped_id="acme/app", options=VerifyOptions(assume_yes=True))
    assert out.error.code == "E208" and out.report["trust"]["status"] == "not-checked"
    assert out.error.problems[0].code == "ATO_ERR_INTEGRITY_FAILURE"
    assert trust_store.load().pinned("acme") is None
    assert_schema(out.report, "verify")


# ---------------------------------------------------------------- revocation lists


def test_revocation_list_from_a_file_is_merged_and_honoured(tmp_path: Path) -> None:
    k, other = sign.generate_key(), sign.generate_key()
    pin("acme", k)
    lst = tmp_path / "revoked.json"
    lst.write_text(json.dumps({"revoked": [k.did, {"id": other.fingerprint, "reason": "lost laptop"}]}))
    with trust_store.transaction() as s:
        assert revocation.merge(s, str(lst), revocation.load_entries(str(lst))) == 2
    with trust_store.transaction() as s:
        assert revocation.merge(s, str(lst), revocation.load_entries(str(lst))) == 0  # idempotent
    for key in (k, other):
        with pytest.raises(AtoError) as err:
            decide(signed_by(key))
        assert err.value.details["reason"] == "revoked"
    entry = trust_store.load().revocation(other.did)
    assert entry["source"] == str(lst) and entry["reason"] == "lost laptop"


@pytest.mark.parametrize("body", ['{"revoked": "x"}', "not json", '{"revoked": ["did:key:zBAD"]}', "[]"])
def test_malformed_revocation_list_is_rejected_not_ignored(tmp_path: Path, body: str) -> None:
    lst = tmp_path / "r.json"
    lst.write_text(body)
    with pytest.raises(AtoError):
        revocation.load_entries(str(lst))


def test_revocation_list_from_a_url(tmp_path: Path) -> None:
    k = sign.generate_key()
    body = json.dumps({"revoked": [{"id": k.did, "reason": "registry says so"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/revocations":
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        entries = revocation.load_entries(base + "/v1/revocations")
        assert [(e.id, e.reason) for e in entries] == [(k.did, "registry says so")]
        with pytest.raises(AtoError) as err:  # an unreachable list is an error, never an empty list
            revocation.load_entries(base + "/missing")
        assert err.value.exit_code == 3
    finally:
        server.shutdown()
