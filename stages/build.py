"""The build: payload -> lock -> artifact, planned here and run by doit (pipeline.graph).

:func:`plan_build` does what every build needs before doit runs: read and validate the manifest
and walk the source set (stat only: nothing is read). Each step then declares its real inputs:
the payload step depends on every packed file (doit's ``file_dep``, checked by stat and then
BLAKE3) and is handed the files that changed; the lock and artifact steps take the payload
step's result (doit's ``getargs``/``result_dep``). The payload step reads only what changed
(stages.payload), writes one pack of new chunks and a record of the source set; the artifact is
assembled from the packs. No copy of the payload is kept outside the store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import write_bytes_atomic
from cas.canonical import jcs_digest
from cas.digest import blake3_bytes, blake3_file, label, parse
from cas.frames import ChunkError
from cas.payload_manifest import PayloadManifest, PayloadManifestError
from cas.store import CasStore
from cas.tempfiles import sweep
from pipeline import paths
from pipeline.envelope import validate
from pipeline.errors import (
    E_ENTRYPOINT,
    E_INTEGRITY,
    E_PAYLOAD_TOO_LARGE,
    E_STRICT_FALLBACK,
    E_USAGE,
    AtoError,
)
from pipeline.manifest import Manifest, load_manifest, relpath
from pipeline.manifest.ipc import check_document
from pipeline.progress import SILENT, Progress, human_bytes
from stages import build_steps, native_build
from stages.capsule import archive, distribution, keys, signature
from stages.lock import build_lock, lock_inputs
from stages.payload import (
    RECORD_NAME,
    PackedFile,
    Previous,
    decode_stats,
    encode_stats,
    iter_payload_pieces,
    list_stored_payload,
    pack_cold,
    pack_incremental,
    stored_result,
)
from stages.provenance import record_local_build
from stages.sbom import sbom_bytes
from stages.sources import PackFilter, SourceEntry, collect, generated_entry

BUILD_FORMAT = "ato-build/2"
SCHEMA_VERSION = "0.1"
MAX_PAYLOAD_BYTES = 200 * 1024 * 1024
CONSENT_REQUIRED = "ATO_ERR_CONSENT_REQUIRED"
RACY_SECONDS = 3  # a file written this recently may change again within one timestamp tick
# what earlier versions kept in a build's state dir (the payload.tar.zst copy among them)
_OLD_STATE = ("payload.tar.zst", "digests.json", "doit.json", "payload.json", "payload.run.json")


@dataclass
class BuildOptions:
    out: Path | None = None
    strict_v3: bool = False
    force_large_payload: bool = False
    epoch: int = 0
    signing_key: keys.SigningKey | None = None  # signature.json is signed when set (ato build --key)
    reporter: Progress = SILENT  # progress of the packing (a bar on a terminal); never part of any digest
    # Asked before the manifest's build steps run (host commands); raises to refuse. None: refuse.
    approve_steps: Callable[[Manifest], None] | None = None


@dataclass
class BuildPlan:
    manifest: Manifest
    options: BuildOptions
    entries: list[SourceEntry]  # stat only; the payload step adds the digests
    stored_files: list[PackedFile] | None  # set when the payload comes from the CAS (source_digest)
    source_payload: PayloadManifest | None
    out_path: Path
    state_dir: Path
    strategy: str
    target: str
    derived_from: str
    readme: Path | None
    warnings: list[str] = field(default_factory=list)
    # BLAKE3s the payload step computed this run, by path, with the stat they were read under:
    # doit's file checker saves these instead of reading the files again.
    read_digests: dict[str, tuple[list[int], str]] = field(default_factory=dict)
    # Records this process encoded, by the BLAKE3 of their bytes: the artifact step, handed the digest of
    # the record the payload step just wrote, takes the record from here instead of decoding it again.
    records: dict[str, Previous] = field(default_factory=dict)
    # Payload manifests this process read and found whole (every chunk indexed), by artifact hash: the
    # up-to-date check reads the last build's, and the payload step then takes it from here.
    whole_manifests: dict[str, PayloadManifest] = field(default_factory=dict)

    @property
    def store(self) -> CasStore:
        return CasStore(paths.cas_root())

    @property
    def file_deps(self) -> list[str]:
        """The files the payload step reads: every regular file packed from the project."""
        if self.source_payload is not None:
            return []
        return [str(e.abspath) for e in self.entries if e.kind == "file" and e.data is None]

    @functools.cached_property
    def payload_config(self) -> dict[str, Any]:
        """Inputs of the payload step other than file contents: names, kinds, modes, links, generated files."""
        return {"format": BUILD_FORMAT, "epoch": self.options.epoch,
                "source_payload": self.source_payload.artifact_hash if self.source_payload else None,
                "listing": [[e.relpath, e.kind, e.mode, e.link_target if e.kind == "symlink" else
                             (blake3_bytes(e.data) if e.data is not None else None)] for e in self.entries]}

    @functools.cached_property
    def payload_config_digest(self) -> str:
        """:attr:`payload_config` as one digest (its listing has an entry per file: serialized once per build)."""
        return jcs_digest(self.payload_config, plain=True)

    @functools.cached_property
    def lock_config(self) -> dict[str, Any]:
        return {"format": BUILD_FORMAT, "manifest": self.manifest.normalized(),
                "targets": _targets_summary(self.manifest), "epoch": self.options.epoch}

    @functools.cached_property
    def artifact_config(self) -> dict[str, Any]:
        return {"format": BUILD_FORMAT, "manifest": self.manifest.normalized(), "out": str(self.out_path),
                "epoch": self.options.epoch, "readme": [self.readme.name, blake3_file(self.readme)] if self.readme
                else None, "force_large": self.options.force_large_payload, "signer": _signer_inputs(self.options)}


def source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise AtoError(E_USAGE, f"SOURCE_DATE_EPOCH must be a non-negative integer, got {raw!r}")
    return int(raw)


def _strategy(manifest: Manifest) -> tuple[str, str, str]:
    """(build_strategy, target, derived_from) for the envelope."""
    project = str(manifest.project_dir)
    if manifest.is_native() and manifest.delivery is not None:
        return "native-delivery", manifest.delivery.target, str((manifest.project_dir / manifest.delivery.input).absolute())
    target = manifest.primary_target()
    runtime = target.runtime or "source"
    if runtime == "web":
        return "web", target.label, project
    if runtime in ("oci", "wasm"):
        return runtime, target.label, project
    return "source", target.label, project


def _check_entrypoint(manifest: Manifest, entries: list[SourceEntry]) -> None:
    """A file-like entrypoint must be in the payload (commands like ``node x.js`` are not checked)."""
    target = manifest.primary_target()
    ep = (target.entrypoint or "").strip()
    if not ep or any(c.isspace() for c in ep) or manifest.is_native():
        return
    looks_like_file = "/" in ep or "." in ep.rsplit("/", 1)[-1]
    if not looks_like_file:
        return
    rel = relpath.normalize(ep)
    if not rel:  # "." or "./": the project root itself
        return
    names = {e.relpath for e in entries}
    if rel not in names and not any(n.startswith(rel.rstrip("/") + "/") for n in names):
        raise AtoError(E_ENTRYPOINT, f"{manifest.path.name}: entrypoint {ep!r} is not in the payload "
                                     "(missing, or excluded by [pack])", details={"entrypoint": ep})


def _resolve_source_digest(manifest: Manifest, strict: bool, store: CasStore,
                           warnings: list[str]) -> PayloadManifest | None:
    """The payload named by ``source_digest`` when the CAS can supply all of it."""
    digest = manifest.primary_target().source_digest
    if not digest:
        if strict:
            raise AtoError(E_STRICT_FALLBACK, "strict manifest fallback is not allowed: source_digest is missing; "
                           "--strict-v3 forbids falling back to local source packaging",
                           details={"field": "strict-v3"},
                           hint="set source_digest to a payload artifact_hash stored in the CAS, or drop --strict-v3")
        return None
    try:
        payload = store.get_manifest(parse(digest))
        for c in payload.chunks:
            store.raw(c.raw_hash, c.raw_size)
        return payload
    except (ChunkError, PayloadManifestError, ValueError) as exc:
        if strict:
            raise AtoError(E_STRICT_FALLBACK, f"strict manifest fallback is not allowed: CAS cannot supply "
                           f"source_digest {digest}: {exc}", details={"field": "strict-v3", "source_digest": digest},
                           hint="build once without --strict-v3 to store the payload, or fix source_digest") from None
        warnings.append(f"source_digest {digest} is not available in the CAS ({exc}); "
                        "falling back to local source packaging")
        return None


def run_build_steps(manifest: Manifest, options: BuildOptions) -> None:
    """The manifest's build steps, after consent (they are commands on this machine)."""
    if not manifest.build_steps:
        return
    if options.approve_steps is None:
        commands = [build_steps.shown(s) for s in manifest.build_steps]
        raise AtoError(CONSENT_REQUIRED, f"{manifest.path.name} asks ato build to run {len(commands)} build "
                                         f"command(s) on this machine ({'; '.join(commands)}); that needs consent",
                       details={"commands": commands}, hint="re-run `ato build` with --yes to approve them")
    options.approve_steps(manifest)
    build_steps.run_steps(manifest)


