"""Finalize: a fetched native artifact -> a locally derived app in a fresh ``derived-*`` dir.

``finalize(fetched_dir, output_root)`` copies the app named by the payload's
``ato.delivery.toml`` into ``<output_root>/derived-<UTC yyyymmddTHHMMSSZ>-<8hex>/``,
runs the finalize tool on the copy, and writes ``local-derivation.json`` next to it.
The fetched parent is never written: its tree digest is checked against fetch.json
before the copy and again after the tool ran. Every finalize makes a new dir.

Tools are allowlisted per host (the target's OS and arch must be this host's):

- macOS: ``codesign`` (arguments already checked against the allowlist by the manifest
  model), run on the copy inside the derived dir;
- Linux: the built-in ``ato-sign``: it signs the derived app's tree digest with this
  machine's local derivation key (Ed25519, ``$ATO_HOME/keys/local-derivation-key.json``,
  mode 0600, created on first use) and records the signature and public key in
  local-derivation.json (``local_signature``), so ``project``/``run`` can tell later
  whether the derived app was altered (:func:`check_derivation`).
- Windows: ``signtool``.

Any failure (host/target mismatch, a tool that is not allowed or not installed, a tool
failure, a parent digest mismatch, an app without an executable) deletes the partial
derived dir, so a failed finalize leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas.atomic import fsync_dir, write_bytes_atomic
from cas.canonical import canonical_json
from cas.digest import label, parse
from pipeline import paths
from pipeline.errors import E_POLICY, E_USAGE, AtoError, Problem
from pipeline.manifest import SIDECAR_NAME, DeliveryMeta
from pipeline.manifest.delivery import LINUX_TOOL
from pipeline.manifest.tomlfile import parse_toml, read_text
from stages import fetch as fetch_stage
from stages import native_build
from stages.capsule import keys
from stages.native import SCHEMA_VERSION, check_schema_version, host_target, now_rfc3339, read_doc, write_doc
from stages.trust_port import TrustPort

PROVENANCE = "local-derivation.json"
KEY_FILE = "local-derivation-key.json"
STATEMENT_TYPE = "ato-local-derivation/1"
ALLOWED_TOOLS = {"darwin": ("codesign",), "linux": (LINUX_TOOL,), "windows": ("signtool",)}
E_TOOL = "E102"  # the finalize tool is missing or failed: manual intervention needed
ALLOCATE_ATTEMPTS = 32
OUTPUT_LIMIT = 600


def policy(message: str, **details: Any) -> AtoError:
    return AtoError(E_POLICY, message, details=details,
                    problems=[Problem("ATO_ERR_POLICY_VIOLATION", message, details)])


@dataclass
class FinalizeResult:
    envelope: dict[str, Any]
    provenance: dict[str, Any]
    output_dir: Path
    derived_app: Path


# ---------------------------------------------------------------- the delivery contract of a fetch


def read_delivery(artifact: Path) -> DeliveryMeta:
    """The validated ``ato.delivery.toml`` at the payload root (staged by build)."""
    path = artifact / SIDECAR_NAME
    if not path.is_file() or path.is_symlink():
        raise AtoError(E_USAGE, f"the fetched artifact has no {SIDECAR_NAME} at its payload root, so it is not a "
                                f"native delivery artifact: {artifact}", details={"path": str(artifact)})
    return DeliveryMeta.from_toml_dict(parse_toml(read_text(path), SIDECAR_NAME), SIDECAR_NAME)


def check_host(delivery: DeliveryMeta, host: str | None = None) -> str:
    """The target must be this host (OS and arch), and the tool one this host allows."""
    host = host or host_target()
    host_os, host_arch = host.split("/", 1)
    if delivery.os != host_os:
        raise policy(f"finalize target {delivery.target} does not match this host ({host}): a {delivery.os} "
                     f"app can only be finalized on a {delivery.os} host", target=delivery.target, host=host)
    if delivery.arch != host_arch:
        raise policy(f"finalize target {delivery.target} does not match this host's arch ({host})",
                     target=delivery.target, host=host)
    allowed = ALLOWED_TOOLS.get(host_os, ())
    if delivery.finalize_tool.lower() not in allowed:
        raise policy(f"finalize tool {delivery.finalize_tool!r} is not allowed on {host_os} hosts (allowed: "
                     f"{', '.join(allowed) or 'none'})", tool=delivery.finalize_tool, host=host)
    return host


# ---------------------------------------------------------------- the derived dir


def _allocate(output_root: Path) -> Path:
    output_root.mkdir(parents=True, exist_ok=True)
    for _ in range(ALLOCATE_ATTEMPTS):
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        candidate = output_root / f"derived-{stamp}-{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate, 0o755)
        except FileExistsError:
            continue
        os.chmod(candidate, 0o755)
        return candidate
    raise AtoError(E_USAGE, f"Failed to allocate unique finalize output directory in {output_root}")


def _copy_file(src: Path, dest: Path, mode: int) -> None:
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    os.chmod(dest, (mode & 0o777) | 0o200)


def copy_app(src: Path, dest: Path) -> None:
    """Copy the app (file or tree; modes kept, made owner-writable, symlinks recreated). A symlink
    must point inside the app: the copy stands alone, without the rest of the payload."""
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        _copy_file(src, dest, st.st_mode)
        return
    os.mkdir(dest, 0o700)
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        for name in sorted(dirnames + filenames):
            s = Path(dirpath) / name
            d = dest / rel_dir / name
            rel = (rel_dir / name).as_posix()
            mode = os.lstat(s).st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink(s)
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if target.startswith("/") or joined == ".." or joined.startswith("../"):
                    raise fetch_stage.integrity(f"the app holds a symlink that leaves it: {rel} -> {target}",
                                                path=str(s))
                os.symlink(target, d)
            elif stat.S_ISDIR(mode):
                os.mkdir(d, 0o700)
            elif stat.S_ISREG(mode):
                _copy_file(s, d, mode)
            else:
                raise fetch_stage.integrity(f"the app holds a special file: {rel}", path=str(s))
    for dirpath, _dirs, _files in os.walk(dest, topdown=False):
        rel = Path(dirpath).relative_to(dest)
        os.chmod(dirpath, (os.lstat(src / rel).st_mode & 0o777) | 0o700)
        fsync_dir(Path(dirpath))


# ---------------------------------------------------------------- tools


def rebase_args(delivery: DeliveryMeta) -> list[str]:
    """Arguments equal to the input path become the copy's name (the tool runs in the derived dir)."""
    name = posixpath.basename(delivery.input)
    return [name if a == delivery.input else a for a in delivery.finalize_args]


