"""Helpers for the native delivery tests: a tiny C program, command-mode projects, an independent
tree digest, directory snapshots."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import blake3
import pytest

from pipeline.manifest.delivery import host_arch

HELLO_C = '#include <stdio.h>\nint main(int argc, char **argv) { (void)argc; (void)argv; puts("%s"); return 0; }\n'
CC = shutil.which("gcc") or shutil.which("cc")
HOST_TARGET = f"linux/{host_arch()}"


def trust(**kwargs: Any) -> Any:
    """The trust port the in-process native tests accept their artifacts with: these unsigned test
    capsules are built in another ATO_HOME, so they need --allow-unsigned like any foreign one."""
    from pipeline.trust.verify import installer_verifier

    return installer_verifier(allow_unsigned=True, **kwargs)


def mac_app_project(root: Path, name: str = "my-app") -> Path:
    """A `.app`-entrypoint project (a darwin/arm64 native target) with a stand-in Mach-O binary."""
    macos = root / "MyApp.app" / "Contents" / "MacOS"
    macos.mkdir(parents=True)
    (macos / "MyApp").write_bytes(b"\xcf\xfa\xed\xfe fake mach-o")
    (macos / "MyApp").chmod(0o755)
    (root / "capsule.toml").write_text(f'schema_version = "0.2"\nname = "{name}"\nversion = "0.1.0"\ntype = "app"\n'
                                       'default_target = "desktop"\n\n[targets.desktop]\nruntime = "source"\n'
                                       'driver = "native"\nentrypoint = "MyApp.app"\n')
    return root


def need_cc() -> str:
    if CC is None:
        pytest.skip("no C compiler (gcc/cc) on this machine")
    return CC


def compile_hello(dest: Path, message: str = "hello from native") -> Path:
    cc = need_cc()
    src = dest.with_suffix(".c")
    src.write_text(HELLO_C % message)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O1", "-o", str(dest), str(src)], check=True)
    src.unlink()
    return dest


MANIFEST = """\
schema_version = "0.2"
name = "{name}"
version = "{version}"
type = "app"
default_target = "desktop"

[targets.desktop]
runtime = "source"
driver = "native"
entrypoint = "sh"
cmd = ["build.sh"]
"""

INLINE = """
[artifact]
framework = "{framework}"
stage = "unsigned"
target = "{target}"
input = "{input}"

[finalize]
tool = "{tool}"
args = {args}
"""

BUILD_SH = """\
set -e
mkdir -p dist
{cc} -O1 -o dist/{binary} hello.c
"""


def native_project(root: Path, name: str = "hello-native", version: str = "0.1.0", *,
                   message: str = "hello from native", target: str = HOST_TARGET, input_: str = "dist/hello",
                   tool: str = "ato-sign", args: list[str] | None = None, framework: str = "c",
                   build_sh: str | None = None, inline: str | None = None) -> Path:
    """A command-mode native project whose build.sh compiles hello.c with the C compiler."""
    cc = need_cc()
    root.mkdir(parents=True, exist_ok=True)
    (root / "hello.c").write_text(HELLO_C % message)
    (root / "build.sh").write_text(build_sh if build_sh is not None else
                                   BUILD_SH.format(cc=cc, binary=input_.rsplit("/", 1)[-1]))
    if inline is None:
        arg_list = args if args is not None else [input_]
        inline = INLINE.format(framework=framework, target=target, input=input_, tool=tool,
                               args="[" + ", ".join(f'"{a}"' for a in arg_list) + "]")
    (root / "capsule.toml").write_text(MANIFEST.format(name=name, version=version) + inline)
    return root


def build_in_process(project: Path) -> dict[str, Any]:
    from pipeline.graph import run_build
    from stages.build import BuildOptions, plan_build
    return run_build(plan_build(project, BuildOptions()))


def independent_tree_digest(root: Path) -> str:
    """CONTRACTS §2 written again from the text, sharing no code with cas.tree."""
    h = blake3.blake3()

    def visit(path: str, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if rel:
                h.update(f"dir\0{rel}\0{st.st_mode:o}\0".encode())
            for name in sorted(os.listdir(path), key=os.fsencode):
                visit(os.path.join(path, name), f"{rel}/{name}" if rel else name)
        elif stat.S_ISLNK(st.st_mode):
            h.update(f"symlink\0{rel}\0" "0\0".encode())
            h.update(os.fsencode(os.readlink(path)) + b"\0")
        elif stat.S_ISREG(st.st_mode):
            h.update(f"file\0{rel}\0{st.st_mode:o}\0{st.st_size}\0".encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
            h.update(b"\0")
        else:
            raise AssertionError(f"special file {path}")

    visit(str(root), "")
    return "blake3:" + h.hexdigest()


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` (``root`` itself included) with type, mode and content/link target."""
    out: dict[str, Any] = {}
    if not os.path.lexists(root):
        return {".": None}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        out[rel_dir] = ("dir", stat.S_IMODE(os.lstat(dirpath).st_mode))
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(fh.read()).hexdigest())
    return out


def leftovers(root: Path, pattern: str) -> list[str]:
    return sorted(str(p) for p in root.rglob(pattern)) if root.exists() else []
