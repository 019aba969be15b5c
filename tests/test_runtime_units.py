"""Unit tests of the runtime library: router, policy, engines, unpacking, the engine contract, lifecycle."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from pipeline import paths
from pipeline.errors import AtoError
from pipeline.manifest import parse_manifest
from pipeline.runtime import engines, lifecycle, nacelle, policy, probes, table, unpack
from pipeline.runtime.resolve import looks_local, parse_runtime_config
from pipeline.runtime.router import route
from stages.capsule import read_capsule, unpack_payload
from tests.e2e.registry_support import forge_capsule


def manifest(text: str, tmp_path: Path):
    return parse_manifest(text, tmp_path / "capsule.toml")


V11 = """\
schema_version = "1.1"
name = "example-app"
version = "0.1.0"
type = "app"

[execution]
{execution}
{extra}
"""


@pytest.mark.parametrize("execution,extra,expected", [
    ('entrypoint = "./main.py"', '[targets.oci]\nimage = "python:3.11-slim"\n[targets.wasm]\ndigest = "sha256:00"',
     ("oci", "")),
    ('entrypoint = "./main.py"', '[targets.wasm]\nentrypoint = "m.wasm"', ("wasm", "wasmtime")),
    ('entrypoint = "app.wasm"', "", ("wasm", "wasmtime")),
    ('entrypoint = "./main.py"', "", ("source", "python")),
    ('entrypoint = "server.js"', "", ("source", "node")),
    ('entrypoint = "run.sh"', "", ("source", "native")),
    # an explicit execution.runtime wins over the default order
    ('runtime = "source"\nentrypoint = "./main.py"', '[targets.oci]\nimage = "python:3.11-slim"',
     ("source", "python")),
    ('runtime = "oci"\nentrypoint = "./main.py"', '[targets.oci]\nimage = "python:3.11-slim"', ("oci", "")),
])
def test_router_default_order_and_explicit_runtime(tmp_path, execution, extra, expected):
    m = manifest(V11.format(execution=execution, extra=extra), tmp_path)
    r = route(m)
    assert (r.runtime, r.driver) == expected


def test_router_explicit_target_wins_and_unknown_target_is_refused(tmp_path):
    m = manifest(V11.format(execution='entrypoint = "./main.py"', extra='[targets.oci]\nimage = "img"'), tmp_path)
    assert route(m).runtime == "oci"
    assert route(m, "execution").runtime == "source"
    with pytest.raises(AtoError, match="target 'nope' not found"):
        route(m, "nope")


@pytest.mark.parametrize("runtime,driver,tier", [
    ("web", "static", 1), ("web", "node", 1), ("web", "deno", 1), ("source", "node", 1), ("source", "deno", 1),
    ("web", "python", 2), ("source", "python", 2), ("source", "native", 2),
])
def test_tiers_follow_seed_000(tmp_path, runtime, driver, tier):
    port = "port = 8080\n" if runtime == "web" else ""
    m = manifest(f"""\
schema_version = "0.2"
name = "tiers"
version = "0.1.0"
type = "app"
default_target = "t"

[targets.t]
runtime = "{runtime}"
driver = "{driver}"
entrypoint = "{'public' if driver == 'static' else 'main.x'}"
{port}""", tmp_path)
    assert route(m).tier == tier


def _route(tmp_path, driver, required=()):
    req = ", ".join(f'"{k}"' for k in required)
    return route(manifest(f"""\
schema_version = "0.2"
name = "locks"
version = "0.1.0"
type = "app"
default_target = "t"

