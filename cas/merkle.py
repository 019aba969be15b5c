"""Merkle root over chunk digests (CONTRACTS.md §2).

Pairs ``blake3(left || right)`` of 32-byte digests, an odd last node pairs with
itself, empty list -> blake3(""), one chunk -> that chunk.
"""

from __future__ import annotations

import blake3


def merkle_root(chunk_hexes: list[str]) -> str:
    if not chunk_hexes:
        return blake3.blake3(b"").hexdigest()
    level = [bytes.fromhex(h) for h in chunk_hexes]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [blake3.blake3(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0].hex()
