"""The build stage chain: lock -> payload -> artifact, planned here and run by doit.

:func:`plan_build` does everything that must happen on every build (read and
validate the manifest, select and hash the source set) and derives each step's
inputs digest; :func:`build_steps` turns the plan into graph steps whose actions
do the expensive work only when those digests changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import write_bytes_atomic
from cas.canonical import jcs_digest
from cas.digest import blake3_file, label, parse
from cas.objects import ObjectError
from cas.payload_manifest import PayloadManifest, PayloadManifestError
from cas.store import CasStore
from cas.tempfiles import sweep, temp_path
from pipeline import paths
from pipeline.envelope import validate
from pipeline.errors import E_ENTRYPOINT, E_PAYLOAD_TOO_LARGE, E_STRICT_FALLBACK, E_USAGE, AtoError
from pipeline.manifest import Manifest, load_manifest, relpath
from pipeline.manifest.ipc import check_document
from pipeline.progress import SILENT, Progress, human_bytes
from stages import build_steps, native_build
from stages.capsule import archive, distribution, keys, signature
from stages.lock import build_lock, entries_listing
from stages.payload import PackedFile, list_stored_payload, pack_payload
from stages.provenance import record_local_build
from stages.sbom import build_sbom
from stages.sources import DigestCache, PackFilter, SourceEntry, collect, generated_entry

BUILD_FORMAT = "ato-build/1"
SCHEMA_VERSION = "0.1"
MAX_PAYLOAD_BYTES = 200 * 1024 * 1024
CONSENT_REQUIRED = "ATO_ERR_CONSENT_REQUIRED"


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
    entries: list[SourceEntry]
    stored_files: list[PackedFile] | None  # set when the payload comes from the CAS (source_digest)
    source_payload: PayloadManifest | None
    out_path: Path
    state_dir: Path
    strategy: str
    target: str
    derived_from: str
    readme: Path | None
    lock_inputs: str
    payload_inputs: str
    artifact_inputs: str
    warnings: list[str] = field(default_factory=list)

    @property
    def store(self) -> CasStore:
        return CasStore(paths.cas_root())


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
    except (ObjectError, PayloadManifestError, ValueError) as exc:
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
        entries = collect(manifest.project_dir, PackFilter(pack.include, pack.exclude),
                          cache=DigestCache(state_dir / "digests.json"))
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
    normalized = manifest.normalized()
    lock_inputs = jcs_digest({"format": BUILD_FORMAT, "manifest": normalized, "epoch": options.epoch,
                              "sources": entries_listing(entries)})
    payload_inputs = jcs_digest({"lock": lock_inputs, "source_payload": source_payload.artifact_hash
                                 if source_payload else None})
    artifact_inputs = jcs_digest({"payload": payload_inputs, "out": str(out_path),
                                  "readme": [readme.name, blake3_file(readme)] if readme else None,
                                  "force_large": options.force_large_payload, "signer": _signer_inputs(options)})
    return BuildPlan(manifest, options, entries, stored_files, source_payload, out_path,
                     state_dir, strategy, target, derived_from, readme,
                     lock_inputs, payload_inputs, artifact_inputs, warnings)


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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _write_json(path: Path, doc: Any) -> None:
    write_bytes_atomic(path, json.dumps(doc, sort_keys=True).encode())


def lock_path(plan: BuildPlan) -> Path:
    return plan.state_dir / "capsule.lock.json"


def payload_record_path(plan: BuildPlan) -> Path:
    return plan.state_dir / "payload.json"


def payload_cache_path(plan: BuildPlan) -> Path:
    """``payload.tar.zst`` of the last build, kept so re-assembling needs no CAS read."""
    return plan.state_dir / "payload.tar.zst"


def write_lock(plan: BuildPlan) -> dict[str, Any]:
    """Lock step: write capsule.lock.json for this source set."""
    lock = build_lock(plan.manifest.normalized(), _targets_summary(plan.manifest), plan.entries, plan.options.epoch)
    data = distribution.jcs(lock)
    write_bytes_atomic(lock_path(plan), data)
    return {"lock_digest": label(blake3.blake3(data).hexdigest())}


def lock_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    path = lock_path(plan)
    return path.is_file() and label(blake3_file(path)) == values.get("lock_digest")


def pack(plan: BuildPlan) -> dict[str, Any]:
    """Payload step: pack the source set into CAS chunks (or take the stored source_digest payload)."""
    with plan.store.shared():  # gc waits until the chunks and the record naming them are written
        if plan.source_payload is not None:
            payload, files = plan.source_payload, plan.stored_files or []
            inserted = bytes_inserted = 0
            payload_blake3 = None
        else:
            frames = temp_path(payload_cache_path(plan))
            try:
                result = pack_payload(plan.entries, plan.store, plan.options.epoch, frames, plan.options.reporter)
                payload_blake3 = blake3_file(frames)
                os.replace(frames, payload_cache_path(plan))
            except BaseException:
                frames.unlink(missing_ok=True)
                raise
            payload, files = result.manifest, result.files
            inserted, bytes_inserted = result.chunks_inserted, result.bytes_inserted
        _write_json(payload_record_path(plan), {"artifact_hash": payload.artifact_hash, "payload_blake3": payload_blake3,
                                                "files": [[f.path, f.sha256] for f in files]})
    return {"artifact_hash": payload.artifact_hash, "chunks_inserted": inserted, "bytes_inserted": bytes_inserted}


def payload_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    recorded = _read_json(payload_record_path(plan))
    if recorded.get("artifact_hash") != values.get("artifact_hash"):
        return False
    store = plan.store
    return not store.missing_chunks(store.get_manifest(values["artifact_hash"]))


def artifact_ok(plan: BuildPlan, values: dict[str, Any]) -> bool:
    out = plan.out_path
    return out.is_file() and out.stat().st_size == values.get("size") and \
        blake3_file(out) == values.get("artifact_blake3")


def materialize_payload(store: CasStore, payload: PayloadManifest, out_path: Path) -> str:
    """Write ``payload.tar.zst`` (the verified frames in order); returns its BLAKE3 hex."""
    hasher = blake3.blake3()
    with open(out_path, "wb") as fh:
        for frame in store.iter_frames(payload):
            fh.write(frame)
            hasher.update(frame)
    return hasher.hexdigest()


def _payload_bytes_hash(store: CasStore, payload: PayloadManifest, cache: Path, recorded: str | None) -> str:
    """BLAKE3 of payload.tar.zst, rebuilding the cached file from the CAS unless it is the recorded one."""
    if recorded and cache.is_file() and blake3_file(cache) == recorded:
        return recorded
    tmp = temp_path(cache)
    digest = materialize_payload(store, payload, tmp)
    os.replace(tmp, cache)
    return digest


def assemble(plan: BuildPlan) -> dict[str, Any]:
    """Artifact step: write the .capsule from the lock, the stored payload and the manifest."""
    store = plan.store
    recorded = _read_json(payload_record_path(plan))
    payload = store.get_manifest(recorded["artifact_hash"])
    files = [PackedFile(p, s) for p, s in recorded["files"]]
    manifest = plan.manifest
    dist = distribution.distribution_manifest(manifest.normalized(), payload,
                                              source_schema_version=manifest.schema_version)
    lock_bytes = lock_path(plan).read_bytes()
    # Canonical (compact) JSON: deterministic, and json's C encoder, which pretty-printing would not use.
    sbom_bytes = distribution.jcs(build_sbom(manifest.name, manifest.version, files, plan.options.epoch))
    scratch = payload_cache_path(plan)
    try:
        payload_hash = _payload_bytes_hash(store, payload, scratch, recorded.get("payload_blake3"))
        small = {"capsule.toml": distribution.toml_bytes(dist), "capsule.lock.json": lock_bytes,
                 "sbom.spdx.json": sbom_bytes, "payload.v3.manifest.json": payload.to_bytes()}
        if plan.readme is not None:
            small[plan.readme.name] = plan.readme.read_bytes()
        # Unsigned, or signed with --key; signed_at is the build epoch, so signing keeps the build reproducible.
        sig_doc = signature.signature_document(manifest_hash=dist["distribution"]["manifest_hash"],
                                            payload_hash=label(payload_hash), members=small,
                                            epoch=plan.options.epoch, key=plan.options.signing_key)
        members = [
            archive.Member("capsule.toml", small["capsule.toml"]),
            archive.Member("capsule.lock.json", lock_bytes),
            archive.Member("sbom.spdx.json", sbom_bytes),
            archive.Member("signature.json", signature.signature_bytes(sig_doc)),
            archive.Member("payload.tar.zst", path=scratch),
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
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    record_local_build(digest, plan.out_path)
    return {"artifact_blake3": digest, "size": written, "manifest_hash": dist["distribution"]["manifest_hash"],
            "large": size > MAX_PAYLOAD_BYTES}


def build_envelope(plan: BuildPlan, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The build envelope from the step reports ({name, status, inputs_digest, values})."""
    by = {r["name"]: r for r in reports}
    art, pay = by["artifact"]["values"], by["payload"]["values"]
    fresh = by["payload"]["status"] == "ran"
    payload = plan.store.get_manifest(pay["artifact_hash"])
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
            "artifact_hash": label(payload.artifact_hash),
            "chunks": len(payload.chunks),
            "total_raw_size": payload.total_raw_size,
            "files": len(plan.entries),
            "chunks_inserted": pay.get("chunks_inserted", 0) if fresh else 0,
            "bytes_inserted": pay.get("bytes_inserted", 0) if fresh else 0,
        },
        "up_to_date": all(r["status"] == "up-to-date" for r in reports),
        "tasks": [{"name": r["name"], "status": r["status"], "inputs_digest": r["inputs_digest"]} for r in reports],
        "warnings": plan.warnings,
    }
    return validate(doc, "build")


def _signer(key: keys.SigningKey | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {"key_id": key.did, "fingerprint": key.fingerprint, "short_fingerprint": keys.short_fingerprint(key.fingerprint),
            "previous_key": (key.attached_previous_key(_now()) or {}).get("key_id")}


def sweep_leftovers(plan: BuildPlan) -> int:
    """Remove what killed builds left (temp artifacts, payload scratch, CAS temps); returns how many.

    Only temp files whose owner process is gone are removed (cas.tempfiles), so a build running
    at the same time in another process keeps its own.
    """
    report = sweep([plan.state_dir, plan.out_path.parent, plan.store.objects.tmp])
    return len(report.removed)
