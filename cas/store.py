"""The CAS as a whole: chunk objects plus the payload manifests that name them.

Payload manifests are kept by ``artifact_hash`` so a payload can be rebuilt from
the store alone (``--strict-v3`` builds, delta installs, gc roots).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from cas.atomic import write_bytes_atomic
from cas.digest import parse
from cas.filelock import flocked
from cas.objects import ObjectError, ObjectStore
from cas.payload_manifest import PayloadManifest, PayloadManifestError


class CasStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = ObjectStore(self.root)
        self.manifest_dir = self.root / "manifests" / "blake3"

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Held by writers (builds, installs) so gc never runs in the middle of them."""
        return flocked(self.root / ".lock", shared=True)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by gc."""
        return flocked(self.root / ".lock")

    def manifest_path(self, artifact_hash: str) -> Path:
        return self.manifest_dir / f"{parse(artifact_hash)}.json"

    def put_manifest(self, manifest: PayloadManifest) -> str:
        hex_digest = manifest.artifact_hash
        target = self.manifest_path(hex_digest)
        if not target.exists():
            write_bytes_atomic(target, manifest.to_bytes(), no_clobber=True, temp_dir=self.objects.tmp)
        return hex_digest

    def get_manifest(self, artifact_hash: str) -> PayloadManifest:
        """Load a stored payload manifest; its artifact_hash must match its name."""
        path = self.manifest_path(artifact_hash)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ObjectError("missing", parse(artifact_hash),
                              f"payload manifest blake3:{parse(artifact_hash)} is not in the CAS") from None
        except ValueError as exc:
            raise PayloadManifestError(f"payload manifest {path.name} is not JSON: {exc}") from None
        manifest = PayloadManifest.from_json(doc)
        if manifest.artifact_hash != parse(artifact_hash):
            raise PayloadManifestError(f"payload manifest {path.name} is stored under the wrong name")
        return manifest

    def iter_manifest_hashes(self) -> Iterator[str]:
        if self.manifest_dir.is_dir():
            for p in sorted(self.manifest_dir.glob("*.json")):
                yield p.stem

    def missing_chunks(self, manifest: PayloadManifest) -> list[str]:
        return [c.raw_hash for c in manifest.chunks if not self.objects.has(c.raw_hash)]

    def iter_frames(self, manifest: PayloadManifest) -> Iterator[bytes]:
        """The verified zstd frames of a payload, in order (their concatenation is payload.tar.zst)."""
        for c in manifest.chunks:
            yield self.objects.read_frame(c.raw_hash, c.raw_size)

    def iter_raw(self, manifest: PayloadManifest) -> Iterator[bytes]:
        """The verified raw chunks of a payload, in order (their concatenation is the payload tar)."""
        for c in manifest.chunks:
            yield self.objects.get(c.raw_hash, c.raw_size)