def _note_project(state_dir: Path, project: Path) -> None:
    """``project.json``: which project a build state dir belongs to (``ato gc`` drops those of removed projects)."""
    data = json.dumps({"project_dir": str(project)}, sort_keys=True).encode()
    path = state_dir / "project.json"
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    write_bytes_atomic(path, data)


def plan_build(project_dir: Path, options: BuildOptions, manifest: Manifest | None = None) -> BuildPlan:
    """Everything a build needs to know before doit runs; ``manifest`` when the caller has read it already."""
    manifest = manifest or load_manifest(project_dir, strict=options.strict_v3 or None)
    warnings = manifest.warning_lines()
    warnings += [f"[{f.code}] {f.message} (at {f.location})"
                 for f in check_document(manifest.raw, manifest.project_dir, str(manifest.path),
                                         store_dir=paths.store_dir())]
    store = CasStore(paths.cas_root())
    key = blake3.blake3(str(manifest.project_dir.resolve()).encode()).hexdigest()[:16]
    state_dir = paths.build_cache_dir() / key
    _note_project(state_dir, manifest.project_dir.resolve())
    source_payload = _resolve_source_digest(manifest, options.strict_v3, store, warnings)
    stored_files = None
    if source_payload is not None:
        entries, stored_files = list_stored_payload(store, source_payload)
    else:
        run_build_steps(manifest, options)  # 0.3 build / v1 [[build.steps]]: what they make is packed
        native_build.prepare(manifest)  # native targets: run the command-mode build, check the app it made
        pack = manifest.pack
        entries = collect(manifest.project_dir, PackFilter(pack.include, pack.exclude))
        if manifest.delivery is not None:
            entries.append(generated_entry("ato.delivery.toml", distribution.toml_bytes(manifest.delivery.to_toml_dict())))
            entries.sort(key=lambda e: e.relpath.encode("utf-8"))
    _check_entrypoint(manifest, entries)
    if manifest.is_native() and manifest.delivery is not None:
        native_build.check_payload_input(manifest.delivery, {e.relpath: e.mode for e in entries})
    strategy, target, derived_from = _strategy(manifest)
    out_path = (options.out or manifest.project_dir / f"{manifest.name}.capsule").absolute()
    readme = next((manifest.project_dir / n for n in archive.README_NAMES
                   if (manifest.project_dir / n).is_file()), None)
    for name in _OLD_STATE:
        (state_dir / name).unlink(missing_ok=True)
    return BuildPlan(manifest, options, entries, stored_files, source_payload, out_path, state_dir, strategy, target,
                     derived_from, readme, warnings)


