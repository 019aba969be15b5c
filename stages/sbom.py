"""``sbom.spdx.json``: SPDX 2.3, one SHA-256 per payload file.

Deterministic: the creation time is SOURCE_DATE_EPOCH (or 0), files are sorted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from stages.payload import PackedFile

_SANITIZE = re.compile(r"[^A-Za-z0-9.]+")


def _spdx_id(prefix: str, value: str) -> str:
    return f"{prefix}-{_SANITIZE.sub('-', value).strip('-') or 'file'}"


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_sbom(name: str, version: str, files: list[PackedFile], epoch: int) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%d%H%M%S")
    seen: dict[str, int] = {}
    entries = []
    for f in sorted(files, key=lambda f: f.path.encode("utf-8")):
        spdx = _spdx_id("SPDXRef-File", f.path)
        # Distinct paths can sanitize alike; a counter keeps SPDX ids unique.
        n = seen.get(spdx, 0)
        seen[spdx] = n + 1
        entries.append({
            "SPDXID": spdx if n == 0 else f"{spdx}-{n}",
            "fileName": f.path,
            "checksums": [{"algorithm": "SHA256", "checksumValue": f.sha256}],
        })
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}-{version}-sbom",
        "documentNamespace": f"https://ato.run/sbom/{quote(name)}/{quote(version)}/{stamp}",
        "creationInfo": {"created": rfc3339(epoch), "creators": ["Tool: ato"]},
        "files": entries,
    }
