"""Property tests of the manifest reader: whatever the text, a Manifest or an AtoError, nothing else.

Hypothesis drives :func:`pipeline.manifest.parse_manifest` (the public reader, so these survive a
rewrite of its insides) with arbitrary text, with generated documents shaped like manifests (known
keys, wrong types, deep values, dependency graphs), and with byte-level mutations of valid
manifests. Any other exception (KeyError, TypeError, RecursionError, ...) is a reader bug.

Bounded so the suite stays fast and repeatable: a fixed number of examples, derandomized, no example
database on disk. ``ATO_FUZZ_EXAMPLES=5000 ATO_FUZZ_RANDOM=1 pytest tests/test_manifest_fuzz.py``
explores further.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import CODES, AtoError
from pipeline.manifest import Manifest, parse_manifest
from tests.e2e.test_build_e2e import MANIFEST as BUILD_MANIFEST
from tests.test_manifest import V11

PATH = Path("/proj/capsule.toml")
FUZZ = settings(max_examples=int(os.environ.get("ATO_FUZZ_EXAMPLES", "120")), deadline=None, database=None,
                derandomize=os.environ.get("ATO_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

VALID = [
    BUILD_MANIFEST + """port = 8080
required_env = ["API_KEY"]

[services.main]
entrypoint = "python src/main.py"
depends_on = ["db"]
readiness_probe = { http_get = "/health", port = "PORT" }

[services.db]
entrypoint = "python db.py"
env = { DB_PORT = "5432" }

[pack]
include = ["src/**"]
exclude = ["**/__pycache__/**"]
""",
    V11,
    """\
schema_version = "0.2"
name = "web"
version = "2.0.0-rc.1"
default_target = "site"

[targets.site]
runtime = "web"
driver = "static"
entrypoint = "dist"
port = 4173

[metadata]
display_name = "Web"
tags = ["a", "b"]

[network]
egress_allow = ["example.com"]
""",
]

KEYS = ["schema_version", "name", "version", "type", "default_target", "targets", "execution", "services",
        "tasks", "lifecycle", "pack", "artifact", "finalize", "metadata", "build", "isolation", "state",
        "network", "runtime", "driver", "entrypoint", "port", "cmd", "command", "env", "depends_on",
        "readiness_probe", "http_get", "tcp_connect", "required_env", "runtime_version", "runtime_tools",
        "image", "digest", "source_digest", "include", "exclude", "working_dir", "expose", "target", "kind",
        "durability", "attach", "egress_allow", "run", "preference", "main", "default", "oci", "wasm"]
SCALARS = st.one_of(
    st.sampled_from(["0.2", "1.1", "1.0", "0.3", "1", "app", "source", "python", "node", "deno", "web", "static",
                     "main.py", "../x", "/abs", "PORT", "default", "main", "1.0.0", "", " ", "a b", "blake3:00",
                     "sha256:" + "0" * 64, "x" * 300, "\x00", "é", "*", "**/*"]),
    st.text(max_size=20), st.integers(min_value=-2**63, max_value=2**63 - 1), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.dates(), st.datetimes(), st.times())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                                                 max_size=5)), max_leaves=25)


@st.composite
def manifest_like(draw: st.DrawFn) -> dict[str, Any]:
    """A document with a manifest's skeleton, where any value may be wrong, missing or extra."""
    names = draw(st.lists(st.sampled_from(["main", "api", "db", "web", "install", "s1", "s2"]), max_size=5,
                          unique=True))
    doc: dict[str, Any] = {
        "schema_version": draw(st.sampled_from(["0.2", "1.1", "1.0", "0.3", "1", "2", ""]) | SCALARS),
        "name": draw(st.sampled_from(["app", "my-app", "A", "-x", "a" * 70]) | SCALARS),
        "version": draw(st.sampled_from(["0.1.0", "1.0.0-rc.1+b", "1", "v1.0.0"]) | SCALARS),
        "type": draw(st.sampled_from(["app", "tool", "job", "nope"])),
        "default_target": draw(st.sampled_from(["default", "main", "missing"])),
        "targets": {label: draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
                    for label in draw(st.lists(st.sampled_from(["default", "main", "oci", "wasm", "x"]), max_size=3,
                                               unique=True))},
        "services": {n: {"entrypoint": "python main.py",
                         "depends_on": draw(st.lists(st.sampled_from(names + ["ghost"]), max_size=3)),
                         **draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3))} for n in names},
    }
    if draw(st.booleans()):
        doc["execution"] = draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
    if draw(st.booleans()):
        doc["tasks"] = {n: {"cmd": "true", "depends_on": draw(st.lists(st.sampled_from(names + ["main"]), max_size=2))}
                        for n in draw(st.lists(st.sampled_from(["install", "build", "main"]), max_size=2, unique=True))}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4)):
        doc[key] = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2)):
        doc.pop(key, None)
    return doc


def read(text: str, sidecar: str | None = None) -> None:
    """The property: a Manifest, or an AtoError with a documented code and a one-line message."""
    try:
        manifest = parse_manifest(text, PATH, sidecar=sidecar)
    except AtoError as err:
        assert err.code in CODES, err.code
        assert "\n" not in err.human_line()
        return
    assert isinstance(manifest, Manifest)


def dumps(doc: dict[str, Any]) -> str | None:
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return None  # not representable as TOML (e.g. a NaN key): nothing to read


@FUZZ
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    read(text)


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.binary(max_size=12)),
                                        min_size=1, max_size=4))
def test_mutated_valid_manifests(text: str, edits: list[tuple[int, int, bytes]]) -> None:
    data = bytearray(text.encode("utf-8"))
    for at, cut, insert in edits:
        at %= len(data) + 1
        data[at:at + cut] = insert
    read(data.decode("utf-8", "replace"))


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.integers(0, 100), min_size=1, max_size=6))
def test_shuffled_and_repeated_lines(text: str, picks: list[int]) -> None:
    lines = text.splitlines()
    read("\n".join(lines[p % len(lines)] for p in picks) + "\n" + text)


@FUZZ
@given(manifest_like())
def test_generated_documents(doc: dict[str, Any]) -> None:
    text = dumps(doc)
    if text is not None:
        read(text)


@FUZZ
@given(st.sampled_from(VALID[:1]), st.one_of(st.text(max_size=200), manifest_like().map(dumps)))
def test_with_any_delivery_sidecar(text: str, sidecar: str | None) -> None:
    read(text, sidecar)


@pytest.mark.parametrize("text", VALID)
def test_the_seeds_are_valid(text: str) -> None:
    assert isinstance(parse_manifest(text, PATH), Manifest)
