"""The distribution ``capsule.toml`` inside an artifact: the project manifest plus ``[distribution]``.

``[distribution]`` holds ``manifest_hash`` (BLAKE3 of the JCS of the manifest without
``manifest_hash`` and ``signatures``), ``merkle_root`` over the chunk digests, ``chunk_list``
(``{chunk_hash, offset, length, codec, compression}`` covering the uncompressed payload tar)
and ``signatures``. :func:`check` recomputes all of it against the payload manifest.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import tomli
import tomli_w

from cas.canonical import canonical_json, jcs_digest
from cas.digest import DigestError, label, parse
from cas.merkle import merkle_root
from cas.payload_manifest import PayloadManifest
from stages.capsule.errors import CapsuleError


def distribution_manifest(normalized: dict[str, Any], payload: PayloadManifest, *,
                          source_schema_version: str | None = None) -> dict[str, Any]:
    """The project manifest plus ``[distribution]`` with chunk list, Merkle root and manifest hash.

    ``source_schema_version`` records the generation the source capsule.toml was written in
    (the stored manifest is always its normalized 0.2 or 1.x form).
    """
    offset = 0
    chunk_list = []
    for c in payload.chunks:
        chunk_list.append({"chunk_hash": label(c.raw_hash), "offset": offset, "length": c.raw_size,
                           "codec": "fastcdc", "compression": "zstd"})
        offset += c.raw_size
    doc = dict(normalized)
    doc["distribution"] = {
        "merkle_root": label(merkle_root([c.raw_hash for c in payload.chunks])),
        "chunk_list": chunk_list,
    }
    if source_schema_version is not None:
        doc["distribution"]["source_schema_version"] = source_schema_version
    doc["distribution"]["manifest_hash"] = manifest_hash(doc)
    doc["distribution"]["signatures"] = []
    return doc


def manifest_hash(doc: dict[str, Any]) -> str:
    """BLAKE3 of the JCS of the manifest without manifest_hash and signatures."""
    signable = dict(doc)
    dist = dict(signable.get("distribution") or {})
    dist.pop("manifest_hash", None)
    dist.pop("signatures", None)
    signable["distribution"] = dist
    return jcs_digest(signable)


_CHUNK_KEYS = ("chunk_hash", "offset", "length", "codec", "compression")
_CHUNK_HASH = re.compile(r"blake3:[0-9a-f]{64}\Z")


def toml_bytes(doc: dict[str, Any]) -> bytes:
    """The TOML of ``doc``: tomli_w's bytes, with the chunk list (one table per chunk) written directly.

    tomli_w is pure Python and takes tens of milliseconds for thousands of chunk tables, on every build.
    When ``[distribution]`` is the last table and its chunk list is the array of tables
    :func:`distribution_manifest` makes, tomli_w writes it last, in this exact form; anything else is
    left to tomli_w.
    """
    dist = doc.get("distribution")
    chunks = dist.get("chunk_list") if isinstance(dist, dict) else None
    if not (chunks and isinstance(chunks, list) and next(reversed(doc)) == "distribution"
            and all(type(c) is dict and tuple(c) == _CHUNK_KEYS and type(c["offset"]) is int
                    and type(c["length"]) is int and c["codec"] == "fastcdc" and c["compression"] == "zstd"
                    and type(c["chunk_hash"]) is str and _CHUNK_HASH.match(c["chunk_hash"]) for c in chunks)
            and not any(isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))
                        for k, v in dist.items() if k != "chunk_list")):
        return tomli_w.dumps(doc).encode("utf-8")
    head = tomli_w.dumps({**doc, "distribution": {k: v for k, v in dist.items() if k != "chunk_list"}})
    blocks = [f'[[distribution.chunk_list]]\nchunk_hash = "{c["chunk_hash"]}"\noffset = {c["offset"]}\n'
              f'length = {c["length"]}\ncodec = "fastcdc"\ncompression = "zstd"\n' for c in chunks]
    return (head + "\n" + "\n".join(blocks)).encode("utf-8")


def jcs(doc: Any) -> bytes:
    return canonical_json(doc)


@functools.lru_cache(maxsize=8)
def _parse(data: bytes) -> dict[str, Any]:
    return tomli.loads(data.decode("utf-8"))  # tomllib's parser, compiled (see pyproject.toml)


def parse_manifest_bytes(data: bytes) -> dict[str, Any]:
    """Parse a distribution capsule.toml, once per distinct content in this process.

    Its chunk list makes it thousands of tables long, and install, trust and native delivery
    each read the same artifact: keyed by the bytes themselves, the cache cannot serve a stale
    parse. Every caller gets the same document, which is read-only: no reader of an artifact's
    manifest changes it (:func:`manifest_hash` and the registry's display copy what they drop),
    so copying it per caller (a deep copy of thousands of tables) bought nothing. E208 for
    anything that is not UTF-8 TOML.
    """
    try:
        return _parse(bytes(data))
    except (UnicodeDecodeError, tomli.TOMLDecodeError, RecursionError) as exc:
        raise CapsuleError("members", f"capsule.toml is not valid TOML: {str(exc)[:200]}") from None


def check(manifest: dict[str, Any], payload: PayloadManifest) -> dict[str, str]:
    """Recompute ``manifest_hash``, the chunk list and the Merkle root against the payload manifest.

    Returns ``{"manifest_hash", "merkle_root"}`` (labels); E208 names the first that differs.
    """
    dist = manifest.get("distribution")
    if not isinstance(dist, dict):
        raise CapsuleError("digests", "capsule.toml has no [distribution] table")
    claimed = dist.get("manifest_hash")
    try:
        actual = manifest_hash(manifest)
    except (TypeError, ValueError) as exc:  # a value JCS cannot hold (a TOML date, a float NaN)
        raise CapsuleError("digests", f"capsule.toml cannot be hashed: {exc}") from None
    if claimed != actual:
        raise CapsuleError("digests", f"manifest_hash mismatch: capsule.toml claims {claimed!s:.80}, content hashes "
                                      f"to {actual}")
    chunk_list = dist.get("chunk_list")
    if not isinstance(chunk_list, list) or len(chunk_list) != len(payload.chunks):
        raise CapsuleError("digests", "distribution.chunk_list does not match payload.v3.manifest.json")
    offset = 0
    for entry, ref in zip(chunk_list, payload.chunks, strict=True):
        try:
            same = isinstance(entry, dict) and entry.get("offset") == offset and \
                entry.get("length") == ref.raw_size and parse(str(entry.get("chunk_hash"))) == ref.raw_hash
        except DigestError:
            same = False
        if not same:
            raise CapsuleError("digests", f"distribution.chunk_list entry at offset {offset} does not match the "
                                          "payload")
        offset += ref.raw_size
    root = label(merkle_root([c.raw_hash for c in payload.chunks]))
    if dist.get("merkle_root") != root:
        raise CapsuleError("digests", f"merkle_root mismatch: capsule.toml claims {dist.get('merkle_root')!s:.80}, "
                                      f"chunks give {root}")
    return {"manifest_hash": actual, "merkle_root": root}