[targets.t]
runtime = "source"
driver = "{driver}"
entrypoint = "main"
required_env = [{req}]
""", tmp_path))


def test_lockfile_rules(tmp_path):
    node = _route(tmp_path, "node")
    with pytest.raises(AtoError) as err:
        policy.check_lockfiles(node, tmp_path)
    assert [p.details["lockfile"] for p in err.value.problems] == ["capsule.lock", "package-lock.json"]
    (tmp_path / "capsule.lock.json").write_text("{}")
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "package-lock.json").write_text("{}")
    assert set(policy.check_lockfiles(node, tmp_path)) == {"capsule.lock", "package-lock.json"}
    deno = _route(tmp_path, "deno")
    assert policy.check_lockfiles(deno, tmp_path)  # package-lock.json stands in for deno.lock
    assert policy.check_lockfiles(_route(tmp_path, "native"), tmp_path) == {}
    with pytest.raises(AtoError, match="uv.lock is required"):
        policy.check_lockfiles(_route(tmp_path, "python"), tmp_path)


def test_required_env_one_problem_per_missing_or_blank_key(tmp_path):
    r = _route(tmp_path, "native", required=("A", "B", "C"))
    problems = policy.required_env_problems(r, [{"A": "x"}, {"B": "  "}])
    assert [p.details["key"] for p in problems] == ["B", "C"]
    assert all(p.code == "ATO_ERR_MISSING_REQUIRED_ENV" for p in problems)


def test_dangerous_flag_guard(monkeypatch):
    monkeypatch.setenv("CAPSULE_ALLOW_UNSAFE", "true")
    with pytest.raises(AtoError, match="CAPSULE_ALLOW_UNSAFE=1"):
        policy.check_dangerous_flag(True)
    monkeypatch.setenv("CAPSULE_ALLOW_UNSAFE", "1")
    policy.check_dangerous_flag(True)
    policy.check_dangerous_flag(False)


def test_consent_needed_recorded_and_tied_to_the_plan(monkeypatch):
    monkeypatch.setattr(policy, "interactive", lambda: False)
    zero = policy.Plan("c", "1.0.0", "t", "wasm", "wasmtime", 1, {})
    assert policy.ensure_consent(zero, yes=False) == "none-needed"
    plan = policy.Plan("c", "1.0.0", "t", "source", "node", 1, {"listen": ["127.0.0.1:1"]})
    with pytest.raises(AtoError) as err:
        policy.ensure_consent(plan, yes=False)
    assert err.value.code == "ATO_ERR_CONSENT_REQUIRED"
    assert policy.ensure_consent(plan, yes=True) == "--yes"
    assert policy.ensure_consent(plan, yes=False) == "recorded"
    wider = policy.Plan("c", "1.0.0", "t", "source", "node", 1, {"listen": ["127.0.0.1:1"], "network": ["x"]})
    with pytest.raises(AtoError):  # more permissions -> a new plan -> consent again
        policy.ensure_consent(wider, yes=False)


def test_checksum_parsing():
    hexd = "a" * 64
    assert engines.parse_checksum(f"{hexd}  nacelle-1-linux-x64\n", "nacelle-1-linux-x64", single_file=False) == hexd
    assert engines.parse_checksum(f"{hexd} *nacelle-1-linux-x64", "nacelle-1-linux-x64", single_file=False) == hexd
    assert engines.parse_checksum(f"SHA256 (nacelle-1-linux-x64) = {hexd.upper()}", "nacelle-1-linux-x64",
                                  single_file=False) == hexd
    assert engines.parse_checksum(f"{hexd}  other-file", "nacelle-1-linux-x64", single_file=False) is None
    assert engines.parse_checksum(f"checksum: {hexd}", "x", single_file=True) == hexd


def test_engine_discovery_precedence_and_no_path_search(tmp_path, monkeypatch):
    fake = tmp_path / "nacelle"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("NACELLE_PATH", raising=False)
    assert engines.candidates(None, None, None) is None  # a `nacelle` on PATH is never picked up
    engines.register_engine("nacelle", tmp_path / "configured", make_default=True)
    assert engines.candidates(None, None, None) == (tmp_path / "configured", "config default_engine=nacelle")
    monkeypatch.setenv("NACELLE_PATH", str(tmp_path / "env"))
    assert engines.candidates(None, None, None)[1] == "NACELLE_PATH"
    assert engines.candidates(str(fake), None, None) == (fake, "--nacelle")
    with pytest.raises(AtoError) as err:
        engines.discover(str(tmp_path / "missing"))
    assert err.value.code == "ATO_ERR_ENGINE_MISSING"


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, b"x" if kind == tarfile.REGTYPE else b""


@pytest.mark.parametrize("members", [
    [_info("/etc/passwd")],
    [_info("../escape.txt")],
    [_info("a/../../escape.txt")],
    [_info("link", tarfile.SYMTYPE, "/etc")],
    [_info("link", tarfile.SYMTYPE, "../../etc")],
    [_info("dev", tarfile.CHRTYPE)],
    [_info("hard", tarfile.LNKTYPE, "a")],
    [_info("d", tarfile.SYMTYPE, "."), _info("d/../../x")],
])
def test_unpack_refuses_members_that_escape(tmp_path, members):
    """The safe unpacker refuses on its own, even for an artifact nobody verified first."""
    art = forge_capsule(tmp_path / "evil.capsule", "evil", "0.1.0", raw_entries=members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AtoError) as err:
        unpack_payload(read_capsule(art), dest)
    assert err.value.code == "E208"
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(AtoError):
        unpack.unpack_capsule(art)  # and the runtime's unpack verifies first
    assert not paths.unpacked_dir().exists() or not any(paths.unpacked_dir().iterdir())


def test_unpack_extracts_files_and_contained_symlinks(tmp_path):
    art = forge_capsule(tmp_path / "ok.capsule", "ok", "0.1.0",
                        raw_entries=[_info("a/b.txt"), _info("a/link", tarfile.SYMTYPE, "b.txt"),
                                     _info("up", tarfile.SYMTYPE, "a/b.txt")])
    dest, _summary = unpack.unpack_capsule(art)
    assert (dest / "a" / "link").read_text() == "x" and (dest / "up").read_text() == "x"
    assert (dest / "capsule.toml").is_file() and not (dest / ".ato-unpacked").exists()
    assert unpack.unpack_capsule(art)[0] == dest  # once per digest


def test_engine_request_to_bubblewrap_argv(tmp_path):
    req = {"spec_version": "0.1.0", "workload": {"argv": ["/bin/echo", "hi"], "cwd": str(tmp_path)},
           "env": {"A": "1"}, "policy": {"network": "none", "read_only": [str(tmp_path)],
                                         "read_write": [str(tmp_path / "out")], "hide": ["/nonexistent"]}}
    (tmp_path / "out").mkdir()
    argv = nacelle.build_argv(req, "/usr/bin/bwrap")
    joined = " ".join(argv)
    assert argv[:5] == ["/usr/bin/bwrap", "--ro-bind", "/", "/", "--dev"]
    assert "--unshare-net" in argv and "--clearenv" in argv
    assert f"--bind {tmp_path / 'out'} {tmp_path / 'out'}" in joined
    assert "--setenv A 1" in joined and argv[-3:] == ["--", "/bin/echo", "hi"]
    req["policy"]["network"] = "host"
    assert "--unshare-net" not in nacelle.build_argv(req, "/usr/bin/bwrap")
    for bad in ({"workload": {"argv": [], "cwd": "/"}}, {"workload": {"argv": ["x"], "cwd": "rel"}},
                {"policy": {"read_write": ["../x"]}}, {"policy": {"network": "some"}}):
        broken = {**req, **bad}
        with pytest.raises(nacelle.RequestError):
            nacelle.build_argv(broken, "/usr/bin/bwrap")
    with pytest.raises(nacelle.RequestError, match="spec_version"):
        nacelle.build_argv({**req, "spec_version": "9"}, "/usr/bin/bwrap")


def test_engine_failure_is_one_json_line_and_exit_125(tmp_path):
    engine = Path(sys.executable).parent / "ato-nacelle"
    request = tmp_path / "req.json"
    request.write_text('{"spec_version": "0.1.0", "workload": {"argv": [], "cwd": "/"}}')
    proc = subprocess.run([str(engine), "internal", "--input", str(request), "exec"], capture_output=True,
                          text=True)
    assert proc.returncode == 125
    assert '"ok": false' in proc.stderr and "workload.argv" in proc.stderr


def test_runtime_config_shapes():
    doc = {"selected_target": "web", "targets": {"web": {"port": 9000, "env": {"A": "1"},
                                                         "permission_mode": "sandbox"}}}
    parsed = parse_runtime_config(doc)
    assert parsed["web"].port == 9000 and parsed["web"].env == {"A": "1"}
    assert parse_runtime_config({"port": "81", "permission_mode": "dangerous"})["*"].permission_mode == "dangerous"
    assert parse_runtime_config({"targets": {"x": {"port": 70000}}})["x"].port is None


def test_input_classification(tmp_path):
    assert looks_local(".", tmp_path) and looks_local("./x", tmp_path) and looks_local("a.capsule", tmp_path)
    assert not looks_local("acme/hello", tmp_path)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "hello").mkdir()
    assert looks_local("acme/hello", tmp_path)  # an existing dir wins over a scoped id


def test_select_units_takes_the_entry_and_its_dependencies():
    def u(name, deps=()):
        return lifecycle.Unit(name, "service", ["true"], {}, "/", depends_on=list(deps))
    units = [u("db"), u("api", ["db"]), u("worker", ["api"]), u("other")]
    assert [x.name for x in lifecycle.select_units(units, "api")] == ["db", "api"]
    assert len(lifecycle.select_units(units, None)) == 4


def test_runner_tasks_then_services_and_a_failing_task_stops_everything(tmp_path):
    log = tmp_path / "log"
    sh = "/bin/sh"
    units = [lifecycle.Unit("prep", "task", [sh, "-c", f"echo prep >> {log}"], {}, str(tmp_path)),
             lifecycle.Unit("main", "service", [sh, "-c", f"echo main >> {log}; exit 4"], {}, str(tmp_path),
                            depends_on=["prep"])]
    out = io.BytesIO()
    assert lifecycle.Runner(units, prefix=True, out=out, err=out).run() == 4
    assert log.read_text() == "prep\nmain\n"
    failing = [lifecycle.Unit("prep", "task", [sh, "-c", "exit 3"], {}, str(tmp_path)),
               lifecycle.Unit("main", "service", [sh, "-c", f"echo never >> {log}"], {}, str(tmp_path),
                              depends_on=["prep"])]
    with pytest.raises(AtoError) as err:
        lifecycle.Runner(failing, prefix=True, out=out, err=out).run()
    assert err.value.code == "ATO_ERR_TASK_FAILED" and "never" not in log.read_text()


def test_runner_prefixes_lines_and_probe_timeout_fails(tmp_path, monkeypatch):
    out = io.BytesIO()
    unit = lifecycle.Unit("svc", "service", ["/bin/sh", "-c", "echo hello; sleep 30"], {"PORT": "1"},
                          str(tmp_path), probe={"tcp_connect": "127.0.0.1", "port": "PORT"})
    with pytest.raises(AtoError, match="readiness check timed out"):
        lifecycle.Runner([unit], prefix=True, out=out, err=out, probe_timeout=0.5, grace=1).run()
    assert b"[svc] hello\n" in out.getvalue()


def test_probes(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]

    def answer() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 503 Busy\r\n\r\n")
            conn.close()
    threading.Thread(target=answer, daemon=True).start()
    assert probes.check(probes.resolve_probe({"tcp_connect": "127.0.0.1", "port": "P"}, {"P": str(port)}, "s"))
    assert not probes.check(probes.resolve_probe({"http_get": "health", "port": port}, {}, "s"))  # 503
    with pytest.raises(AtoError, match="not defined in the service env"):
        probes.resolve_probe({"http_get": "/", "port": "NOPE"}, {}, "s")
    server.close()


def test_reconcile_dead_process_is_exited_never_running(tmp_path):
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    record = {"id": "capsule-00000001", "status": "ready", "pid": proc.pid, "supervisor_pid": proc.pid,
              "started_at": table.now()}
    changed, dirty = table.reconcile(record)
    assert dirty and changed["status"] == "exited" and changed.get("exit_code") is None
    starting = {**record, "status": "starting"}
    assert table.reconcile(starting)[0]["status"] == "failed"
    alive = {**record, "pid": os.getpid(), "supervisor_pid": os.getpid(),
             "supervisor_start": table.proc_start_time(os.getpid())}
    assert table.reconcile(alive) == (alive, False)
    # a reused pid (different start time) is not our process
    assert table.reconcile({**alive, "supervisor_start": "1"})[0]["status"] == "exited"


def test_engine_binary_is_executable_after_install_layout(tmp_path):
    path = tmp_path / "e"
    path.write_text("#!/bin/sh\n")
    assert engines._usable(path) == "is not executable"
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    assert engines._usable(path) is None
    assert engines._usable(tmp_path) == "is not a regular file"


def test_a_service_without_a_probe_is_ready_at_spawn_so_its_dependants_start_at_once(tmp_path):
    """The semantics the DAG e2e test relies on: no readiness contract means ready when spawned."""
    events: list[tuple[str, str]] = []
    marker = tmp_path / "b-started"
    units = [lifecycle.Unit("a", "service", ["/bin/sh", "-c", "sleep 30"], {}, str(tmp_path)),
             lifecycle.Unit("b", "service", ["/bin/sh", "-c", f"touch {marker}; sleep 30"], {}, str(tmp_path),
                            depends_on=["a"], entry=True)]
    runner = lifecycle.Runner(units, prefix=True, out=io.BytesIO(), err=io.BytesIO(), grace=1,
                              on_event=lambda kind, data: events.append((kind, data.get("name", ""))))

    def stop_when_b_runs() -> None:
        deadline = __import__("time").monotonic() + 30
        while not marker.exists() and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.02)
        runner.request_stop(15)
    threading.Thread(target=stop_when_b_runs, daemon=True).start()
    assert runner.run() == 128 + 15
    # a is ready right after it is spawned (before anything else happens), and b starts only then
    assert events[:4] == [("started", "a"), ("ready", "a"), ("started", "b"), ("ready", "b")]


def _planner(tmp_path: Path, text: str):
    from pipeline.runtime import drivers
    from pipeline.runtime.resolve import Overrides

    m = manifest(text, tmp_path)
    return drivers.Planner(m, route(m), Overrides(), drivers.Options(dangerous=True))


SEED_003_LIFECYCLE = """\
[tasks.install]
cmd = "npm ci"
[services.app]
cmd = "npm start"
depends_on = ["install"]
readiness_probe = { http_get = "/health", port = "APP_PORT" }
[lifecycle]
run = "app"
"""


def test_probe_port_names_an_env_var_that_ato_allocates_and_the_url_tells_the_truth(tmp_path):
    text = """\
