"""Per-consumer tokens: minted by the broker, unguessable, checked on every call, revoked when the consumer stops.

A token is 32 random bytes (``secrets``), hex-encoded, handed to exactly one consumer for exactly
one import (``CAPSULE_IPC_<ALIAS>_TOKEN``). The broker keeps only its SHA-256, so neither memory
dumps of the table nor the state file ``ato ps`` reads hold a usable token, and compares in
constant time. A token is refused when it is missing or unknown, when it was issued to another
consumer or for another import than the endpoint it arrives on, and after it was revoked (the
consumer stopped): a replayed token never works again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from pipeline.ipc.protocol import PERMISSION_DENIED, RpcError

TOKEN_BYTES = 32


@dataclass(frozen=True)
class Grant:
    consumer: str
    alias: str
    key: str  # the provider instance it reaches


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenTable:
    def __init__(self) -> None:
        self._live: dict[bytes, Grant] = {}
        self._revoked: set[bytes] = set()

    def mint(self, grant: Grant) -> str:
        token = secrets.token_hex(TOKEN_BYTES)
        self._live[_digest(token)] = grant
        return token

    def check(self, token: object, consumer: str, alias: str) -> Grant:
        """The grant behind ``token`` if it was issued to ``consumer`` for ``alias``; RpcError(-32001) otherwise."""
        if not isinstance(token, str) or not token:
            raise RpcError(PERMISSION_DENIED, "permission denied: no token",
                           f"send params.token (the value of the consumer's CAPSULE_IPC_{alias.upper()}_TOKEN)")
        digest = _digest(token)
        grant = None
        for known, g in self._live.items():  # constant time per entry: no early exit on a prefix
            if hmac.compare_digest(known, digest):
                grant = g
        if grant is None:
            if any(hmac.compare_digest(r, digest) for r in self._revoked):
                raise RpcError(PERMISSION_DENIED, "permission denied: the token was revoked (its consumer stopped)")
            raise RpcError(PERMISSION_DENIED, "permission denied: unknown token")
        if not (hmac.compare_digest(grant.consumer, consumer) and grant.alias == alias):
            raise RpcError(PERMISSION_DENIED, "permission denied: the token was issued to another consumer")
        return grant

    def revoke_consumer(self, consumer: str) -> int:
        gone = [d for d, g in self._live.items() if g.consumer == consumer]
        for d in gone:
            del self._live[d]
            self._revoked.add(d)
        return len(gone)

    def live(self) -> int:
        return len(self._live)