def _signer_inputs(options: BuildOptions) -> dict[str, Any] | None:
    """What of the signing key changes signature.json: its did and the rotation proof it attaches."""
    key = options.signing_key
    if key is None:
        return None
    return {"key_id": key.did, "previous_key": key.attached_previous_key(_now())}


def _now() -> float:
    return time.time()


def _targets_summary(manifest: Manifest) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    targets = dict(manifest.targets)
    if manifest.execution is not None:
        targets.setdefault("execution", manifest.execution)
    for name in sorted(targets):
        t = targets[name]
        out[name] = {k: v for k, v in {"runtime": t.runtime, "driver": t.driver, "entrypoint": t.entrypoint,
                                        "runtime_version": t.runtime_version}.items() if v}
    return out


def lock_path(plan: BuildPlan) -> Path:
    return plan.state_dir / "capsule.lock.json"


def record_path(plan: BuildPlan) -> Path:
    """The source set of the last build (per file: BLAKE3, SHA-256), read by the next one and by gc."""
    return plan.state_dir / RECORD_NAME


def run_path(plan: BuildPlan) -> Path:
    """How the last payload step went: the stat each file was read with, and what it added to the store."""
    return plan.state_dir / "payload.stats"


# ---------------------------------------------------------------- the payload step


def _stat_key(entry: SourceEntry, racy_after: float) -> list[int] | None:
    """The stat a file was walked with, unless it changed so recently (after ``racy_after``, in ns) that
    it may change again unseen."""
    key = entry.stat_key
    if key is None or key[1] > racy_after or key[2] > racy_after:
        return None
    return list(key)


