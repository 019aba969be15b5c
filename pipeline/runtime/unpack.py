"""Unpack a ``.capsule`` payload for running: verified first, extracted safely, once per digest.

The artifact has passed the trust gate (:func:`pipeline.runtime.resolve.trust_gate`), which runs
the format's one verifier; the payload is then extracted by the format's one safe unpacker
(:func:`stages.capsule.unpack_payload`: descriptor-based, never through a symlink) into a
private temp dir that is renamed to ``$ATO_HOME/unpacked/<manifest-hash>`` only when complete.
The rename is the completion mark: nothing is written inside the tree to say so (a marker file
there could be a symlink the payload planted), and a crash never leaves a half-extracted tree
that a later run trusts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cas.digest import parse
from cas.stoppoints import stop_point
from cas.tempfiles import sweep, temp_name
from pipeline import paths
from stages.capsule import Limits, Verdict, unpack_payload, verdict_under, verify, write_root_file
from stages.capsule.distribution import toml_bytes


def unpack_capsule(artifact: Path, limits: Limits | None = None,
                   verdict: Verdict | None = None) -> tuple[Path, dict[str, Any]]:
    """Verify ``artifact`` (or take the caller's ``verdict`` on it) and return (its unpacked project dir, the
    verification digests)."""
    limits = limits or Limits()
    verdict = (verify(artifact, limits) if verdict is None else verdict_under(verdict, limits)).require()
    capsule = verdict.capsule
    assert capsule is not None and verdict.digests is not None
    summary = dict(verdict.digests)
    key = parse(summary["manifest_hash"])
    dest = paths.unpacked_dir() / key
    if dest.is_dir() and not dest.is_symlink():
        return dest, summary
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep([dest.parent])  # what a killed unpack left (only if its process is gone)
    tmp = dest.parent / temp_name(key[:16])
    os.mkdir(tmp, 0o700)
    try:
        os.chmod(tmp, 0o755)
        unpack_payload(capsule, tmp)
        # The artifact's own manifest and lock are the verified ones; they win over payload copies.
        write_root_file(tmp, "capsule.toml", toml_bytes(capsule.manifest))
        write_root_file(tmp, "capsule.lock.json", json.dumps(capsule.lock, indent=2).encode("utf-8"))
        stop_point("unpack.written")  # crash tests: the whole tree in its temp dir, not renamed
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # lost a race to a concurrent unpack: theirs is as good
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, summary
