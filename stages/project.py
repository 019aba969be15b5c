"""Projection: put a locally derived app where the desktop looks for apps, and take it back out.

``project(derived_app)`` checks the derived app against its ``local-derivation.json``
(tree digest, and the ato-sign signature by this machine's key), then creates:

- Linux: ``<launcher_dir>/<command>.desktop`` (default ``$XDG_DATA_HOME/applications``)
  and the command symlink ``~/.local/bin/<command>`` -> the app's executable;
- macOS: the symlink ``<launcher_dir>/<App>.app`` (default ``~/Applications``) -> the app.

What it created is recorded in ``$ATO_HOME/native-delivery/projections/<projection_id>.json``
(including the launcher dirs it had to create), and ``unproject`` removes exactly that:
a launcher or command path that is no longer what project wrote is refused, never deleted.
``project ls`` inspects every record: ``ok``, or ``broken`` with problem codes.

The ``.desktop`` file follows the Desktop Entry Specification 1.5: string values escape
``\\``, newline, tab and CR (and a leading space as ``\\s``); the ``Exec`` argument is quoted
when it holds a reserved character, with ``"`` `` ` `` ``$`` ``\\`` backslash-escaped inside the
quotes, ``%`` doubled, and the string escapes applied on top.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import Any

import blake3

from cas.atomic import fsync_dir, write_bytes_atomic
from cas.digest import blake3_bytes, label
from cas.filelock import flocked
from pipeline import paths
from pipeline.errors import E_POLICY, E_USAGE, AtoError, Problem
from stages import fetch as fetch_stage
from stages import finalize as finalize_stage
from stages.native import (
    ACCEPTED_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    host_target,
    now_rfc3339,
    read_doc,
    write_doc,
)
from stages.trust_port import TrustPort

KIND_SYMLINK = "symlink"
KIND_DESKTOP = "linux-desktop-entry"
KINDS = (KIND_SYMLINK, KIND_DESKTOP)
MAX_COMMAND_DEPTH = 3
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _usage(message: str, **details: Any) -> AtoError:
    return AtoError(E_USAGE, message, details=details)


def _conflict(message: str, **details: Any) -> AtoError:
    return AtoError(E_POLICY, message, details=details,
                    problems=[Problem("ATO_ERR_POLICY_VIOLATION", message, details)])


# ---------------------------------------------------------------- names and the desktop entry


def sanitize_command(name: str) -> str:
    """``My App`` -> ``my-app``: ASCII letters, digits, ``-``, ``_``; runs of ``-`` collapsed; else ``ato-app``."""
    out = "".join(c.lower() if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in name)
    out = re.sub(r"-{2,}", "-", out).strip("-")
    return out or "ato-app"


def display_name(derived_app: Path, scoped_id: str | None) -> str:
    stem = derived_app.stem if derived_app.suffix.lower() == ".app" else derived_app.name
    return stem or (scoped_id or "").rsplit("/", 1)[-1] or "ato app"


def command_name(derived_app: Path, scoped_id: str | None) -> str:
    base = (scoped_id or "").rsplit("/", 1)[-1].strip() or derived_app.stem
    return sanitize_command(base)


def escape_string(value: str) -> str:
    """A Desktop Entry ``string``/``localestring`` value."""
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if out.startswith(" "):
        out = "\\s" + out[1:]
    return out


def escape_exec_arg(value: str) -> str:
    """One ``Exec`` argument: quoted when it holds a reserved character, then string-escaped."""
    arg = value
    if any(c in _RESERVED for c in arg):
        arg = '"' + re.sub(r'(["`$\\])', r"\\\1", arg) + '"'
    return escape_string(arg.replace("%", "%%"))


def _check_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _usage(f"{what} is not valid UTF-8, which a .desktop file cannot hold: {value!r}") from None
    if _CONTROL.search(value):
        raise _usage(f"{what} holds a control character, which a .desktop file cannot hold: {value!r}")
    return value


def render_desktop(name: str, exec_path: str, work_dir: str) -> bytes:
    lines = ["[Desktop Entry]", "Type=Application", "Version=1.0",
             f"Name={escape_string(_check_text(name, 'the app name'))}",
             f"Exec={escape_exec_arg(_check_text(exec_path, 'the command path'))}",
             f"Path={escape_string(_check_text(work_dir, 'the app path'))}",
             "Terminal=false"]
    return ("\n".join(lines) + "\n").encode("utf-8")


def command_target(derived_app: Path) -> Path:
    """The executable the command symlink points at: the app itself (a file), ``<dir>/<stem>``, or the
    only executable file within three levels of the app dir."""
    st = os.lstat(derived_app)
    if stat.S_ISREG(st.st_mode):
        if not st.st_mode & 0o111:
            raise _usage(f"Projection input is not executable: {derived_app}")
        return derived_app
    named = derived_app / derived_app.stem
    with contextlib.suppress(OSError):
        nst = os.lstat(named)
        if stat.S_ISREG(nst.st_mode) and nst.st_mode & 0o111:
            return named
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(derived_app):
        depth = len(Path(dirpath).relative_to(derived_app).parts)
        dirnames[:] = sorted(dirnames) if depth + 1 < MAX_COMMAND_DEPTH else []
        for name in sorted(filenames):
            p = Path(dirpath) / name
            m = os.lstat(p).st_mode
            if stat.S_ISREG(m) and m & 0o111:
                found.append(p)
    if not found:
        raise _usage(f"Projection input is missing an executable command within {MAX_COMMAND_DEPTH} levels of "
                     f"{derived_app}", path=str(derived_app))
    if len(found) > 1:
        shown = ", ".join(str(p.relative_to(derived_app)) for p in found[:8])
        raise _usage(f"Projection input contains multiple executable command candidates within {MAX_COMMAND_DEPTH} "
                     f"levels of {derived_app}: {shown}", path=str(derived_app))
    return found[0]


def projection_id(derived_app_path: str, projected_path: str, derived_digest: str) -> str:
    data = f"{derived_app_path}\0{projected_path}\0{derived_digest}".encode()
    return blake3.blake3(data).digest()[:8].hex()


# ---------------------------------------------------------------- records


def metadata_path(pid: str) -> Path:
    return paths.projections_dir() / f"{pid}.json"


def _locked() -> contextlib.AbstractContextManager[None]:
    # Engine state, so a refused projection leaves no dir behind.
    return flocked(paths.state_dir() / "native-delivery" / "projections.lock")


def load_records() -> list[tuple[Path, dict[str, Any]]]:
    """Every projection record, sorted by file name; an unreadable one fails (never silently skipped)."""
    root = paths.projections_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("*.json")):
        if path.name.startswith("."):
            continue
        doc = read_doc(path, "projection metadata")
        if not isinstance(doc.get("projection_id"), str) or not isinstance(doc.get("projected_path"), str):
            raise fetch_stage.integrity(f"Failed to parse {path}: not a projection record", path=str(path))
        out.append((path, doc))
    return out


def _work_dir(derived: Path) -> str:
    """``Path=``: the app dir, or for a single-file app the derived dir holding it."""
    return str(derived if derived.is_dir() and not derived.is_symlink() else derived.parent)


def _link_points_to(path: Path, target: str) -> bool:
    try:
        return os.readlink(path) == target
    except OSError:
        return False


def inspect(record: dict[str, Any]) -> list[str]:
    """Problem codes of one projection record (empty: ``ok``)."""
    problems: list[str] = []
    version = record.get("schema_version")
    if version not in ACCEPTED_SCHEMA_VERSIONS:
        problems.append(f"unsupported_schema_version:{version}")
    kind = record.get("projection_kind")
    if kind not in KINDS:
        problems.append(f"unsupported_projection_kind:{kind}")
    target = str(record.get("target", ""))
    if target.split("/", 1)[0] != host_target().split("/", 1)[0]:
        problems.append(f"unsupported_target:{target}")
    projected = Path(record["projected_path"])
    derived = str(record.get("derived_app_path", ""))
    if not os.path.lexists(projected):
        problems.append("projected_path_missing")
    elif kind == KIND_SYMLINK:
        if not projected.is_symlink():
            problems.append("projected_path_replaced")
        elif not _link_points_to(projected, derived):
            problems.append("projected_symlink_target_mismatch")
    elif kind == KIND_DESKTOP:
        if projected.is_symlink() or not projected.is_file():
            problems.append("projected_path_replaced")
        elif projected.read_bytes() != _recorded_desktop(record):
            problems.append("projected_desktop_entry_mismatch")
    if kind == KIND_DESKTOP:
        problems.extend(_command_problems(record))
    problems.extend(_derived_problems(record))
    return problems


def _recorded_desktop(record: dict[str, Any]) -> bytes | None:
    """The desktop entry project wrote, re-rendered from the record (None when the record lacks it)."""
    try:
        return render_desktop(record["desktop_name"], record["projected_command_path"], record["desktop_path_value"])
    except (KeyError, AtoError):
        return None


def _command_problems(record: dict[str, Any]) -> list[str]:
    command = record.get("projected_command_path")
    target = record.get("projected_command_target")
    if not command or not target:
        return ["projected_command_missing"]
    path = Path(command)
    if not os.path.lexists(path):
        return ["projected_command_missing"]
    if not path.is_symlink():
        return ["projected_command_replaced"]
    if not _link_points_to(path, target):
        return ["projected_command_target_mismatch"]
    if not os.path.lexists(target):
        derived = record.get("derived_app_path", "")
        # the derived app itself is gone: reported once, as derived_app_missing
        return [] if not os.path.lexists(derived) else ["projected_command_target_missing"]
    return []


def _derived_problems(record: dict[str, Any]) -> list[str]:
    derived = Path(str(record.get("derived_app_path", "")))
    provenance: dict[str, Any] = dict(record)
    try:
        provenance = read_doc(Path(record["provenance_path"]), "finalize provenance")
    except (AtoError, KeyError):
        if os.path.lexists(derived):
            return ["provenance_missing", *finalize_stage.check_derivation(derived, provenance)]
    problems = finalize_stage.check_derivation(derived, provenance)
    if provenance.get("derived_digest") != record.get("derived_digest") and "derived_app_missing" not in problems \
            and "derived_digest_mismatch" not in problems:
        problems.append("derived_digest_mismatch")
    return problems


def status(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    problems = inspect(record)
    return {"projection_id": record["projection_id"], "metadata_path": str(path),
            "launcher_dir": record.get("launcher_dir", ""), "projected_path": record["projected_path"],
            "derived_app_path": record.get("derived_app_path", ""),
            "parent_digest": record.get("parent_digest", ""), "derived_digest": record.get("derived_digest", ""),
            "state": "broken" if problems else "ok", "problems": problems,
            "projected_at": record.get("projected_at", ""), "projection_kind": record.get("projection_kind", ""),
            "schema_version": record.get("schema_version", "")}


def list_projections() -> dict[str, Any]:
    items = [status(p, r) for p, r in load_records()]
    return {"projections": items, "total": len(items), "broken": sum(1 for i in items if i["state"] == "broken")}


# ---------------------------------------------------------------- project


def _mkdirs(path: Path, created: list[Path]) -> None:
    """mkdir -p, remembering (outermost first) every dir this call created."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        created.append(d)
        fsync_dir(d.parent)
    if not path.is_dir():
        raise _usage(f"launcher directory is not a directory: {path}")


