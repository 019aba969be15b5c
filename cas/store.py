"""The CAS as a whole: chunk frames in pack files, and the payload manifests that name them.

``<root>/packs`` + ``<root>/index.sqlite`` (:mod:`cas.packs`, :mod:`cas.index`) are the store.
A store written by an earlier ato, one file per chunk under ``<root>/objects/blake3/<hh>/<hh>/``
and one JSON file per payload manifest under ``<root>/manifests/blake3/``, is still read: chunks
are looked up there when the packs do not have them, and a manifest found there is copied into the
index when it is first read. ``ato cas gc`` moves the live chunks of such a store into a pack and
removes the old tree.

Payload manifests are kept by ``artifact_hash`` so a payload can be rebuilt from the store alone
(``--strict-v3`` builds, delta installs, gc roots).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cas.atomic import write_bytes_atomic
from cas.digest import parse
from cas.filelock import flocked
from cas.frames import ChunkError
from cas.index import Location, PackEntry
from cas.objects import ObjectError, ObjectStore
from cas.packs import PackStore
from cas.payload_manifest import PayloadManifest, PayloadManifestError
from cas.tempfiles import temp_path


class CasStore:
    def __init__(self, root: Path, *, manifests_as_files: bool = False) -> None:
        self.root = Path(root)
        self.packs = PackStore(self.root)
        self.objects = ObjectStore(self.root)  # the one-file-per-chunk layout of earlier versions
        self.manifest_dir = self.root / "manifests" / "blake3"  # earlier versions' manifests
        # The registry still keeps chunks and manifests as files (issue 13 moves it onto packs next).
        self.manifests_as_files = manifests_as_files

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Held by writers (builds, installs) so gc never runs in the middle of them."""
        return flocked(self.root / ".lock", shared=True)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by gc."""
        return flocked(self.root / ".lock")

    # ---------------------------------------------------------------- chunks

    def locate(self, hex_digest: str) -> Location | None:
        """Where a chunk is in the packs (None: not packed; it may still be a legacy object)."""
        return self.packs.locate(hex_digest)

    def has_chunk(self, hex_digest: str) -> bool:
        return self.packs.locate(hex_digest) is not None or self.objects.has(hex_digest)

    def missing_chunks(self, manifest: PayloadManifest) -> list[str]:
        found = self.packs.locate_many(c.raw_hash for c in manifest.chunks)
        return [c.raw_hash for c in manifest.chunks if c.raw_hash not in found and not self.objects.has(c.raw_hash)]

    def frame(self, hex_digest: str, raw_size: int | None = None, where: Location | None = None) -> bytes:
        """A chunk's stored frame, checked (frame BLAKE3 for a packed chunk, a full decode for a legacy one)."""
        where = where or self.packs.locate(hex_digest)
        if where is not None:
            if raw_size is not None and where.raw_size != raw_size:
                raise ChunkError("corrupt", hex_digest, f"CAS chunk blake3:{hex_digest} is stored with "
                                                        f"{where.raw_size} bytes, expected {raw_size}")
            return bytes(self.packs.frame_view(hex_digest, where))
        return self.objects.read_frame(hex_digest, raw_size)

    def raw(self, hex_digest: str, raw_size: int | None = None) -> bytes:
        """A chunk's raw bytes, decoded and checked against its name."""
        where = self.packs.locate(hex_digest)
        if where is not None:
            return self.packs.read_raw(hex_digest, raw_size, where)
        return self.objects.get(hex_digest, raw_size)

    def iter_frames(self, manifest: PayloadManifest) -> Iterator[bytes]:
        """The checked zstd frames of a payload, in order (their concatenation is payload.tar.zst)."""
        found = self.packs.locate_many(c.raw_hash for c in manifest.chunks)
        for c in manifest.chunks:
            yield self.frame(c.raw_hash, c.raw_size, found.get(c.raw_hash))

    def iter_raw(self, manifest: PayloadManifest) -> Iterator[bytes]:
        """The checked raw chunks of a payload, in order (their concatenation is the payload tar)."""
        for c in manifest.chunks:
            yield self.raw(c.raw_hash, c.raw_size)

    def adopt_artifact(self, path: Path, blake3_hex: str, entries: list[PackEntry]) -> Path:
        """Index an artifact file as its own pack (``packs/<BLAKE3>.capsule``); ``path`` and the pack end
        up one inode, so the bytes are on disk once even when the same artifact was adopted before."""
        pack = self.packs.adopt(path, f"{parse(blake3_hex)}.capsule", entries)
        if not pack.samefile(path):
            link = temp_path(path)
            os.link(pack, link)
            os.replace(link, path)
        return pack

    # ---------------------------------------------------------------- payload manifests

    def put_manifest(self, manifest: PayloadManifest) -> str:
        if self.manifests_as_files:
            target = self.manifest_path(manifest.artifact_hash)
            if not target.exists():
                write_bytes_atomic(target, manifest.to_bytes(), no_clobber=True, temp_dir=self.objects.tmp)
        else:
            self.packs.index.put_payload(manifest)
        return manifest.artifact_hash

    def manifest_path(self, artifact_hash: str) -> Path:
        """Where the one-file-per-manifest layout keeps a manifest (earlier versions, and the registry)."""
        return self.manifest_dir / f"{parse(artifact_hash)}.json"

    def has_manifest(self, artifact_hash: str) -> bool:
        h = parse(artifact_hash)
        return self.manifest_path(h).is_file() or (not self.manifests_as_files and self.packs.index.has_payload(h))

    def get_manifest(self, artifact_hash: str) -> PayloadManifest:
        """A stored payload manifest; its artifact_hash must match its name."""
        h = parse(artifact_hash)
        manifest = None if self.manifests_as_files else self.packs.index.get_payload(h)
        if manifest is not None:
            return manifest
        manifest = self._legacy_manifest(h)
        if not self.manifests_as_files:
            self.packs.index.put_payload(manifest)  # read once from the old layout, kept in the index from now on
        return manifest

    def iter_manifest_hashes(self) -> Iterator[str]:
        seen = set() if self.manifests_as_files else set(self.packs.index.payload_hashes())
        yield from sorted(seen)
        for h in self.legacy_manifest_hashes():
            if h not in seen:
                yield h

    def remove_manifests(self, hexes: Iterable[str]) -> None:
        hexes = list(hexes)
        if not self.manifests_as_files:
            self.packs.index.remove_payloads(hexes)
        for h in hexes:
            self.manifest_path(h).unlink(missing_ok=True)

    # ---------------------------------------------------------------- the layout of earlier versions

    def legacy_manifest_hashes(self) -> list[str]:
        if not self.manifest_dir.is_dir():
            return []
        return sorted(p.stem for p in self.manifest_dir.glob("*.json") if not p.name.startswith("."))

    def _legacy_manifest(self, hex_digest: str) -> PayloadManifest:
        path = self.manifest_path(hex_digest)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ObjectError("missing", hex_digest, f"payload manifest blake3:{hex_digest} is not in the CAS") from None
        except ValueError as exc:
            raise PayloadManifestError(f"payload manifest {path.name} is not JSON: {exc}") from None
        manifest = PayloadManifest.from_json(doc)
        if manifest.artifact_hash != hex_digest:
            raise PayloadManifestError(f"payload manifest {path.name} is stored under the wrong name")
        return manifest
