"""Native delivery, build side: run a command-mode target's build, then check the app it made.

Command mode is a native target whose entrypoint is a program with ``cmd`` arguments
(``entrypoint = "sh"`` + ``cmd = ["build.sh"]``) and inline ``[artifact]`` + ``[finalize]``.
:func:`prepare` runs that command in the project (or ``working_dir``) with a clean
environment, before the source set is collected, so the payload holds what it built.

:func:`check_app` is the one shape check of a native app, used on the build input, on
the fetched input before finalize, and on the derived copy after the tool ran:

- ``linux/*``: an ELF executable (the x bit set, a well-formed ELF header of type
  EXEC or DYN, built for the target's arch) or a directory holding at least one;
- ``darwin/*``: a ``.app`` directory; if it has ``Contents/MacOS``, every regular
  file there needs an x bit and there must be at least one;
- ``windows/*``: a PE ``.exe`` that is not a DLL, or a directory.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from pipeline.errors import E_ENTRYPOINT, E_MANIFEST, AtoError
from pipeline.manifest import DeliveryMeta, Manifest
from pipeline.manifest import relpath as relpaths
from stages.build_steps import clean_env, run_command

_ELF_MACHINES = {62: "x86_64", 183: "arm64", 3: "x86", 40: "arm"}
MAX_SCAN_DEPTH = 6


def build_command(manifest: Manifest) -> tuple[str, list[str], Path] | None:
    """(program, args, working dir) of a command-mode native target, or None (nothing to run)."""
    if not manifest.is_native() or manifest.delivery is None:
        return None
    target = manifest.primary_target()
    program = (target.entrypoint or "").strip()
    if not program or not target.cmd:
        return None
    project = manifest.project_dir.resolve()
    workdir = project
    if target.working_dir:
        reason = relpaths.escape_reason(target.working_dir)
        if reason:
            raise AtoError(E_MANIFEST, f"{manifest.path.name}: targets.{target.label}.working_dir "
                                       f"{target.working_dir!r} {reason}")
        workdir = project / relpaths.normalize(target.working_dir)
        if not workdir.is_dir():
            raise AtoError(E_MANIFEST, f"{manifest.path.name}: targets.{target.label}.working_dir is not a "
                                       f"directory: {workdir}")
    return program, [str(a) for a in target.cmd], workdir


def run_build_command(manifest: Manifest) -> dict[str, object] | None:
    """Run the command-mode build; its output is captured and shown only when it fails."""
    command = build_command(manifest)
    if command is None:
        return None
    program, args, workdir = command
    run_command([program, *args], workdir, clean_env(manifest), what="native delivery build command",
                shown_as=" ".join([program, *args]))
    return {"command": [program, *args], "working_dir": str(workdir)}


def input_path(project_dir: Path, delivery: DeliveryMeta) -> Path:
    """The app ``[artifact].input`` names, checked to exist and to stay inside the project."""
    root = project_dir.resolve()
    path = root / delivery.input
    if not path.exists() and not path.is_symlink():
        hint = _nearby(root, path)
        raise AtoError(E_ENTRYPOINT, f"native delivery input {delivery.input!r} does not exist: {path}"
                                     + (f" (found nearby: {', '.join(hint)})" if hint else ""),
                       details={"input": delivery.input, "path": str(path), "candidates": hint},
                       hint="make [artifact].input match the path the build command writes")
    real = path.resolve()
    if real != root and root not in real.parents:
        raise AtoError(E_ENTRYPOINT, f"native delivery input {delivery.input!r} resolves outside the project: "
                                     f"{real}", details={"input": delivery.input, "path": str(real)})
    return path


def _nearby(root: Path, missing: Path) -> list[str]:
    """Up to five executables near a missing input, to suggest the right path."""
    base = missing.parent
    while base != root and not base.is_dir():
        base = base.parent
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        depth = len(Path(dirpath).relative_to(base).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_SCAN_DEPTH)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 and elf_machine(p) is not None:
                found.append(str(p.relative_to(root)))
    return sorted(found)[:5]


# ---------------------------------------------------------------- executable formats


def elf_machine(path: Path) -> str | None:
    """The arch of an ELF executable or shared object (``x86_64``/``arm64``/...), or None when it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    if head[4] == 2 and len(head) < 64:
        return None
    endian = "<" if head[5] == 1 else ">"
    e_type, e_machine = struct.unpack(endian + "HH", head[16:20])
    if e_type not in (2, 3):  # ET_EXEC, ET_DYN (PIE)
        return None
    return _ELF_MACHINES.get(e_machine, f"machine-{e_machine}")


