"""A new user's first minutes: `ato init` in a project of each kind, then `ato build` and `ato run`, with
no hand-editing in between; `ato lock` on its own; the refusals (overwrite, undetectable project)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import assert_schema, cli_path

NODE = shutil.which("node")
NPM = shutil.which("npm")
BWRAP = shutil.which("bwrap")
try:  # the Tier 1 engine ships with ato as the `deno` Python package
    from deno import find_deno_bin

    DENO = find_deno_bin()
except (ImportError, FileNotFoundError):
    DENO = None
CC = shutil.which("cc") and shutil.which("make")
needs_node = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are not installed")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed (make system-deps)")
OFFLINE = {"ATO_OFFLINE": "1"}  # the package managers never leave this machine


def write(root: Path, files: dict[str, str], mode: int = 0o644) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(ato, project: Path, *args: str) -> dict:
    res = ato(["init", str(project), "--json", *args], env=OFFLINE)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "init")
    assert_schema(json.loads((project / "capsule.lock").read_text()), "capsule-lock")
    tomllib.loads((project / "capsule.toml").read_text())
    return doc


def build(ato, project: Path) -> Path:
    res = ato(["build", str(project), "--json"])
    assert res.code == 0, res.stderr
    artifact = Path(res.json()["artifact"])
    assert artifact.is_file()
    return artifact


def register_engine(ato) -> None:
    res = ato(["engine", "register", "--json"])
    assert res.code == 0, res.stderr


def serve_once(args: list[str], url: str, expect: str) -> None:
    """Start `ato run` for a web target, wait until ``url`` answers with ``expect``, stop it with Ctrl-C."""
    proc = subprocess.Popen([cli_path("ato"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback only
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.05)
        assert body is not None, proc.stderr.read().decode() if proc.poll() is not None else "no answer"
        assert expect in body
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


# ------------------------------------------------------------------ one sample project per template


@needs_node
def test_node_cli_init_build_run(tmp_path, ato):
    """The issue's own example: a plain Node CLI used to fail on the missing capsule.lock."""
    project = write(tmp_path / "hello-cli", {
        "package.json": json.dumps({"name": "@acme/hello-cli", "version": "1.2.0", "description": "says hi",
                                    "main": "index.js"}),
        "index.js": "console.log('hello', process.argv.slice(2).join(' '));\n",
    })
    doc = init(ato, project)
    assert (doc["template"], doc["name"], doc["version"]) == ("node", "hello-cli", "1.2.0")
    assert doc["target"] == {"label": "app", "runtime": "source", "driver": "node", "entrypoint": "index.js",
                             "port": None}
    assert doc["lock"]["generated"] == ["package-lock.json"] and (project / "package-lock.json").is_file()
    assert doc["created"] == []  # the project already had its entry file
    artifact = build(ato, project)
    assert artifact.name.startswith("hello-cli")
    res = ato(["run", str(project), "-y", "--", "new", "user"])
    assert res.code == 0, res.stderr
    assert res.stdout == "hello new user\n"
    res = ato(["run", str(artifact), "-y", "--", "from", "artifact"])  # the built .capsule runs too
    assert res.code == 0, res.stderr
    assert res.stdout == "hello from artifact\n"


def test_static_site_init_build_run(tmp_path, ato):
    port = free_port()
    project = write(tmp_path / "site", {"public/index.html": "<h1>static via init</h1>\n", "notes.txt": "x\n"})
    doc = init(ato, project, "--port", str(port))
    assert doc["template"] == "static" and doc["evidence"] == ["public/index.html"]
    assert doc["target"]["entrypoint"] == "public" and doc["target"]["port"] == port
    build(ato, project)
    serve_once(["run", str(project), "-y"], f"http://127.0.0.1:{port}/", "static via init")


def test_static_site_at_the_project_root(tmp_path, ato):
    """index.html beside capsule.toml: the entrypoint is the project dir itself."""
    port = free_port()
    project = write(tmp_path / "root-site", {"index.html": "<p>root page</p>\n"})
    doc = init(ato, project, "--port", str(port))
    assert doc["target"]["entrypoint"] == "."
    build(ato, project)
    serve_once(["run", str(project), "-y"], f"http://127.0.0.1:{port}/", "root page")


@needs_bwrap
def test_python_init_build_run(tmp_path, ato):
    register_engine(ato)
    project = write(tmp_path / "py-app", {
        "pyproject.toml": '[project]\nname = "Py_App"\nversion = "0.3.0"\nrequires-python = ">=3.9"\n'
                          "dependencies = []\n",
        "main.py": "import sys\nprint('python says', *sys.argv[1:])\n",
    })
    doc = init(ato, project)
    assert (doc["template"], doc["name"], doc["version"]) == ("python", "py-app", "0.3.0")
    assert doc["lock"]["generated"] == ["uv.lock"]
    assert "ato engine register   # once: the sandbox for Tier 2 (python, native)" in doc["next_steps"]
    build(ato, project)
    res = ato(["run", str(project), "-y", "--", "hi"], env=OFFLINE)
    assert res.code == 0, res.stderr
    assert res.stdout == "python says hi\n"