def _previous(plan: BuildPlan) -> tuple[Previous | None, dict[str, tuple[int, ...]]]:
    try:
        prev = Previous.decode(record_path(plan).read_bytes(), plan.store, plan.whole_manifests)
    except OSError:
        return None, {}
    if prev is None:
        return None, {}
    try:
        return prev, decode_stats(run_path(plan).read_bytes(), prev.entries)[1]
    except OSError:
        return prev, {}


def pack(plan: BuildPlan, changed: list[str]) -> dict[str, Any]:
    """Payload step: pack the files doit found changed into a new pack (every file, on a cold build).

    Its result names only what it made (payload identity, record, source-set inputs), so the steps
    after it run again exactly when that changed (doit's result_dep).
    """
    store = plan.store
    with store.shared():  # gc waits until the chunks and the record naming them are written
        if plan.source_payload is not None:
            result = stored_result(store, plan.source_payload, plan.entries, plan.stored_files or [])
        else:
            prev, stats = _previous(plan)
            result = None
            if prev is not None:
                wanted = set(changed)
                # A file is taken from the last build only if it still has the stat it was read with then
                # (doit's database and this record could disagree after a crash between the two).
                again = set()
                for e in plan.entries:
                    if e.kind == "file" and e.data is None and (e.stat_key is None or stats.get(e.relpath) != e.stat_key
                                                                or e.abspath in wanted):
                        again.add(e.relpath)
                result = pack_incremental(plan.entries, store, plan.options.epoch, prev, again, plan.options.reporter)
            if result is None:
                result = pack_cold(plan.entries, store, plan.options.epoch, plan.options.reporter)
        store.put_manifest(result.manifest)
        record = Previous(result.entries, {f.path: f.sha256 for f in result.files}, result.manifest,
                          plan.options.epoch)
        data = record.encode()
        write_bytes_atomic(record_path(plan), data)
        record_digest = blake3_bytes(data)
        plan.records[record_digest] = record
    run = {"mode": result.mode, "files_read": result.files_read, "chunks_inserted": result.chunks_inserted,
           "bytes_inserted": result.bytes_inserted, "artifact_hash": result.manifest.artifact_hash}
    racy_after = (time.time() - RACY_SECONDS) * 1e9
    keys = [_stat_key(e, racy_after) if e.kind == "file" and e.data is None else None for e in result.entries]
    write_bytes_atomic(run_path(plan), encode_stats(result.entries, keys, run))
    # the digests of the files this step read, for doit's checker (a file it did not read keeps its saved state)
    read = result.read_paths
    for e in result.entries if read is None else [e for e in result.entries if e.relpath in read]:
        if e.kind == "file" and e.stat_key is not None and e.blake3:
            plan.read_digests[str(e.abspath)] = (list(e.stat_key), e.blake3)
    return {"artifact_hash": result.manifest.artifact_hash, "payload_blake3": result.payload_blake3,
            "record_blake3": record_digest, "chunks": len(result.manifest.chunks),
            "total_raw_size": result.manifest.total_raw_size, "inputs": lock_inputs(result.entries)}