def pe_kind(path: Path) -> str | None:
    """``exe``/``dll`` for a PE image, None when it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    if len(head) < 64 or head[:2] != b"MZ":
        return None
    (offset,) = struct.unpack("<I", head[60:64])
    if offset + 24 > len(head) or head[offset:offset + 4] != b"PE\0\0":
        return None
    (characteristics,) = struct.unpack("<H", head[offset + 22:offset + 24])
    return "dll" if characteristics & 0x2000 else "exe"


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode


def linux_executables(root: Path, arch: str | None = None) -> list[Path]:
    """Regular files with an x bit and an ELF header (for ``arch`` when given) under ``root``, sorted."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            mode = _mode(p)
            if stat.S_ISREG(mode) and mode & 0o111:
                machine = elf_machine(p)
                if machine is not None and (arch is None or machine == arch):
                    out.append(p)
    return out


def check_app(path: Path, target: str, *, what: str) -> None:
    """Refuse an app that cannot be what ``target`` says (see the module docstring). ``what`` names the
    phase for messages: ``build input``, ``fetched input``, ``derived app``."""
    os_, arch = target.split("/", 1)
    if not path.exists() and not path.is_symlink():
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} does not exist: {path}", details={"path": str(path)})
    mode = _mode(path)
    if stat.S_ISLNK(mode):
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is a symlink, not the app itself: {path}",
                       details={"path": str(path)})
    if os_ == "linux":
        _check_linux(path, mode, arch, what)
    elif os_ == "darwin":
        _check_darwin(path, mode, what)
    else:
        _check_windows(path, mode, what)


def _check_linux(path: Path, mode: int, arch: str, what: str) -> None:
    if stat.S_ISDIR(mode):
        if linux_executables(path, arch):
            return
        other = linux_executables(path)
        extra = (f"; it holds ELF executables for another arch ({elf_machine(other[0])}) than linux/{arch}"
                 if other else "")
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is missing a regular ELF executable with the x bit "
                                     f"in {path}{extra}", details={"path": str(path)})
    if not stat.S_ISREG(mode):
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is neither a file nor a directory: {path}",
                       details={"path": str(path)})
    machine = elf_machine(path)
    if machine is None:
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is not an ELF executable (linux/{arch} target): "
                                     f"{path}", details={"path": str(path)})
    if not mode & 0o111:
        raise AtoError(E_ENTRYPOINT, f"executable bit is missing for {path} (mode {stat.S_IMODE(mode):03o})",
                       details={"path": str(path), "mode": f"{stat.S_IMODE(mode):03o}"},
                       hint="chmod +x the build output")
    if machine != arch:
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is an ELF for {machine}, but the target is "
                                     f"linux/{arch}: {path}", details={"path": str(path), "elf_arch": machine})


def _check_darwin(path: Path, mode: int, what: str) -> None:
    if not stat.S_ISDIR(mode) or path.suffix.lower() != ".app":
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is not a .app directory: {path}",
                       details={"path": str(path)})
    macos = path / "Contents" / "MacOS"
    if not macos.is_dir():
        return
    files = [p for p in sorted(macos.iterdir()) if stat.S_ISREG(_mode(p))]
    if not files:
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is missing a regular executable in {macos}",
                       details={"path": str(macos)})
    for p in files:
        m = _mode(p)
        if not m & 0o111:
            raise AtoError(E_ENTRYPOINT, f"executable bit is missing for {p} (mode {stat.S_IMODE(m):03o})",
                           details={"path": str(p), "mode": f"{stat.S_IMODE(m):03o}"})


def _check_windows(path: Path, mode: int, what: str) -> None:
    if stat.S_ISDIR(mode):
        return
    kind = pe_kind(path) if stat.S_ISREG(mode) else None
    if kind is None:
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is not a PE image: {path}", details={"path": str(path)})
    if kind == "dll":
        raise AtoError(E_ENTRYPOINT, f"native delivery {what} is a DLL, not an .exe: {path}",
                       details={"path": str(path)})


def prepare(manifest: Manifest) -> dict[str, object] | None:
    """Build step for native targets, before the source set is collected: run the command (command
    mode), then check the app it made. Returns what ran (None for non-native manifests)."""
    delivery = manifest.delivery
    if not manifest.is_native() or delivery is None:
        return None
    ran = run_build_command(manifest)
    path = input_path(manifest.project_dir, delivery)
    check_app(path, delivery.target, what="build input")
    return {"build_command": ran, "input": str(path)}


def check_payload_input(delivery: DeliveryMeta, relpaths_in_payload: dict[str, int]) -> None:
    """The app must reach the payload intact: ``[pack]`` rules must not drop it or its x bit.
    ``relpaths_in_payload`` maps payload paths to their (normalized) modes."""
    prefix = delivery.input.rstrip("/") + "/"
    mine = {p: m for p, m in relpaths_in_payload.items() if p == delivery.input or p.startswith(prefix)}
    if not mine:
        raise AtoError(E_ENTRYPOINT, f"native delivery input {delivery.input!r} is not in the payload "
                                     "(excluded by [pack] or the default excludes)",
                       details={"input": delivery.input}, hint="add it to [pack].include or move it")
    if delivery.os == "linux" and not any(m & 0o111 for m in mine.values()):
        raise AtoError(E_ENTRYPOINT, f"native delivery input {delivery.input!r} has no executable file in the "
                                     "payload", details={"input": delivery.input})
