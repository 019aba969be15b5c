"""Native delivery, build side: command-mode builds and the app shape checks (stages.native_build)."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard

from pipeline.errors import AtoError
from pipeline.manifest.delivery import host_arch
from stages.capsule import read_capsule
from stages.native_build import check_app, elf_machine, pe_kind
from tests.conftest import assert_schema
from tests.native_support import HOST_TARGET, build_in_process, compile_hello, native_project, need_cc

OTHER_ARCH = "arm64" if host_arch() == "x86_64" else "x86_64"


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_hello(tmp_path_factory.mktemp("cc") / "hello")


def refused(fn, *args, **kwargs) -> AtoError:
    with pytest.raises(AtoError) as info:
        fn(*args, **kwargs)
    return info.value


def fake_elf(path: Path, machine: int, e_type: int = 2) -> Path:
    head = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9 + struct.pack("<HH", e_type, machine) + b"\0" * 44
    path.write_bytes(head)
    path.chmod(0o755)
    return path


def payload_members(artifact: Path) -> dict[str, tarfile.TarInfo]:
    opened = read_capsule(artifact)
    with open(artifact, "rb") as fh:
        fh.seek(opened.payload_offset)
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(fh.read(opened.payload_size)),
                                                         read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return {i.name: i for i in tf.getmembers()}


# ---------------------------------------------------------------- executable formats


def test_elf_machine_reads_a_real_binary_and_rejects_others(hello: Path, tmp_path: Path) -> None:
    assert elf_machine(hello) == host_arch()
    (tmp_path / "script").write_text("#!/bin/sh\necho hi\n")
    assert elf_machine(tmp_path / "script") is None
    (tmp_path / "short").write_bytes(b"\x7fELF\x02\x01")
    assert elf_machine(tmp_path / "short") is None
    assert elf_machine(fake_elf(tmp_path / "rel.o", 62, e_type=1)) is None  # a relocatable object is no program
    assert elf_machine(fake_elf(tmp_path / "arm", 183)) == "arm64"


def test_pe_kind(tmp_path: Path) -> None:
    def pe(characteristics: int) -> bytes:
        head = bytearray(b"MZ" + b"\0" * 126)
        head[60:64] = struct.pack("<I", 64)
        head[64:68] = b"PE\0\0"
        head += b"\0" * 64
        head[64 + 22:64 + 24] = struct.pack("<H", characteristics)
        return bytes(head)
    (tmp_path / "a.exe").write_bytes(pe(0x0102))
    (tmp_path / "b.exe").write_bytes(pe(0x2102))
    (tmp_path / "c.exe").write_bytes(b"MZ not really")
    assert [pe_kind(tmp_path / n) for n in ("a.exe", "b.exe", "c.exe")] == ["exe", "dll", None]
    assert "is a DLL" in refused(check_app, tmp_path / "b.exe", "windows/x86_64", what="build input").message
    assert "not a PE image" in refused(check_app, tmp_path / "c.exe", "windows/x86_64", what="build input").message
    check_app(tmp_path / "a.exe", "windows/x86_64", what="build input")


def test_linux_app_checks(hello: Path, tmp_path: Path) -> None:
    check_app(hello, HOST_TARGET, what="build input")
    app = tmp_path / "app"
    (app / "bin").mkdir(parents=True)
    (app / "README").write_text("docs")
    assert "missing a regular ELF executable" in refused(check_app, app, HOST_TARGET, what="build input").message
    copy = app / "bin" / "hello"
    copy.write_bytes(hello.read_bytes())
    copy.chmod(0o644)
    assert "missing a regular ELF executable" in refused(check_app, app, HOST_TARGET, what="build input").message
    err = refused(check_app, copy, HOST_TARGET, what="build input")
    assert err.message == f"executable bit is missing for {copy} (mode 644)" and err.code == "E101"
    copy.chmod(0o755)
    check_app(app, HOST_TARGET, what="build input")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert "is not an ELF executable" in refused(check_app, script, HOST_TARGET, what="build input").message
    other = fake_elf(tmp_path / "other", 183 if host_arch() == "x86_64" else 62)
    err = refused(check_app, other, HOST_TARGET, what="build input")
    assert f"is an ELF for {OTHER_ARCH}, but the target is {HOST_TARGET}" in err.message
    link = tmp_path / "link"
    link.symlink_to(hello)
    assert "is a symlink" in refused(check_app, link, HOST_TARGET, what="build input").message
    assert "does not exist" in refused(check_app, tmp_path / "nope", HOST_TARGET, what="build input").message


def test_darwin_app_checks(tmp_path: Path) -> None:
    app = tmp_path / "My App.app"
    macos = app / "Contents" / "MacOS"
    macos.mkdir(parents=True)
    assert "missing a regular executable" in refused(check_app, app, "darwin/arm64", what="derived app").message
    (macos / "My App").write_bytes(b"\xcf\xfa\xed\xfe")
    (macos / "My App").chmod(0o644)
    assert "executable bit is missing" in refused(check_app, app, "darwin/arm64", what="derived app").message
    (macos / "My App").chmod(0o755)
    check_app(app, "darwin/arm64", what="derived app")
    (tmp_path / "plain").mkdir()
    assert "is not a .app directory" in refused(check_app, tmp_path / "plain", "darwin/arm64",
                                                 what="derived app").message


# ---------------------------------------------------------------- command-mode builds


def test_command_mode_build_runs_the_command_and_packs_the_app(tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj")
    doc = build_in_process(project)
    assert_schema(doc, "build")
    assert (doc["build_strategy"], doc["schema_version"], doc["target"]) == ("native-delivery", "0.1", HOST_TARGET)
    assert doc["derived_from"] == str((project / "dist" / "hello").absolute())
    members = payload_members(Path(doc["artifact"]))
    assert members["dist/hello"].mode == 0o755
    assert "ato.delivery.toml" in members
    again = build_in_process(project)  # the command runs again; same bytes -> every step up to date
    assert again["artifact_blake3"] == doc["artifact_blake3"]


def test_build_command_gets_a_clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATO_TEST_SECRET", "do-not-leak")
    sh = "set -e\nenv > env.txt\nmkdir -p dist\n{cc} -o dist/hello hello.c\n"
    project = native_project(tmp_path / "proj", build_sh=sh.format(cc=need_cc()))
    build_in_process(project)
    env = (project / "env.txt").read_text()
    assert "ATO_TEST_SECRET" not in env and "PATH=" in env


def test_failed_build_command_is_reported_with_its_last_line_and_writes_nothing(tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj", build_sh="echo compiling\necho 'hello.c:1: syntax error' >&2\nexit 3\n")
    err = refused(build_in_process, project)
    assert err.code == "E102" and err.exit_code == 1
    assert err.message == "native delivery build command failed with status 3: sh build.sh: hello.c:1: syntax error"
    assert "compiling" in err.details["output_tail"]
    assert not list(project.glob("*.capsule"))


def test_missing_input_names_nearby_executables(tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj", input_="dist/helo",
                             build_sh=f"set -e\nmkdir -p dist\n{need_cc()} -o dist/hello hello.c\n")
    err = refused(build_in_process, project)
    assert err.code == "E101"
    assert err.message.startswith("native delivery input 'dist/helo' does not exist") and "dist/hello" in err.message
    assert not list(project.glob("*.capsule"))


def test_input_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj", build_sh="mkdir -p dist\necho text > dist/hello\nchmod 644 dist/hello\n")
    err = refused(build_in_process, project)
    assert "is not an ELF executable" in err.message
    assert not list(project.glob("*.capsule"))


def test_input_excluded_by_pack_is_refused(tmp_path: Path) -> None:
    project = native_project(tmp_path / "proj")
    text = (project / "capsule.toml").read_text()
    (project / "capsule.toml").write_text(text.replace("\n[artifact]", '\n[pack]\ninclude = ["hello.c"]\n\n[artifact]', 1))
    err = refused(build_in_process, project)
    assert err.message == "native delivery input 'dist/hello' is not in the payload (excluded by [pack] or the default excludes)"


def test_input_symlink_leaving_the_project_is_refused(tmp_path: Path, hello: Path) -> None:
    project = native_project(tmp_path / "proj", build_sh=f"mkdir -p dist\nln -sf {hello} dist/hello\n")
    err = refused(build_in_process, project)
    assert "resolves outside the project" in err.message


def test_directory_input_holding_an_elf(tmp_path: Path) -> None:
    sh = f"set -e\nmkdir -p dist/app/bin\n{need_cc()} -o dist/app/bin/hello hello.c\necho data > dist/app/share.txt\n"
    project = native_project(tmp_path / "proj", input_="dist/app", build_sh=sh)
    doc = build_in_process(project)
    members = payload_members(Path(doc["artifact"]))
    assert members["dist/app/bin/hello"].mode == 0o755 and "dist/app/share.txt" in members
