"""The distribution capsule.toml's fast chunk-list writer gives tomli_w's bytes exactly."""

from __future__ import annotations

import random

import tomli_w

from cas.payload_manifest import ChunkRef, PayloadManifest
from stages.capsule import distribution

NORMALIZED = {"schema_version": "0.2", "name": "app", "version": "1.0.0", "type": "app", "default_target": "default",
              "targets": {"default": {"runtime": "source", "driver": "python", "entrypoint": "src/main.py",
                                      "env": {"A": "1", "B": "two \"quoted\""}}},
              "pack": {"include": ["src/**"], "exclude": []}, "tags": ["x", "y"]}


def test_the_chunk_list_is_written_as_tomli_w_writes_it() -> None:
    rng = random.Random(5)
    for n in (1, 2, 300):
        chunks = [ChunkRef(f"{rng.getrandbits(256):064x}", rng.randrange(1, 1 << 20)) for _ in range(n)]
        for schema in (None, "1.0"):
            doc = distribution.distribution_manifest(NORMALIZED, PayloadManifest(chunks), source_schema_version=schema)
            assert distribution.toml_bytes(doc) == tomli_w.dumps(doc).encode()


def test_anything_else_is_left_to_tomli_w() -> None:
    doc = distribution.distribution_manifest(NORMALIZED, PayloadManifest([ChunkRef("ab" * 32, 10)]))
    odd = {**doc, "distribution": {**doc["distribution"], "chunk_list": [
        {**doc["distribution"]["chunk_list"][0], "codec": "other\n"}]}}
    moved = {"distribution": doc["distribution"], **{k: v for k, v in doc.items() if k != "distribution"}}
    empty = {**doc, "distribution": {**doc["distribution"], "chunk_list": []}}
    for d in (odd, moved, empty):
        assert distribution.toml_bytes(d) == tomli_w.dumps(d).encode()
