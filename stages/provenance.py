"""Local build provenance: which artifact digests this ATO_HOME built itself.

An unsigned artifact that this machine built (seed 000's build → publish →
install → run on one workstation) is not an unknown party's: install and run
accept it without ``--allow-unsigned``. Anything unsigned from elsewhere still
needs the flag. One marker file per digest: atomic, no shared file to contend on.
"""

from __future__ import annotations

import json
from pathlib import Path

from cas.atomic import write_bytes_atomic
from cas.digest import DigestError, parse
from pipeline import paths


def record_local_build(artifact_digest: str, out_path: Path) -> None:
    write_bytes_atomic(paths.local_builds_dir() / parse(artifact_digest), json.dumps({"artifact": str(out_path)}).encode())


def built_here(artifact_digest: str | None) -> bool:
    if not artifact_digest:
        return False
    try:
        return (paths.local_builds_dir() / parse(artifact_digest)).is_file()
    except DigestError:
        return False
