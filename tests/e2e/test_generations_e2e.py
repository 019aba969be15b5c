"""0.3 and v1 manifests end to end through the installed `ato`: inspect, validate, build, run the artifact.

Every fixture of tests/generation_fixtures.py is inspected (`ato inspect requirements --json`), validated
(`ato validate --json`), built (`ato build --yes --json`, running its build steps) and, where its runtime is on
this machine, run from the built artifact (so the stored normalized model is what runs). Then the refusals:
each bad manifest is one line and exit 1; `ato manifest upgrade` round trips; build steps need consent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import paths
from pipeline.manifest.platforms import host_platform
from tests.conftest import assert_schema
from tests.generation_fixtures import ALL, V03, Fixture

NODE = shutil.which("node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_major() -> str:
    if NODE is None:
        return "20"
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return out.lstrip("v").split(".")[0]


def have(tool: str) -> bool:
    if tool == "deno":  # ato runs the deno of the `deno` package it was installed with
        try:
            from deno import find_deno_bin

            return bool(find_deno_bin())
        except (ImportError, FileNotFoundError):
            return False
    return shutil.which(tool) is not None


def missing(needs: tuple[str, ...]) -> list[str]:
    return [n for n in needs if not have(n)]


def http_get(url: str, deadline: float = 60.0) -> str:
    """The body at ``url``, waiting for the server to listen: a target without a readiness probe is
    "ready" as soon as it is spawned (README), which may be before it listens."""
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
                return resp.read().decode()
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > end:
                raise
            time.sleep(0.1)


def artifact_manifest(path: Path) -> dict:
    with tarfile.open(path) as tf:
        return tomllib.loads(tf.extractfile("capsule.toml").read().decode())


def one_line_failure(res, code: str) -> str:
    assert res.code == 1 and res.stdout == "", (res.code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error[")]
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("fx", ALL, ids=lambda f: f.name)
def test_fixture_is_inspected_validated_built_and_run(fx: Fixture, tmp_path: Path, ato) -> None:
    project = fx.materialize(tmp_path / fx.name, ports=(free_port(), free_port()), node_major=node_major())

    res = ato(["inspect", "requirements", str(project), "--json"])
    assert res.code == 0, res.stderr
    assert_schema(res.json(), "inspect-requirements")

    res = ato(["validate", str(project), "--json"])
    assert res.code == 0, res.stderr
    validated = res.json()
    assert_schema(validated, "validate")
    assert validated["generation"] == fx.generation

    res = ato(["build", str(project), "--yes", "--json"])
    assert res.code == 0, res.stderr
    built = res.json()
    assert_schema(built, "build")
    stored = artifact_manifest(Path(built["artifact"]))
    dist = stored.pop("distribution")
    assert dist["source_schema_version"] == validated["schema_version"]
    assert stored == validated["normalized"]  # the build stores exactly the normalized model validate printed
    if fx.name == "v1-source-root":  # [source] root: only app/ is packed, its ignore patterns applied
        from tests.e2e.test_build_e2e import payload_names

        assert sorted(payload_names(Path(built["artifact"]))) == ["app/package-lock.json", "app/server.js"]

    lacking = missing(fx.needs)
    if lacking:
        pytest.skip(f"inspected, validated and built; the run needs {', '.join(lacking)}, not on this machine")
    if "bwrap" in fx.needs:
        res = ato(["engine", "register", "--json"])
        assert res.code == 0, res.stderr
    subject = built["artifact"]
    run, env = fx.run, dict(fx.env)
    if run["kind"] == "http":
        res = ato(["run", subject, "--yes", "--background", "--json"], env=env)
        assert res.code == 0, res.stderr
        proc = res.json()["process"]
        try:
            assert proc["status"] == "ready"
            port = validated["normalized"]["targets"][validated["default_target"]]["port"]
            assert run["expect"] in http_get(f"http://127.0.0.1:{port}{run['path']}")
        finally:
            assert ato(["close", "--id", proc["id"], "--json"]).code == 0
    elif run["kind"] == "stdout":
        args = ["--target", run["target"]] if "target" in run else []
        res = ato(["run", subject, "--yes", *args, *run.get("args", [])], env=env)
        assert res.code == 0, res.stderr
        assert run["expect"].format(host=host_platform()) in res.stdout
        if "state_file" in run:
            assert (paths.capsule_state_dir() / validated["name"] / run["state_file"]).is_file()
    else:
        res = ato(["run", subject, "--yes"], env=env)
        assert run["expect"] in one_line_failure(res, run["code"])


def test_tool_with_a_tampered_program_is_refused(tmp_path: Path, ato) -> None:
    fx = next(f for f in V03 if f.name == "tool-platforms")
    project = fx.materialize(tmp_path / "tool")
    program = project / "bin" / host_platform() / "hello"
    if not program.is_file() or shutil.which("bwrap") is None:
        pytest.skip(f"no program for {host_platform()} in the fixture, or no bubblewrap")
    program.write_text(program.read_text() + "echo tampered\n")
    assert ato(["engine", "register", "--json"]).code == 0
    res = ato(["run", str(project), "--yes"])
    assert "does not match sha256:" in one_line_failure(res, "ATO_ERR_INTEGRITY_FAILURE")


CONSUMER = next(f for f in V03 if f.name == "deps-consumer")
PROVIDER = next(f for f in V03 if f.name == "deps-provider")
FLAT = 'schema_version = "0.3"\nname = "flat-app"\nversion = "1.0.0"\ntype = "app"\nruntime = "source/node"\n' \
       'run = "node a.js"\n'

REFUSALS = [
    ("unsupported-schema", FLAT.replace('"0.3"', '"0.9"'), [], "E002", 'capsule.toml: schema_version: expected "0.2"'),
    ("unknown-table", FLAT + "[buid]\nx = 1\n", ["--strict-v3"], "E002",
     'capsule.toml: buid: unknown table (did you mean "build"?)'),
    ("typo", FLAT + "prot = 8080\n", ["--strict-v3"], "E002", 'capsule.toml: prot: unknown key (did you mean "port"?)'),
    ("bad-template", CONSUMER.files["capsule.toml"].replace("{{deps.db.runtime_exports.DATABASE_URL}}",
                                                            "{{deps.db.runtime_exports}}"), [], "E002",
     "capsule.toml: targets.app.env.DATABASE_URL: invalid template: unsupported template expression"),
    ("cycle", FLAT + 'needs = ["app"]\n', [], "E002", "capsule.toml: needs: dependency cycle: app -> app"),
    ("wrong-type", FLAT + 'port = "80"\n', [], "E002", 'capsule.toml: port: expected an integer, got string "80"'),
    ("other-generation", 'schema_version = "0.2"\nname = "a"\nversion = "1.0.0"\ntype = "app"\ndefault_target = "app"\n'
                         'build = "pnpm build"\n[targets.app]\nruntime = "source"\ndriver = "node"\nentrypoint = "a.js"\n',
     [], "E002", 'capsule.toml: schema_version "0.2": build is written in the "0.3" form (build: expected a table'),
]


@pytest.mark.parametrize(("text", "flags", "code", "start"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_bad_manifests_fail_with_one_line_and_exit_1(text: str, flags: list[str], code: str, start: str,
                                                     tmp_path: Path, ato) -> None:
    (tmp_path / "capsule.toml").write_text(text)
    for command in (["validate", str(tmp_path), *flags], ["build", str(tmp_path), "--yes", *flags]):
        line = one_line_failure(ato(command), code)
        assert line.startswith(f"error[{code}]: {start}"), line
    res = ato(["validate", str(tmp_path), "--json", *flags])
    assert res.code == 1 and res.stdout == ""
    err = json.loads(res.stderr.strip().splitlines()[-1])["error"]
    assert err["code"] == code and err["message"].startswith(start) and err["details"]["file"] == "capsule.toml"


def test_unknown_keys_warn_by_default_and_fail_under_the_environment_switch(tmp_path: Path, ato) -> None:
    (tmp_path / "capsule.toml").write_text(FLAT + "[buid]\nx = 1\n[storage]\nx = 1\n")
    (tmp_path / "a.js").write_text("")
    res = ato(["validate", str(tmp_path)])
    assert res.code == 0
    assert 'warning: capsule.toml: buid: unknown table, ignored (did you mean "build"?)' in res.stderr
    assert "warning: capsule.toml: storage: unsupported: [storage] volumes are not mounted" in res.stderr
    doc = ato(["validate", str(tmp_path), "--json"]).json()
    assert doc["warnings"][0] == {"message": "capsule.toml: buid: unknown table, ignored", "key": "buid",
                                  "hint": '"build"'}
    res = ato(["build", str(tmp_path)], env={"ATO_STRICT_MANIFEST": "1"})
    one_line_failure(res, "E002")


def test_validate_with_the_provider_checks_the_exports_read(tmp_path: Path, ato) -> None:
    consumer = CONSUMER.materialize(tmp_path / "consumer")
    provider = PROVIDER.materialize(tmp_path / "provider")
    res = ato(["validate", str(consumer), "--provider", f"db={provider}", "--json"])
    assert res.code == 0, res.stderr
    text = (consumer / "capsule.toml").read_text().replace("runtime_exports.DATABASE_URL", "runtime_exports.DSN")
    (consumer / "capsule.toml").write_text(text)
    line = one_line_failure(ato(["validate", str(consumer), "--provider", f"db={provider}"]), "E002")
    assert 'the provider\'s service@1 does not export "DSN" as runtime_exports' in line


def test_build_steps_need_consent_which_is_remembered(tmp_path: Path, ato) -> None:
    fx = next(f for f in V03 if f.name == "static-site")
    project = fx.materialize(tmp_path / "site", ports=(free_port(), free_port()))
    res = ato(["build", str(project)])
    line = one_line_failure(res, "ATO_ERR_CONSENT_REQUIRED")
    assert "mkdir -p public && cp src/index.html public/index.html" in line and "--yes" in line
    assert not (project / "public").exists()  # nothing ran
    assert ato(["build", str(project), "--yes"]).code == 0
    (project / "public" / "index.html").unlink()
    res = ato(["build", str(project), "--json"])  # the same commands were approved: no prompt, no flag
    assert res.code == 0, res.stderr
    assert (project / "public" / "index.html").is_file()
    (project / "capsule.toml").write_text((project / "capsule.toml").read_text().replace("cp src", "cp -v src"))
    one_line_failure(ato(["build", str(project)]), "ATO_ERR_CONSENT_REQUIRED")  # other commands: asked again


def test_a_failing_build_step_is_one_line(tmp_path: Path, ato) -> None:
    (tmp_path / "capsule.toml").write_text(FLAT + 'build = "echo compiling; exit 3"\n')
    line = one_line_failure(ato(["build", str(tmp_path), "--yes"]), "E102")
    assert line == "error[E102]: build step (build) failed with status 3: echo compiling; exit 3: compiling"


def test_manifest_upgrade_prints_a_diff_writes_on_request_and_round_trips(tmp_path: Path, ato) -> None:
    v02 = ('schema_version = "0.2"\nname = "up-app"\nversion = "1.0.0"\ndefault_target = "web"\n\n'
           '[targets.web]\nruntime = "source"\ndriver = "node"\nentrypoint = "server.js"\ncmd = ["--port", "80"]\n')
    (tmp_path / "capsule.toml").write_text(v02)
    before = ato(["validate", str(tmp_path), "--json"]).json()
    res = ato(["manifest", "upgrade", str(tmp_path)])
    assert res.code == 0 and res.stdout.startswith("--- capsule.toml (0.2)\n+++ capsule.toml (0.3)\n")
    assert (tmp_path / "capsule.toml").read_text() == v02  # a diff only
    res = ato(["manifest", "upgrade", str(tmp_path), "--write", "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "manifest-upgrade")
    assert doc["written"] and doc["from"] == "0.2" and doc["to"] == "0.3"
    after = ato(["validate", str(tmp_path), "--json"]).json()
    assert after["generation"] == "0.3" and after["normalized"] == before["normalized"]
    assert ato(["manifest", "upgrade", str(tmp_path), "--to", "1.1", "--write"]).code == 0
    eleven = ato(["validate", str(tmp_path), "--json"]).json()
    assert eleven["generation"] == "1.1" and eleven["normalized"]["execution"]["cmd"] == ["--port", "80"]
    assert ato(["manifest", "upgrade", str(tmp_path), "--to", "0.2", "--write"]).code == 0
    back = ato(["validate", str(tmp_path), "--json"]).json()
    assert back["normalized"] == {**before["normalized"], "default_target": "app",
                                  "targets": {"app": before["normalized"]["targets"]["web"]}}


def test_artifacts_of_every_generation_install_from_a_registry_alike(tmp_path: Path, ato) -> None:
    """A v1 capsule is published, installed and run like a 0.2 one: the registry holds the normalized model."""
    from tests.e2e.registry_support import TOKEN, Registry, install_flags

    fx = next(f for f in ALL if f.name == "v1-metadata")
    project = fx.materialize(tmp_path / "p", node_major=node_major())
    registry = Registry(tmp_path / "registry-data", token=TOKEN)
    try:
        built = ato(["build", str(project), "--yes", "--json"]).json()
        res = ato(["publish", "--registry", registry.url, "--artifact", built["artifact"], "--scoped-id",
                   "team/v1-metadata", "--json"], env={"ATO_TOKEN": TOKEN})
        assert res.code == 0, res.stderr
        res = ato(["install", "team/v1-metadata", "--registry", registry.url, "--json", *install_flags()])
        assert res.code == 0, res.stderr
        res = ato(["inspect", "requirements", "team/v1-metadata", "--registry", registry.url, "--json"])
        assert res.code == 0, res.stderr
        assert_schema(res.json(), "inspect-requirements")
        if NODE is not None:
            res = ato(["run", "team/v1-metadata", "--yes", "--allow-unsigned"])
            assert res.code == 0, res.stderr
            assert "metadata cli ran" in res.stdout
    finally:
        registry.stop()


# Upstream's IPC negative fixtures (ipc_conflict, ipc_reserved, ipc_circular) exist to be refused; these are our own
# manifests in their shape. `ato validate` and `ato build` refuse each with upstream's code (as `ato run` does).
IPC_SERVICE = """\
schema_version = "1.1"
name = "{name}"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
driver = "native"
entrypoint = "sh main.sh"
"""
IPC_REFUSALS = [
    ("conflict", {"a": IPC_SERVICE + '[services.main]\ncmd = "sh main.sh"\n[lifecycle]\nrun = "main"\n'
                       '[ipc.exports]\nname = "svc"\n[[ipc.exports.methods]]\nname = "ping"\n'
                       '[ipc.exports.sharing]\nmode = "per-consumer"\nidle_timeout = 60\nmax_clients = 2\n'},
     "IPC-001"),
    ("reserved", {"a": IPC_SERVICE + '[ipc.exports]\nname = "svc"\n[[ipc.exports.methods]]\nname = "_ipc_internal"\n'},
     "IPC-002"),
    ("circular", {"a": IPC_SERVICE + '[ipc.imports.b]\nfrom = "../b"\n',
                  "b": IPC_SERVICE + '[ipc.imports.a]\nfrom = "../a"\n'}, "IPC-003"),
    ("missing-provider", {"a": IPC_SERVICE + '[ipc.imports.b]\nfrom = "./missing-service"\n'}, "IPC-006"),
]


@pytest.mark.parametrize(("projects", "code"), [r[1:] for r in IPC_REFUSALS], ids=[r[0] for r in IPC_REFUSALS])
def test_ipc_negative_fixtures_are_refused_with_upstreams_codes(projects: dict[str, str], code: str,
                                                                 tmp_path: Path, ato) -> None:
    for name, text in projects.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "capsule.toml").write_text(text.format(name=f"ipc-{name}"))
        (tmp_path / name / "main.sh").write_text("echo should-not-run\n")
    project = str(tmp_path / "a")
    for command in (["validate", project], ["build", project, "--yes"]):
        res = ato(command)
        line = one_line_failure(res, code)
        assert "capsule.toml: [" + code + "]" in line and "should-not-run" not in res.stderr
    assert not (tmp_path / "a" / "ipc-a.capsule").exists()  # nothing half-built
    res = ato(["validate", project, "--json"])
    err = json.loads(res.stderr.strip().splitlines()[-1])["error"]
    assert err["code"] == code and err["details"]["findings"][0]["code"] == code


def test_a_valid_ipc_declaration_is_read_without_warnings(tmp_path: Path, ato) -> None:
    (tmp_path / "capsule.toml").write_text(IPC_SERVICE.format(name="ipc-ok") + '[ipc.exports]\nname = "svc"\n'
                                           '[[ipc.exports.methods]]\nname = "ping"\ndescription = "a remote ping"\n')
    (tmp_path / "main.sh").write_text("echo ok\n")
    res = ato(["validate", str(tmp_path), "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["warnings"] == [{"message": "capsule.toml: ipc.exports.methods[0].description: [IPC-005] method "
                                           "'ping' is described as remote; ato brokers local (Unix socket) calls only",
                                "key": "ipc.exports.methods[0].description"}]
    assert doc["normalized"]["ipc"]["exports"]["name"] == "svc"
