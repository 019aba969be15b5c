"""Trust: who signed an artifact, and whether this machine accepts that signer for it.

The model is seed 003's: TOFU plus fingerprint pinning plus a revocation list, petnames linked
to the trust store's key ids, and key rotation with a short ``previous_key`` overlap. A signature
mismatch is never allowed "just this once": it fails closed until a person re-verifies the new
key and pins it (``ato trust pin``).

Identity
    An *identity* is the name an artifact claims to come from, the thing a key is pinned for:

    * ``<publisher>`` (e.g. ``acme``) for anything resolved through a registry or the local store
      as ``publisher/slug``: a publisher signs all its capsules with one key, the way one host
      has one SSH host key, so a new capsule from a known publisher is held to the pinned key;
    * ``capsule:<name>`` (the artifact manifest's ``name``) for a bare ``.capsule`` file that comes
      with no publisher;
    * whatever ``--identity`` names, which overrides both.

    Keys are named by ``did:key`` (the key itself); fingerprints (SHA-256 of the raw public key)
    and petnames are ways for people to refer to a key, resolved through the store.

Decisions (:mod:`pipeline.trust.policy`), in this order, after every digest and the signature hold:
    unsigned          refused unless ``--allow-unsigned``; reported ``signed: false`` everywhere. An
                      identity with a pinned key refuses unsigned artifacts (E208) even then: a stripped
                      signature is a downgrade. (Bytes this ATO_HOME built itself stay ``local-build``.)
    revoked key       refused, even for artifacts installed before the revocation.
    first sight       TOFU: pin the signer for the identity, after a prompt on a TTY or ``--yes``;
                      refused when non-interactive without ``--yes``.
    pinned key        accepted silently.
    retired key       (the key pinned before a rotation) accepted until the overlap ends.
    rotation          another key, carrying a ``previous_key`` proof signed by the pinned key,
                      inside the proof's overlap window: accepted, and the new key is pinned.
    anything else     refused with E208 / ATO_ERR_INTEGRITY_FAILURE and the re-verification step.

Files: :mod:`.store` (``~/.capsule/trust_store.json``, locked, atomically replaced, corruption
reported and never reset), :mod:`.keys` (generation, rotation, key references),
:mod:`.revocation` (lists from files or URLs), :mod:`.policy` (the decision),
:mod:`.verify` (artifact checks + decision, for ``verify``, ``install`` and ``run``).
"""