schema_version = "1.1"
name = "ports"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
driver = "native"
entrypoint = "run.sh"
""" + SEED_003_LIFECYCLE.replace("npm ci", "/bin/true").replace("npm start", "/bin/true")
    launch = _planner(tmp_path, text).build()
    app = next(u for u in launch.units if u.name == "app")
    port = int(app.env["APP_PORT"])
    assert app.env["PORT"] == str(port)  # the entry's PORT and its probe agree
    assert launch.port == port and launch.url == f"http://127.0.0.1:{port}/" and app.url == launch.url
    assert port in launch.listen_ports


def test_a_declared_probe_port_wins_and_is_what_the_url_shows(tmp_path):
    text = """\
schema_version = "0.2"
name = "ports"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "source"
driver = "native"
entrypoint = "run.sh"
port = 4100

[services.main]
entrypoint = "/bin/true"
env = { APP_PORT = "4177" }
readiness_probe = { http_get = "/", port = "APP_PORT" }

[services.api]
entrypoint = "/bin/true"
readiness_probe = { tcp_connect = "127.0.0.1", port = "API_PORT" }
"""
    launch = _planner(tmp_path, text).build()
    main = next(u for u in launch.units if u.name == "main")
    api = next(u for u in launch.units if u.name == "api")
    assert main.env["PORT"] == "4100" and main.env["APP_PORT"] == "4177"
    assert launch.url == "http://127.0.0.1:4177/" and launch.port == 4177
    assert api.env["API_PORT"].isdigit() and "PORT" not in {k for k in api.env if k == "PORT" and k not in
                                                            os.environ}
    assert sorted(launch.listen_ports) == sorted({4177, int(api.env["API_PORT"])})


def test_a_probe_port_that_is_not_a_port_is_refused_before_anything_starts(tmp_path):
    text = """\