def _rollback(made: list[Path], created_dirs: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            os.unlink(p)
    for d in reversed(created_dirs):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _envelope(pid: str, meta: Path, record: dict[str, Any], problems: list[str], created: bool) -> dict[str, Any]:
    return {"projection_id": pid, "metadata_path": str(meta), "launcher_dir": record["launcher_dir"],
            "projected_path": record["projected_path"], "derived_app_path": record["derived_app_path"],
            "parent_digest": record["parent_digest"], "derived_digest": record["derived_digest"],
            "state": "broken" if problems else "ok", "problems": problems, "created": created,
            "schema_version": record.get("schema_version", SCHEMA_VERSION)}


def project(derived_app: Path, launcher_dir: Path | None = None, *, host: str | None = None,
            trust: TrustPort | None) -> dict[str, Any]:
    """Project a derived app; a second call for the same app is a no-op (``created: false``).

    The artifact the app was derived from (``$ATO_HOME/fetches/<parent>/artifact.capsule``) is
    accepted first through ``trust``, exactly as install and run accept it."""
    given = Path(derived_app).absolute()
    if not os.path.lexists(given):
        raise _usage(f"derived app does not exist: {given}", path=str(given))
    derived = given.resolve()
    provenance, provenance_path = finalize_stage.load_provenance(derived)
    host = host or host_target()
    host_os = host.split("/", 1)[0]
    target = str(provenance["target"])
    if target.split("/", 1)[0] not in ("darwin", "linux", "windows"):
        raise _usage(f"Projection input target '{target}' is unsupported; expected a darwin/<arch>, linux/<arch>, "
                     "or windows/<arch> target")
    if target.split("/", 1)[0] != host_os:
        raise _conflict(f"Projection input target '{target}' is unsupported on this host; expected a "
                        f"{host_os}/<arch> target", target=target, host=host)
    _accept_origin(provenance, trust)
    finalize_stage.require_intact(derived, provenance)
    kind = KIND_DESKTOP if host_os == "linux" else KIND_SYMLINK
    scoped_id = provenance.get("scoped_id")
    record: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "projection_id": "", "projection_kind": kind,
                              "projected_at": now_rfc3339()}
    command_path: Path | None = None
    if kind == KIND_DESKTOP:
        launcher = (launcher_dir or paths.applications_dir()).absolute()
        command = command_name(derived, scoped_id)
        projected = launcher / f"{command}.desktop"
        command_path = paths.user_bin_dir().absolute() / command
        exec_target = command_target(derived)
        name = display_name(derived, scoped_id)
        work_dir = _work_dir(derived)
        desktop = render_desktop(name, str(command_path), work_dir)  # refuses unrepresentable paths up front
    else:
        if host_os == "darwin" and not (derived.is_dir() and derived.suffix == ".app"):
            raise _usage(f"Projection input must be a .app bundle: {derived}")
        launcher = (launcher_dir or paths.macos_applications_dir()).absolute()
        projected = launcher / derived.name
    pid = projection_id(str(derived), str(projected), provenance["derived_digest"])
    record.update({"projection_id": pid, "launcher_dir": str(launcher), "projected_path": str(projected),
                   "derived_app_path": str(derived)})
    if kind == KIND_DESKTOP:
        record.update({"projected_command_path": str(command_path), "projected_command_target": str(exec_target)})
    record.update({"provenance_path": str(provenance_path), "parent_digest": provenance["parent_digest"],
                   "derived_digest": provenance["derived_digest"]})
    for key in ("scoped_id", "version", "registry", "artifact_blake3"):
        if isinstance(provenance.get(key), str):
            record[key] = provenance[key]
    record.update({"framework": provenance.get("framework", ""), "target": target,
                   "finalized_at": provenance.get("finalized_at", "")})
    if kind == KIND_DESKTOP:
        record.update({"desktop_name": name, "desktop_path_value": work_dir,
                       "desktop_entry_blake3": label(blake3_bytes(desktop))})
    with _locked():
        existing = _check_conflicts(record)
        if existing is not None:
            return existing
        created_dirs: list[Path] = []
        made: list[Path] = []
        try:
            _mkdirs(launcher, created_dirs)
            if kind == KIND_DESKTOP:
                if not write_bytes_atomic(projected, desktop, mode=0o644, no_clobber=True):
                    raise _conflict(f"Projection name conflict: launcher path already exists: {projected}")
                made.append(projected)
                _mkdirs(command_path.parent, created_dirs)
                os.symlink(str(exec_target), command_path)
                made.append(command_path)
                fsync_dir(command_path.parent)
            else:
                os.symlink(str(derived), projected)
                made.append(projected)
                fsync_dir(launcher)
            record["created_dirs"] = [str(d) for d in created_dirs]
            meta = metadata_path(pid)
            write_doc(meta, record, "projection-record", no_clobber=True)
            made.append(meta)
        except FileExistsError as exc:  # lost a race with something that appeared meanwhile
            _rollback(made, created_dirs)
            what = "command" if command_path is not None and str(exc.filename) == str(command_path) else "name"
            where = "command path" if what == "command" else "launcher path"
            raise _conflict(f"Projection {what} conflict: {where} already exists: {exc.filename}") from None
        except BaseException:
            _rollback(made, created_dirs)
            raise
    return _envelope(pid, meta, record, inspect(record), True)