@needs_bwrap
@pytest.mark.skipif(not CC, reason="cc and make are not installed")
def test_native_c_project_init_build_run(tmp_path, ato):
    """A C project with a Makefile: `ato build` runs make first, so the payload holds the program."""
    register_engine(ato)
    project = write(tmp_path / "cproj", {
        "Makefile": "all: greet\n\ngreet: greet.c\n\t$(CC) -O2 -o greet greet.c\n\nclean:\n\trm -f greet\n",
        "greet.c": '#include <stdio.h>\nint main(int c, char **v) { printf("native %s\\n", c > 1 ? v[1] : "-");'
                   " return 0; }\n",
    })
    doc = init(ato, project)
    assert doc["template"] == "native" and doc["build_hook"] == "make"
    assert doc["target"]["entrypoint"] == "greet"
    assert not (project / "greet").exists()
    artifact = build(ato, project)
    assert (project / "greet").is_file()
    res = ato(["run", str(project), "-y", "--", "ok"])
    assert res.code == 0, res.stderr
    assert res.stdout == "native ok\n"
    from stages.capsule import read_capsule

    opened = read_capsule(artifact)
    assert "build" in opened.manifest and opened.manifest["type"] == "app"


@needs_node
def test_tool_template_in_an_empty_directory_writes_a_runnable_starter(tmp_path, ato):
    project = tmp_path / "fresh"
    doc = init(ato, project, "--template", "tool", "--name", "Greet Tool")
    assert doc["name"] == "greet-tool" and doc["type"] == "tool" and doc["target"]["label"] == "cli"
    assert sorted(doc["created"]) == ["main.js", "package.json"]
    pkg = json.loads((project / "package.json").read_text())
    assert pkg["bin"] == {"greet-tool": "main.js"}
    build(ato, project)
    res = ato(["run", str(project), "-y", "--", "Ada"])
    assert res.code == 0, res.stderr
    assert res.stdout == "hello from greet-tool Ada\n"


@pytest.mark.skipif(DENO is None, reason="deno is not installed")
def test_deno_init_build_run(tmp_path, ato):
    project = write(tmp_path / "deno-app", {"deno.json": json.dumps({"name": "deno-app", "version": "0.1.0",
                                                                     "exports": "./main.ts"}),
                                            "main.ts": "console.log('deno says', ...Deno.args);\n"})
    doc = init(ato, project)
    assert doc["template"] == "deno" and doc["lock"]["generated"] == ["deno.lock"]
    assert json.loads((project / "deno.lock").read_text()) == {"version": "5"}  # nothing remote to lock
    build(ato, project)
    res = ato(["run", str(project), "-y", "--", "hi"], env=OFFLINE)
    assert res.code == 0, res.stderr
    assert res.stdout == "deno says hi\n"


def test_deno_init_and_build_without_running(tmp_path, ato):
    """Where deno itself is missing, init still writes a valid manifest and the project builds."""
    project = write(tmp_path / "deno-lib", {"deno.json": "{\n  // comments are allowed\n  \"name\": \"x-lib\",\n}\n",
                                            "mod.ts": "export const x = 1;\n", "deno.lock": '{"version": "4"}\n'})
    doc = init(ato, project)
    assert (doc["template"], doc["name"], doc["target"]["entrypoint"]) == ("deno", "x-lib", "mod.ts")
    assert doc["lock"]["generated"] == [] and "deno.lock" in doc["lock"]["lockfiles"]
    build(ato, project)


# ------------------------------------------------------------------ refusals and lock


def test_init_refuses_to_overwrite_without_force(tmp_path, ato):
    project = write(tmp_path / "site", {"index.html": "<p>x</p>\n", "capsule.toml": "# mine\n"})
    res = ato(["init", str(project), "--json"])
    assert res.code == 1
    assert json.loads(res.stderr.splitlines()[-1])["error"]["code"] == "CAPSULE_TOML_EXISTS"
    assert (project / "capsule.toml").read_text() == "# mine\n" and not (project / "capsule.lock").exists()
    doc = init(ato, project, "--force")
    assert doc["overwritten"] is True
    assert tomllib.loads((project / "capsule.toml").read_text())["default_target"] == "site"


