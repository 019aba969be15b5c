"""``sbom.spdx.json``: SPDX 2.3, one SHA-256 per payload file.

Deterministic: the creation time is SOURCE_DATE_EPOCH (or 0), files are sorted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from cas.canonical import canonical_json
from stages.payload import PackedFile

_SANITIZE = re.compile(r"[^A-Za-z0-9.]+")
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')  # the only characters canonical JSON escapes in a string
_FILES = b'"files":[]'
_HEX = re.compile(r"[0-9a-f]*\Z")


def _spdx_id(prefix: str, value: str) -> str:
    return f"{prefix}-{_SANITIZE.sub('-', value).strip('-') or 'file'}"


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _path(f: PackedFile) -> str:
    return f.path


def _file_rows(files: list[PackedFile]) -> Iterator[tuple[str, PackedFile]]:
    """Each file with its SPDX id, in path order (bytewise UTF-8)."""
    seen: dict[str, int] = {}
    # code point order is UTF-8 byte order, without encoding each path
    for f in sorted(files, key=_path):
        spdx = _spdx_id("SPDXRef-File", f.path)
        # Distinct paths can sanitize alike; a counter keeps SPDX ids unique.
        n = seen.get(spdx, 0)
        seen[spdx] = n + 1
        yield (spdx if n == 0 else f"{spdx}-{n}"), f


def build_sbom(name: str, version: str, files: list[PackedFile], epoch: int) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%d%H%M%S")
    entries = [{"SPDXID": spdx, "fileName": f.path, "checksums": [{"algorithm": "SHA256", "checksumValue": f.sha256}]}
               for spdx, f in _file_rows(files)]
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}-{version}-sbom",
        "documentNamespace": f"https://ato.run/sbom/{quote(name)}/{quote(version)}/{stamp}",
        "creationInfo": {"created": rfc3339(epoch), "creators": ["Tool: ato"]},
        "files": entries,
    }


def sbom_bytes(name: str, version: str, files: list[PackedFile], epoch: int) -> bytes:
    """The canonical JSON of :func:`build_sbom`, byte for byte, without a dict per file.

    Rebuilt on every build that changes a file, for every file: each entry is one string with the
    keys already in canonical order; a path is escaped exactly as the canonical encoder escapes it.
    SHA-256s are hex and SPDX ids are sanitized to ``[A-Za-z0-9.-]``: neither needs escaping.
    """
    head = canonical_json(build_sbom(name, version, [], epoch))
    if head.count(_FILES) != 1:  # the key appears once; a quote inside a value is always escaped
        raise ValueError("unexpected SBOM layout")
    rows = []
    # one search over all paths and one over all digests (the common case: nothing to escape, all hex);
    # only when one finds something is each checked on its own
    escape = _ESCAPED.search("/".join(f.path for f in files)) is not None
    if not _HEX.match("".join(f.sha256 for f in files)):
        bad = next(f.sha256 for f in files if not _HEX.match(f.sha256))
        raise ValueError(f"not a hex SHA-256: {bad!r}")
    for spdx, f in _file_rows(files):
        path = f.path if not escape or not _ESCAPED.search(f.path) else json.dumps(f.path, ensure_ascii=False)[1:-1]
        rows.append(f'{{"SPDXID":"{spdx}","checksums":[{{"algorithm":"SHA256","checksumValue":"{f.sha256}"}}],'
                    f'"fileName":"{path}"}}')
    return head.replace(_FILES, b'"files":[' + ",".join(rows).encode("utf-8") + b"]")