def _accept_origin(provenance: dict[str, Any], trust: TrustPort | None) -> None:
    """The fetched artifact behind a derived app, checked as fetch checked it."""
    try:
        fetched = fetch_stage.cache_dir_for(provenance["parent_digest"])
    except (KeyError, ValueError):
        raise fetch_stage.integrity("local-derivation.json does not name a valid parent_digest") from None
    if not isinstance(provenance.get("artifact_blake3"), str):
        raise fetch_stage.integrity("local-derivation.json does not name the artifact the app was derived from "
                                    "(artifact_blake3), so its signature cannot be checked",
                                    hint="finalize it again from an `ato fetch`")
    record = {"scoped_id": provenance.get("scoped_id", ""), "registry": provenance.get("registry", ""),
              "artifact_blake3": provenance.get("artifact_blake3")}
    fetch_stage.accept_fetched(fetched, record, trust)


def _check_conflicts(record: dict[str, Any]) -> dict[str, Any] | None:
    """None when the projection can be created; the existing envelope when it already is (and ok)."""
    projected = record["projected_path"]
    command = record.get("projected_command_path")
    for path, other in load_records():
        if other.get("derived_app_path") == record["derived_app_path"]:
            problems = inspect(other)
            if not problems and other.get("projected_path") == projected:
                return _envelope(other["projection_id"], path, other, problems, False)
            raise _conflict(f"Derived app is already projected via '{other.get('projected_path')}' (id "
                            f"{other['projection_id']}). Use 'ato unproject' first.",
                            projection_id=other["projection_id"])
        if other.get("projected_path") == projected:
            raise _conflict(f"Projection name conflict: '{projected}' is already managed by projection "
                            f"{other['projection_id']}", projection_id=other["projection_id"])
        if command and other.get("projected_command_path") == command:
            raise _conflict(f"Projection command conflict: '{command}' is already managed by projection "
                            f"{other['projection_id']}", projection_id=other["projection_id"])
    if os.path.lexists(projected):
        raise _conflict(f"Projection name conflict: launcher path already exists: {projected}", path=projected)
    if command and os.path.lexists(command):
        raise _conflict(f"Projection command conflict: command path already exists: {command}", path=command)
    return None


