"""The SBOM's fast serializer gives the canonical JSON of the SBOM document, byte for byte."""

from __future__ import annotations

import random

import pytest
import rfc8785

from cas.canonical import canonical_json
from stages.payload import PackedFile
from stages.sbom import build_sbom, sbom_bytes

TRICKY = ["src/main.py", 'quote"d.txt', "back\\slash", "tab\there", "new\nline", "ctl\x01\x1f", "caf\u00e9/\u00fc.md",
          "emoji-\U0001f600.txt", "a b.txt", "a-b.txt", "a_b.txt", "...", "-", "\u2028sep", "del\x7f", "z/" * 30 + "x"]


@pytest.mark.parametrize("seed", range(3))
def test_sbom_bytes_equal_the_canonical_json_of_the_document(seed: int) -> None:
    rng = random.Random(seed)
    names = TRICKY + [f"d{rng.randrange(50)}/f{i}.{rng.choice(['py', 'js', 'bin'])}" for i in range(300)]
    rng.shuffle(names)
    files = [PackedFile(n, f"{rng.getrandbits(256):064x}") for n in names]
    for name, version, epoch in (("app", "1.0.0", 0), ('we"ird \u00e9', "2.0.0-rc.1+b", 1_700_000_000)):
        doc = build_sbom(name, version, files, epoch)
        assert sbom_bytes(name, version, files, epoch) == canonical_json(doc) == rfc8785.dumps(doc)
    assert sbom_bytes("app", "1", [], 0) == canonical_json(build_sbom("app", "1", [], 0))