def _run_external(tool: str, args: list[str], cwd: Path) -> None:
    found = shutil.which(tool)
    if found is None:
        raise AtoError(E_TOOL, f"finalize tool {tool!r} was not found on PATH",
                       details={"tool": tool}, hint=f"install {tool} or run finalize on a host that has it",
                       problems=[Problem("ATO_ERR_ENGINE_MISSING", f"finalize tool {tool} is not installed",
                                         {"tool": tool})])
    try:
        proc = subprocess.run([found, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except OSError as exc:
        raise AtoError(E_TOOL, f"failed to execute {tool} in {cwd}: {exc.strerror or exc}", details={"tool": tool}) from None
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
        status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        text = " ".join(out.split())[:OUTPUT_LIMIT]
        raise AtoError(E_TOOL, f"{tool} failed with {status}" + (f": {text}" if text else ""), details={"tool": tool, "args": args, "output": out[-4000:]})


def local_key_path() -> Path:
    return paths.keys_dir() / KEY_FILE


def _load_key(path: Path) -> keys.SigningKey:
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & 0o077:
        raise policy(f"the local derivation key {path} is readable by others (mode {mode:03o}); expected 0600",
                     path=str(path))
    return keys.load_signing_key(path)


def local_key(create: bool = True) -> keys.SigningKey | None:
    """This machine's local derivation key; created (mode 0600) on first use when ``create``."""
    path = local_key_path()
    if path.is_file():
        return _load_key(path)
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = keys.generate_key(created_at=now_rfc3339())
    data = (json.dumps(key.to_file_json(), indent=2) + "\n").encode()
    write_bytes_atomic(path, data, mode=0o600, no_clobber=True)  # a concurrent first use may win: use its key
    return _load_key(path)


def statement(parent_digest: str, derived_digest: str, target: str) -> bytes:
    """What ato-sign signs: the JCS of the derived digest bound to its parent and target."""
    return canonical_json({"type": STATEMENT_TYPE, "parent_digest": parent_digest, "derived_digest": derived_digest,
                           "target": target})


def ato_sign(parent_digest: str, derived_digest: str, target: str) -> dict[str, Any]:
    key = local_key()
    assert key is not None
    signature = key.sign(statement(parent_digest, derived_digest, target))
    return {"alg": "ed25519", "key_id": key.did, "public_key": keys.b64(key.public), "statement": STATEMENT_TYPE,
            "signature": keys.b64(signature)}


# ---------------------------------------------------------------- finalize


def finalize(fetched_dir: Path, output_root: Path, *, host: str | None = None,
             trust: TrustPort | None) -> FinalizeResult:
    """Derive the app of a fetch. The fetched artifact is accepted first (``trust``: its signature and
    signer, as install and run check them), so nothing untrusted is signed by this machine's key."""
    fetched_dir = Path(fetched_dir).absolute()
    record, artifact = fetch_stage.load_fetched(fetched_dir)
    if not isinstance(record.get("artifact_blake3"), str):
        raise fetch_stage.integrity(f"fetch.json is missing artifact_blake3: {fetched_dir}")
    fetch_stage.accept_fetched(fetched_dir, record, trust)
    parent_digest = fetch_stage.check_parent(artifact, record)
    delivery = read_delivery(artifact)
    check_host(delivery, host)
    source = artifact / delivery.input
    native_build.check_app(source, delivery.target, what="fetched input")
    output_dir = _allocate(Path(output_root).absolute())
    try:
        return _derive(fetched_dir, artifact, record, parent_digest, delivery, source, output_dir)
    except BaseException:
        shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _derive(fetched_dir: Path, artifact: Path, record: dict[str, Any], parent_digest: str, delivery: DeliveryMeta,
            source: Path, output_dir: Path) -> FinalizeResult:
    derived = output_dir / posixpath.basename(delivery.input)
    copy_app(source, derived)
    native_build.check_app(derived, delivery.target, what="derived app")
    signature = None
    if delivery.finalize_tool.lower() != LINUX_TOOL:
        _run_external(delivery.finalize_tool, rebase_args(delivery), output_dir)
        native_build.check_app(derived, delivery.target, what="derived app")
    derived_digest = label(fetch_stage.tree_hex(derived))
    if delivery.finalize_tool.lower() == LINUX_TOOL:
        signature = ato_sign(parent_digest, derived_digest, delivery.target)
    after = label(fetch_stage.tree_hex(artifact))
    if after != parent_digest:
        raise fetch_stage.integrity(f"the fetched parent changed during finalize: expected {parent_digest}, "
                                    f"got {after}", expected=parent_digest, actual=after)
    provenance: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "scoped_id": record["scoped_id"],
        "version": record["version"],
        "registry": record["registry"],
        "artifact_blake3": record["artifact_blake3"],
        "parent_digest": parent_digest,
        "derived_digest": derived_digest,
        "framework": delivery.framework,
        "target": delivery.target,
        "finalized_locally": True,
        "finalize_tool": delivery.finalize_tool,
        "finalized_at": now_rfc3339(),
    }
    if signature is not None:
        provenance["local_signature"] = signature
    provenance_path = output_dir / PROVENANCE
    write_doc(provenance_path, provenance, "local-derivation", no_clobber=True)
    fsync_dir(output_dir)
    fsync_dir(output_dir.parent)
    envelope = {"fetched_dir": str(fetched_dir), "output_dir": str(output_dir), "derived_app_path": str(derived),
                "provenance_path": str(provenance_path), "parent_digest": parent_digest,
                "derived_digest": derived_digest, "schema_version": SCHEMA_VERSION}
    return FinalizeResult(envelope, provenance, output_dir, derived)


# ---------------------------------------------------------------- checking a derived app later


def load_provenance(derived_app: Path) -> tuple[dict[str, Any], Path]:
    """local-derivation.json next to ``derived_app`` (checked), and its path."""
    path = Path(derived_app).parent / PROVENANCE
    if not path.is_file():
        raise AtoError(E_USAGE, f"ato project requires an ato finalize output containing {PROVENANCE} next to the "
                                f"derived app: {derived_app}", details={"path": str(derived_app)})
    doc = read_doc(path, "finalize provenance")
    check_schema_version(doc, path, PROVENANCE)
    if doc.get("finalized_locally") is not True:
        raise AtoError(E_USAGE, "Projection input must be finalized locally via `ato finalize`",
                       details={"path": str(path)})
    for key in ("derived_digest", "parent_digest", "target", "finalize_tool"):
        if not isinstance(doc.get(key), str):
            raise fetch_stage.integrity(f"{PROVENANCE} is missing {key}: {path}", path=str(path))
    try:
        parse(doc["derived_digest"])
    except ValueError as exc:
        raise fetch_stage.integrity(f"{PROVENANCE}: {exc}", path=str(path)) from None
    return doc, path


def check_derivation(derived_app: Path, provenance: dict[str, Any]) -> list[str]:
    """Problems of a derived app against its provenance (empty when intact):
    ``derived_app_missing``, ``derived_app_replaced``, ``derived_digest_mismatch`` and, for ato-sign,
    ``derived_signature_missing``/``derived_signature_invalid``/``derived_signature_untrusted``."""
    if not os.path.lexists(derived_app):
        return ["derived_app_missing"]
    if os.path.islink(derived_app):
        return ["derived_app_replaced"]
    try:
        actual = label(fetch_stage.tree_hex(Path(derived_app)))
    except AtoError:
        return ["derived_app_replaced"]
    problems = []
    if actual != provenance.get("derived_digest"):
        problems.append("derived_digest_mismatch")
    if str(provenance.get("finalize_tool", "")).lower() == LINUX_TOOL:
        problems.extend(_signature_problems(provenance))
    return problems


def _signature_problems(provenance: dict[str, Any]) -> list[str]:
    sig = provenance.get("local_signature")
    if not isinstance(sig, dict):
        return ["derived_signature_missing"]
    try:
        public = keys.unb64(sig.get("public_key"), 32, "public_key")
        raw = keys.unb64(sig.get("signature"), 64, "signature")
        did = keys.did_key(public)
    except ValueError:
        return ["derived_signature_invalid"]
    if sig.get("key_id") != did or not keys.verify_ed25519(
            did, raw, statement(provenance["parent_digest"], provenance["derived_digest"], provenance["target"])):
        return ["derived_signature_invalid"]
    try:
        key = local_key(create=False)
    except AtoError:
        key = None
    if key is None or key.did != did:
        return ["derived_signature_untrusted"]
    return []


def require_intact(derived_app: Path, provenance: dict[str, Any]) -> None:
    """E208 unless the derived app matches its provenance (project and run call this)."""
    problems = check_derivation(derived_app, provenance)
    if not problems:
        return
    if problems == ["derived_app_missing"]:
        raise AtoError(E_USAGE, f"derived app does not exist: {derived_app}", details={"path": str(derived_app)})
    if "derived_digest_mismatch" in problems:
        actual = label(fetch_stage.tree_hex(Path(derived_app)))
        raise fetch_stage.integrity(f"Derived artifact digest mismatch: expected {provenance['derived_digest']}, "
                                    f"got {actual}", expected=provenance["derived_digest"], actual=actual,
                                    path=str(derived_app))
    raise fetch_stage.integrity(f"the derived app failed its local derivation check ({', '.join(problems)}): "
                                f"{derived_app}", problems=problems, path=str(derived_app))