def last_run(plan: BuildPlan) -> dict[str, Any]:
    """What the last payload step added to the store (for the envelope of the build that ran it)."""
    try:
        return decode_stats(run_path(plan).read_bytes(), [])[0]
    except OSError:
        return {}


def payload_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    """The payload's manifest and every chunk are still stored, and the record is the one written."""
    path = record_path(plan)
    if not path.is_file() or blake3_file(path) != values.get("record_blake3"):
        return False
    store = plan.store
    if not store.has_manifest(values["artifact_hash"]):
        return False
    manifest = store.get_manifest(values["artifact_hash"])
    if store.missing_chunks(manifest):
        return False
    plan.whole_manifests[manifest.artifact_hash] = manifest
    return True


# ---------------------------------------------------------------- the lock step


def write_lock(plan: BuildPlan, payload: dict[str, Any]) -> dict[str, Any]:
    """Lock step: capsule.lock.json for this source set."""
    lock = build_lock(plan.manifest.normalized(), _targets_summary(plan.manifest), payload["inputs"],
                      plan.options.epoch)
    data = distribution.jcs(lock)
    write_bytes_atomic(lock_path(plan), data)
    return {"lock_digest": label(blake3_bytes(data))}


def lock_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    path = lock_path(plan)
    return path.is_file() and label(blake3_file(path)) == values.get("lock_digest")


# ---------------------------------------------------------------- the artifact step


def _read_checked(path: Path, digest: str, what: str) -> bytes:
    data = path.read_bytes()
    if blake3_bytes(data) != parse(digest):
        raise AtoError(E_INTEGRITY, f"the build's {what} ({path}) changed since it was written; build again",
                       hint="`ato build` re-runs the step that writes it")
    return data