# ---------------------------------------------------------------- unproject


def _find(ref: str) -> tuple[Path, dict[str, Any]]:
    records = load_records()
    if not records:
        raise _usage(f"No projection metadata found in {paths.projections_dir()}")
    candidates = {ref}
    if ref and not re.fullmatch(r"[0-9a-f]{16}", ref):
        p = Path(ref).expanduser().absolute()
        candidates.add(str(p))
        with contextlib.suppress(OSError):
            candidates.add(str(p.resolve()))
    hits = [(path, r) for path, r in records
            if r.get("projection_id") in candidates or str(path) in candidates
            or r.get("projected_path") in candidates or r.get("derived_app_path") in candidates]
    if not hits:
        raise _usage(f"Projection not found: {ref}", hint="see `ato project ls`")
    if len(hits) > 1:
        raise _usage(f"Projection reference is ambiguous: {ref}", ids=[r["projection_id"] for _p, r in hits])
    return hits[0]


def _refuse(path: Path, why: str) -> AtoError:
    return _conflict(f"Refusing to remove unexpected projected path: {path} ({why}); restore or remove it by "
                     "hand, then run ato unproject again", path=str(path))


def _removal_plan(record: dict[str, Any]) -> list[Path]:
    """The paths unproject will remove, after checking each is still exactly what project created."""
    remove: list[Path] = []
    kind = record.get("projection_kind")
    projected = Path(record["projected_path"])
    if os.path.lexists(projected):
        if kind == KIND_SYMLINK:
            if not projected.is_symlink() or not _link_points_to(projected, record.get("derived_app_path", "")):
                raise _refuse(projected, "not the symlink ato project created")
        elif kind == KIND_DESKTOP:
            if projected.is_symlink() or not projected.is_file():
                raise _refuse(projected, "not a regular file")
            want = record.get("desktop_entry_blake3")
            if want is None or label(blake3_bytes(projected.read_bytes())) != want:
                raise _refuse(projected, "its content is not the desktop entry ato project wrote")
        else:
            raise _refuse(projected, f"unknown projection kind {kind!r}")
        remove.append(projected)
    command = record.get("projected_command_path")
    if command and os.path.lexists(command):
        cpath = Path(command)
        if not cpath.is_symlink() or not _link_points_to(cpath, record.get("projected_command_target", "")):
            raise _refuse(cpath, "not the command symlink ato project created")
        remove.append(cpath)
    return remove


def check_unproject(record: dict[str, Any]) -> list[Path]:
    """What unproject would remove for ``record``; raises (removing nothing) when a launcher or command
    path is no longer exactly what project created (uninstall checks every record before it starts)."""
    return _removal_plan(record)


def unproject(ref: str) -> dict[str, Any]:
    with _locked():
        meta, record = _find(ref)
        problems = inspect(record)
        remove = _removal_plan(record)
        projected = Path(record["projected_path"])
        for p in remove:
            os.unlink(p)
            fsync_dir(p.parent)
        os.unlink(meta)
        fsync_dir(meta.parent)
        for d in sorted((Path(x) for x in record.get("created_dirs", [])), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only when empty: anything else put there since is left alone
                fsync_dir(d.parent)
    return {"projection_id": record["projection_id"], "metadata_path": str(meta), "projected_path": str(projected),
            "removed_projected_path": projected in remove, "removed_metadata": True,
            "state_before": "broken" if problems else "ok", "problems_before": problems,
            "schema_version": record.get("schema_version", SCHEMA_VERSION)}