def test_init_of_an_unknown_project_names_the_templates(tmp_path, ato):
    project = write(tmp_path / "nothing", {"notes.txt": "hello\n"})
    res = ato(["init", str(project)])
    assert res.code == 1 and "--template static|node|deno|python|native|tool" in res.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    missing = tmp_path / "not-there"
    res = ato(["init", str(missing)])
    assert res.code == 1 and "does not exist" in res.stderr and "--template" in res.stderr
    assert not missing.exists()


def test_init_that_cannot_lock_leaves_the_directory_as_it_was(tmp_path, ato):
    """npm is not found: init fails with the documented code and takes back what it wrote."""
    project = tmp_path / "no-npm"
    project.mkdir()
    res = ato(["init", str(project), "--template", "node"], env={"PATH": "/nonexistent"})
    assert res.code == 1, res.stderr
    assert "error[ATO_ERR_RUNTIME_NOT_RESOLVED]" in res.stderr and "npm" in res.stderr
    assert list(project.iterdir()) == []


def test_build_hook_failure_is_e102_and_writes_no_artifact(tmp_path, ato):
    project = write(tmp_path / "broken", {"Makefile": "prog:\n\t@echo compiler exploded; exit 3\n"})
    init(ato, project, "--template", "native")
    res = ato(["build", str(project)])
    assert res.code == 1
    assert "error[E102]" in res.stderr and "compiler exploded" in res.stderr
    assert not list(project.glob("*.capsule"))


@needs_node
def test_lock_is_deterministic_refreshes_only_on_change_and_check_fails_when_stale(tmp_path, ato):
    files = {"package.json": json.dumps({"name": "same", "version": "1.0.0"}), "index.js": "1;\n"}
    a = write(tmp_path / "a", files)
    b = write(tmp_path / "b", files)
    for project in (a, b):
        init(ato, project)
    assert (a / "capsule.lock").read_bytes() == (b / "capsule.lock").read_bytes()
    before = (a / "capsule.lock").stat().st_mtime_ns
    res = ato(["lock", str(a), "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "lock")
    assert (doc["created"], doc["changed"]) == (False, False)
    assert (a / "capsule.lock").stat().st_mtime_ns == before
    assert ato(["lock", str(a), "--check"]).code == 0

    # a dependency lockfile changes: the capsule.lock no longer matches it
    lockfile = a / "package-lock.json"
    lockfile.write_text(lockfile.read_text().replace('"version": "1.0.0"', '"version": "1.0.1"', 1))
    res = ato(["lock", str(a), "--check", "--json"])
    assert res.code == 1 and json.loads(res.stderr.splitlines()[-1])["error"]["code"] == "E207"
    assert "package-lock.json changed" in res.stderr
    # capsule.toml changes: stale too; `ato lock` repairs it
    manifest = a / "capsule.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', 'version = "1.1.0"'))
    assert "capsule.toml changed" in ato(["lock", str(a), "--check"]).stderr
    res = ato(["lock", str(a), "--json"])
    assert res.code == 0 and res.json()["changed"] is True
    assert ato(["lock", str(a), "--check"]).code == 0
    # a missing lock is E104's code, and --check writes nothing
    (a / "capsule.lock").unlink()
    res = ato(["lock", str(a), "--check"])
    assert res.code == 1 and "ATO_ERR_PROVISIONING_LOCK_INCOMPLETE" in res.stderr
    assert not (a / "capsule.lock").exists()


def readme_minimal_forms() -> list[tuple[str, str]]:
    """The ```toml blocks of the README's "Writing capsule.toml" section: (schema_version, text)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Writing capsule.toml", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```toml\n")[1:]]
    return [(tomllib.loads(b)["schema_version"], b) for b in blocks]


def test_the_readme_shows_a_minimal_form_of_every_generation():
    assert sorted(v for v, _ in readme_minimal_forms()) == ["0.2", "0.3", "1", "1.1"]


@needs_node
@pytest.mark.parametrize(("version", "text"), readme_minimal_forms(), ids=lambda x: x if len(x) < 8 else "")
def test_each_minimal_form_in_the_readme_locks_builds_and_runs_as_written(tmp_path, ato, version, text):
    """Copied from the README as is: `ato lock` writes the lockfiles, then it builds and runs."""
    project = write(tmp_path / f"gen-{version}", {
        "capsule.toml": text, "main.js": "console.log('minimal form', process.argv.slice(2).join(' '));\n",
        "package.json": json.dumps({"name": "hello", "version": "0.1.0"}),
    })
    res = ato(["lock", str(project), "--json"], env=OFFLINE)
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "lock")
    build(ato, project)
    res = ato(["run", str(project), "-y", "--", version])
    assert res.code == 0, res.stderr
    assert res.stdout == f"minimal form {version}\n"