def assemble(plan: BuildPlan, payload: dict[str, Any], lock: dict[str, Any]) -> dict[str, Any]:
    """Artifact step: write the .capsule from the lock, the payload (read from its packs) and the manifest."""
    store = plan.store
    data = _read_checked(record_path(plan), payload["record_blake3"], "payload record")
    record = plan.records.get(payload["record_blake3"]) or Previous.decode(data, store)
    if record is None:
        raise AtoError(E_INTEGRITY, "the build's payload record cannot be read; build again",
                       hint="`ato build` re-runs the step that writes it")
    # the manifest the payload step stored (this process made the record when it ran the step)
    manifest_doc = record.manifest if record.manifest.artifact_hash == payload["artifact_hash"] \
        else store.get_manifest(payload["artifact_hash"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(store.shared())  # the packs read below stay where the index says until written
        # payload.tar.zst's BLAKE3 (signature.json precedes it) is hashed on a thread while the small members
        # are made here: both are needed before the first byte of the artifact
        pieces = _payload_pieces(store, manifest_doc)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ato-payload-hash"))
        hashing = pool.submit(_pieces_blake3, pieces)
        files = [PackedFile(e.relpath, record.sha256[e.relpath]) for e in record.entries if e.kind == "file"]
        manifest = plan.manifest
        dist = distribution.distribution_manifest(manifest.normalized(), manifest_doc,
                                                  source_schema_version=manifest.schema_version)
        lock_bytes = _read_checked(lock_path(plan), lock["lock_digest"], "lock file")
        # Canonical (compact) JSON: deterministic, and json's C encoder, which pretty-printing would not use.
        sbom = sbom_bytes(manifest.name, manifest.version, files, plan.options.epoch)
        small = {"capsule.toml": distribution.toml_bytes(dist), "capsule.lock.json": lock_bytes,
                 "sbom.spdx.json": sbom, "payload.v3.manifest.json": manifest_doc.to_bytes()}
        if plan.readme is not None:
            small[plan.readme.name] = plan.readme.read_bytes()
        payload_size = sum(c.zstd_size_hint or 0 for c in manifest_doc.chunks)
        # no frame-by-frame check here: when the payload step hashed the frames, the bytes must hash to its
        # BLAKE3 as a whole
        payload_blake3 = hashing.result()
        expected = payload.get("payload_blake3")
        if expected is not None and payload_blake3 != expected:
            raise AtoError(E_INTEGRITY, "cannot assemble the artifact: the stored payload is not the one built",
                           hint="`ato cas verify` lists damaged chunks; build again")
        # Unsigned, or signed with --key; signed_at is the build epoch, so signing keeps the build reproducible.
        sig_doc = signature.signature_document(manifest_hash=dist["distribution"]["manifest_hash"],
                                               payload_hash=label(payload_blake3), members=small,
                                               epoch=plan.options.epoch, key=plan.options.signing_key)
        members = [
            archive.Member("capsule.toml", small["capsule.toml"]),
            archive.Member("capsule.lock.json", lock_bytes),
            archive.Member("sbom.spdx.json", sbom),
            archive.Member("signature.json", signature.signature_bytes(sig_doc)),
            archive.Member("payload.tar.zst", pieces=pieces, length=payload_size),
            archive.Member("payload.v3.manifest.json", small["payload.v3.manifest.json"]),
        ]
        if plan.readme is not None:
            members.append(archive.Member(plan.readme.name, small[plan.readme.name]))
        size = archive.capsule_size([m.size for m in members])
        if size > MAX_PAYLOAD_BYTES and not plan.options.force_large_payload:
            raise AtoError(E_PAYLOAD_TOO_LARGE,
                           f"capsule payload is unusually large: {human_bytes(size)} ({size} bytes), threshold is "
                           f"{human_bytes(MAX_PAYLOAD_BYTES)}", hint="use --force-large-payload to override intentionally",
                           details={"size": size, "threshold": MAX_PAYLOAD_BYTES})
        # the temp artifact goes in the build state dir, never in the tree this build packs
        digest, written = archive.write_capsule(plan.out_path, members, plan.options.epoch,
                                                temp_dir=plan.state_dir)
    record_local_build(digest, plan.out_path)
    st = plan.out_path.stat()
    return {"artifact_blake3": digest, "size": written, "manifest_hash": dist["distribution"]["manifest_hash"],
            "large": size > MAX_PAYLOAD_BYTES, "stat": [st.st_size, st.st_mtime_ns, st.st_ino]}


def _payload_pieces(store: CasStore, manifest: PayloadManifest) -> list[bytes | archive.FileRange]:
    """payload.tar.zst as pieces for the writer: views of the packs (no copy), located on this thread."""
    try:
        return list(iter_payload_pieces(store, manifest))
    except ChunkError as exc:
        raise AtoError(E_INTEGRITY, f"cannot assemble the artifact: {exc}",
                       hint="`ato cas verify` lists damaged chunks; delete the build state dir and build again") \
            from None


def _pieces_blake3(pieces: list[bytes | archive.FileRange]) -> str:
    """BLAKE3 of payload.tar.zst from its pieces (for signature.json, which precedes it in the artifact).

    When the payload step hashed the frames, the artifact is refused unless these bytes hash the same
    (a pack damaged or changed in between).
    """
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for piece in pieces:
        hasher.update(piece.view if isinstance(piece, archive.FileRange) else piece)
    return hasher.hexdigest()


def artifact_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    """The artifact is still the one written: same stat, or (touched, copied back) the same BLAKE3."""
    out = plan.out_path
    st = out.stat()
    if [st.st_size, st.st_mtime_ns, st.st_ino] == values.get("stat"):
        return True
    return st.st_size == values.get("size") and blake3_file(out) == values.get("artifact_blake3")


# ---------------------------------------------------------------- the envelope


def inputs_digests(plan: BuildPlan, values: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each step's inputs as one digest: its config and the results it consumed."""
    payload, lock = values.get("payload", {}), values.get("lock", {})
    return {
        "payload": jcs_digest({"config": plan.payload_config_digest, "sources": payload.get("inputs")}),
        "lock": jcs_digest({"config": plan.lock_config, "sources": payload.get("inputs")}),
        "artifact": jcs_digest({"config": plan.artifact_config, "payload": payload.get("artifact_hash"),
                                "lock": lock.get("lock_digest")}),
    }


def build_envelope(plan: BuildPlan, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The build envelope from the step reports ({name, status, values, reasons})."""
    by = {r["name"]: r for r in reports}
    art, pay = by["artifact"]["values"], by["payload"]["values"]
    fresh = by["payload"]["status"] == "ran"
    run = last_run(plan) if fresh else {}
    if run.get("artifact_hash") != pay["artifact_hash"]:
        run = {}
    digests = inputs_digests(plan, {r["name"]: r["values"] for r in reports})
    doc = {
        "ok": True,
        "kind": "capsule",
        "artifact": str(plan.out_path),
        "build_strategy": plan.strategy,
        "schema_version": SCHEMA_VERSION,
        "target": plan.target,
        "derived_from": plan.derived_from,
        "name": plan.manifest.name,
        "version": plan.manifest.version,
        "artifact_blake3": label(art["artifact_blake3"]),
        "size": art["size"],
        "manifest_hash": art["manifest_hash"],
        "signed": plan.options.signing_key is not None,
        "signer": _signer(plan.options.signing_key),
        "payload": {
            "artifact_hash": label(pay["artifact_hash"]),
            "chunks": pay["chunks"],
            "total_raw_size": pay["total_raw_size"],
            "files": len(plan.entries),
            "chunks_inserted": run.get("chunks_inserted", 0),
            "bytes_inserted": run.get("bytes_inserted", 0),
            "files_read": run.get("files_read", 0),
        },
        "up_to_date": all(r["status"] == "up-to-date" for r in reports),
        "tasks": [_task(r, digests[r["name"]]) for r in reports],
        "warnings": plan.warnings,
    }
    return validate(doc, "build")


def _task(report: dict[str, Any], inputs_digest: str) -> dict[str, Any]:
    out = {"name": report["name"], "status": report["status"], "inputs_digest": inputs_digest}
    if report.get("reasons"):
        out["reasons"] = report["reasons"]
    return out


def _signer(key: keys.SigningKey | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {"key_id": key.did, "fingerprint": key.fingerprint, "short_fingerprint": keys.short_fingerprint(key.fingerprint),
            "previous_key": (key.attached_previous_key(_now()) or {}).get("key_id")}


def sweep_leftovers(plan: BuildPlan) -> int:
    """Remove what killed builds left (temp artifacts, CAS temps); returns how many.

    Only temp files whose owner process is gone are removed (cas.tempfiles), so a build running
    at the same time in another process keeps its own.
    """
    report = sweep([plan.state_dir, plan.out_path.parent, plan.store.packs.tmp])
    return len(report.removed)