schema_version = "0.2"
name = "ports"
version = "0.1.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "source"
driver = "native"
entrypoint = "run.sh"

[services.main]
entrypoint = "/bin/true"
env = { APP_PORT = "eighty" }
readiness_probe = { http_get = "/", port = "APP_PORT" }
"""
    with pytest.raises(AtoError) as err:
        _planner(tmp_path, text).build()
    assert err.value.code == "ATO_ERR_EXECUTION_CONTRACT_INVALID"


def test_deno_translation_of_node_and_npm_commands(tmp_path):
    from pipeline.runtime import deno

    (tmp_path / "server.js").write_text("")
    (tmp_path / "package.json").write_text('{"scripts": {"start": "node server.js --fast", "hooked": "node '
                                           'server.js", "prehooked": "node server.js", "shell": "node a.js | tee x"}}')

    def tr(*argv: str) -> list[str]:
        return deno.translate(list(argv), tmp_path, "t", deno="/d/deno", driver="node")
    out = tr("npm", "start", "--", "extra")
    assert out[:3] == ["/d/deno", "run", deno.FLAGS] and out[-3:] == [str(tmp_path / "server.js"), "--fast", "extra"]
    assert tr("node", "server.js")[-1] == str(tmp_path / "server.js")
    assert tr("npm", "ci")[:3] == ["/d/deno", "install", "--node-modules-dir=auto"]
    for argv, text in ((("node", "--inspect", "server.js"), "node option"), (("npm", "run", "hooked"), "prehooked"),
                       (("npm", "run", "shell"), "cannot run"), (("python3", "x.py"), "not a node or deno"),
                       (("npx", "thing"), "not a node or deno"), (("deno", "run", "-A", "server.js"), "no flags")):
        with pytest.raises(AtoError, match=text) as err:
            tr(*argv)
        assert err.value.code == "ATO_ERR_POLICY_VIOLATION"
    grants = deno.Grants(read=["/cap"], write=["/tmp/run"], net=deno.listen_hosts([8080]))
    flags = deno.materialize(["/d/deno", "serve", deno.FLAGS, "/cap/main.ts"], {"PORT": "8080", "DENO_DIR": "/c"},
                             grants)
    assert flags[:2] == ["/d/deno", "serve"] and "--allow-env=PORT" in flags and "--port=8080" in flags
    assert not any(f.startswith(("--allow-run", "--allow-ffi", "--allow-sys", "-A", "--allow-all")) for f in flags)
    assert deno.denial_in('error: Uncaught NotCapable: Requires net access to "127.0.0.1:9", run again with '
                          'the --allow-net flag') == ("net", "127.0.0.1:9")
    assert deno.denial_in("an ordinary line") is None
