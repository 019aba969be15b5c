"""The capsule.toml model: both forms, every validation rule with its message, normalization."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest
import tomli_w

from pipeline.errors import AtoError
from pipeline.manifest import Manifest, PackRules, load_manifest, parse_manifest
from pipeline.manifest.lifecycle import find_cycle, topological_order

PATH = Path("/proj/capsule.toml")

BASE = """\
schema_version = "0.2"
name = "sample"
version = "1.2.3"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "src/main.py"
"""

DYNAMIC = """\
schema_version = "0.2"
name = "my-dynamic-app"
version = "0.1.0"
default_target = "default"

[pack]
include = ["capsule.toml", "apps/dashboard/.next/standalone/**", "apps/worker/src/**"]
exclude = [".deno/**", "node_modules/**", "**/__pycache__/**"]

[targets.default]
runtime = "web"
driver = "deno"
runtime_version = "1.46.3"
runtime_tools = { node = "20.11.0", python = "3.11.10", uv = "0.4.30" }
port = 4173
required_env = ["CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID"]

[services.main]
entrypoint = "node apps/dashboard/.next/standalone/server.js"
depends_on = ["api"]
readiness_probe = { http_get = "/health", port = "PORT" }

[services.api]
entrypoint = "python apps/control-plane/src/main.py"
env = { API_PORT = "8000" }
readiness_probe = { http_get = "/health", port = "API_PORT" }
"""

V11 = """\
schema_version = "1.1"
name = "example-app"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
entrypoint = "./main.py"

[targets.oci]
image = "python:3.11-slim"

[targets.wasm]
# digest = "sha256:..."

[tasks.install]
cmd = "npm ci"

[services.app]
cmd = "npm start"
depends_on = ["install"]
readiness_probe = { http_get = "/health", port = "APP_PORT" }

[lifecycle]
run = "app"

[metadata]
display_name = "Example"
tags = ["demo"]

[build]
gpu = false

[isolation]
allow_env = ["LOG_LEVEL"]
"""


def parse(text: str, sidecar: str | None = None) -> Manifest:
    return parse_manifest(text, PATH, sidecar=sidecar)


def error(text: str, sidecar: str | None = None) -> AtoError:
    with pytest.raises(AtoError) as info:
        parse(text, sidecar)
    err = info.value
    assert "\n" not in err.message
    return err


def with_target(**keys: str) -> str:
    """BASE with its [targets.default] keys replaced (value strings are raw TOML)."""
    lines = [f"{k} = {v}" for k, v in keys.items()]
    head = BASE.split("[targets.default]")[0]
    return head + "[targets.default]\n" + "\n".join(lines) + "\n"


# --- the 0.2 form ------------------------------------------------------------------------------------


def test_v02_dynamic_app_reads_into_the_model() -> None:
    m = parse(DYNAMIC)
    assert (m.schema_version, m.form, m.name, m.version, m.type) == ("0.2", "0.2", "my-dynamic-app", "0.1.0", "app")
    assert m.default_target == "default" and m.execution is None
    t = m.primary_target()
    assert t is m.targets["default"]
    assert (t.label, t.runtime, t.driver, t.port, t.runtime_version) == ("default", "web", "deno", 4173, "1.46.3")
    assert t.runtime_tools == {"node": "20.11.0", "python": "3.11.10", "uv": "0.4.30"}
    assert t.required_env == ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID")
    assert t.entrypoint is None  # services mode: the services say what runs
    assert m.pack == PackRules(include=("capsule.toml", "apps/dashboard/.next/standalone/**", "apps/worker/src/**"),
                               exclude=(".deno/**", "node_modules/**", "**/__pycache__/**"))
    assert set(m.services) == {"main", "api"}
    main = m.services["main"]
    assert main.entrypoint.startswith("node ") and main.depends_on == ("api",)
    assert main.readiness_probe == {"http_get": "/health", "port": "PORT"}
    assert m.services["api"].env == {"API_PORT": "8000"}
    assert m.tasks == {} and m.lifecycle_run is None and m.delivery is None
    assert not m.is_native() and m.warnings == []
    assert m.project_dir == PATH.parent and m.path == PATH


def test_v02_type_defaults_to_app_and_pack_defaults_to_everything() -> None:
    m = parse(BASE.replace('type = "app"\n', ""))
    assert m.type == "app" and m.pack == PackRules(include=None, exclude=())


def test_legacy_required_envs_are_merged_deduplicated_and_removed_from_env() -> None:
    m = parse(BASE + 'required_env = ["A"]\nenv = { ATO_ORCH_REQUIRED_ENVS = " B, A,,C ", KEEP = "1" }\n')
    t = m.primary_target()
    assert t.required_env == ("A", "B", "C")
    assert t.env == {"KEEP": "1"}


def test_source_digest_per_target_or_from_the_targets_table() -> None:
    digest = "blake3:" + "ab" * 32
    m = parse(BASE.replace("[targets.default]", f'[targets]\nsource_digest = "{digest}"\n\n[targets.default]'))
    assert m.primary_target().source_digest == digest
    other = "blake3:" + "cd" * 32
    m = parse(BASE + f'source_digest = "{other}"\n')
    assert m.primary_target().source_digest == other
    err = error(BASE + 'source_digest = "sha256:abc"\n')
    assert err.code == "E002" and "targets.default.source_digest" in err.message and "blake3:<64 hex>" in err.message


def test_public_on_web_is_a_warning_not_an_error() -> None:
    m = parse(with_target(runtime='"web"', driver='"static"', entrypoint='"dist"', port="8080", public='["dist"]'))
    assert m.warnings == ["capsule.toml: targets.default.public: deprecated for runtime=web and ignored"]


def test_unknown_keys_in_targets_and_services_are_warned_about() -> None:
    m = parse(BASE + 'entrypiont = "x"\n')
    assert m.warnings == ["capsule.toml: targets.default.entrypiont: unknown key, ignored"]


def test_orchestration_service_may_name_a_target() -> None:
    text = BASE + '\n[targets.db]\nruntime = "oci"\nimage = "postgres:16"\n\n[services.main]\nentrypoint = "python a.py"\n' \
                  'depends_on = ["db"]\n[services.db]\ntarget = "db"\n'
    m = parse(text)
    assert m.services["db"].target == "db" and m.targets["db"].runtime == "oci"


# --- the 1.1 form ------------------------------------------------------------------------------------


def test_v11_seed_example_reads_into_the_model() -> None:
    m = parse(V11)
    assert (m.schema_version, m.form, m.default_target) == ("1.1", "1.1", None)
    ex = m.primary_target()
    assert ex is m.execution and (ex.label, ex.runtime, ex.entrypoint) == ("execution", "source", "./main.py")
    assert m.targets["oci"].runtime == "oci" and m.targets["oci"].image == "python:3.11-slim"
    assert m.targets["wasm"].runtime == "wasm"
    assert m.tasks["install"].cmd == "npm ci"
    app = m.services["app"]
    assert app.cmd == "npm start" and app.depends_on == ("install",) and app.entrypoint is None
    assert app.readiness_probe == {"http_get": "/health", "port": "APP_PORT"}
    assert m.lifecycle_run == "app"
    assert m.metadata == {"display_name": "Example", "tags": ["demo"]}
    assert m.build == {"gpu": False} and m.isolation == {"allow_env": ["LOG_LEVEL"]}
    assert list(m.all_targets()) == ["execution", "oci", "wasm"]


def test_v10_is_read_as_the_11_form() -> None:
    assert parse(V11.replace('"1.1"', '"1.0"')).form == "1.1"


def test_v11_execution_without_runtime_lets_the_router_pick() -> None:
    m = parse(V11.replace('runtime = "source"\n', ""))
    assert m.execution.runtime is None


def test_v11_tasks_may_use_an_argv_array() -> None:
    m = parse(V11.replace('cmd = "npm ci"', 'cmd = ["npm", "ci"]'))
    assert m.tasks["install"].cmd == ("npm", "ci")


# --- errors: one line, file + key path + what was expected -------------------------------------------

CASES = [
    # (manifest, code, exact message)
    ('name = "x"\nversion = \n', "E001", "capsule.toml: line 2, column 11: invalid TOML: Invalid value"),
    (BASE.replace('schema_version = "0.2"\n', ""), "E003", "capsule.toml: schema_version: required key is missing"),
    (BASE.replace('"0.2"', '"0.4"'), "E002",
     'capsule.toml: schema_version: expected "0.2" ([targets.<label>] form), "0.3" (flat or [targets.<label>] form), '
     '"1" (v1 authoring form) or "1.1" ([execution] form; "1.0" is also read), got string "0.4"'),
    (BASE.replace('name = "sample"\n', ""), "E003", "capsule.toml: name: required key is missing"),
    (BASE.replace('"sample"', '"My App"'), "E002",
     "capsule.toml: name: expected a lowercase kebab-case name ([a-z0-9-], starting and ending with a letter or "
     'digit, at most 64 characters, no path separators), got string "My App"'),
    (BASE.replace('version = "1.2.3"', 'version = "1.2"'), "E002",
     'capsule.toml: version: expected a semantic version such as "1.0.0" (MAJOR.MINOR.PATCH[-pre][+build]), '
     'got string "1.2"'),
    (BASE.replace('version = "1.2.3"', "version = 3"), "E002", "capsule.toml: version: expected a string, got integer 3"),
    (BASE.replace('type = "app"', 'type = "daemon"'), "E002",
     'capsule.toml: type: expected one of app|tool|job|library|inference, got string "daemon"'),
    (BASE.replace('default_target = "default"\n', ""), "E003", "capsule.toml: default_target: required key is missing"),
    (BASE.replace('default_target = "default"', 'default_target = "web"'), "E002",
     'capsule.toml: default_target: "web" does not exist under [targets] (declared: default)'),
    (BASE.split("[targets.default]")[0] + "[targets]\n", "E003",
     "capsule.toml: targets: at least one [targets.<label>] table is required"),
    (BASE.replace('runtime = "source"\n', ""), "E003",
     "capsule.toml: targets.default.runtime: required key is missing (expected one of oci|source|wasm|web)"),
    (BASE.replace('runtime = "source"', 'runtime = "native"'), "E002",
     'capsule.toml: targets.default.runtime: expected one of oci|source|wasm|web, got string "native" '
     '(use runtime = "source" with driver = "native")'),
    (BASE.replace('runtime = "source"\ndriver = "python"', 'runtime = "web"'), "E002",
     'capsule.toml: targets.default.driver: runtime "web" requires driver (static|node|deno|python)'),
    (BASE.replace('driver = "python"', 'driver = "ruby"'), "E002",
     'capsule.toml: targets.default.driver: expected one of deno|native|node|python|static|wasmtime, got string "ruby"'),
    (BASE.replace('driver = "python"', 'driver = "static"'), "E002",
     'capsule.toml: targets.default.driver: driver "static" is not compatible with runtime "source" '
     "(allowed: deno|native|node|python)"),
    (BASE.replace('runtime = "source"\ndriver = "python"', 'runtime = "web"\ndriver = "browser_static"'), "E002",
     'capsule.toml: targets.default.driver: driver "browser_static" has been removed; use "static"'),
    (BASE.replace('runtime = "source"\ndriver = "python"', 'runtime = "web"\ndriver = "static"'), "E002",
     'capsule.toml: targets.default.port: runtime "web" requires port (1-65535)'),
    (BASE + 'port = "80"\n', "E002", 'capsule.toml: targets.default.port: expected an integer, got string "80"'),
    (BASE + "port = 70000\n", "E002",
     "capsule.toml: targets.default.port: expected a port number between 1 and 65535, got integer 70000"),
    (BASE.replace('entrypoint = "src/main.py"', ""), "E003", "capsule.toml: targets.default.entrypoint: required key is missing"),
    (BASE.replace('"src/main.py"', '"/etc/passwd"'), "E101",
     'capsule.toml: targets.default.entrypoint: "/etc/passwd" must be a relative path inside the project, '
     "not an absolute path"),
    (BASE.replace('"src/main.py"', '"../outside.py"'), "E101",
     "capsule.toml: targets.default.entrypoint: \"../outside.py\" must not contain '..' (it would escape the "
     "project)"),
    (BASE.replace('"src/main.py"', '"python ../x.py"'), "E101",
     "capsule.toml: targets.default.entrypoint: \"python ../x.py\" must not contain '..' (it would escape the "
     "project)"),
    (with_target(runtime='"web"', driver='"deno"', port="80", entrypoint='"ato-entry.ts"'), "E101",
     'capsule.toml: targets.default.entrypoint: "ato-entry.ts" is deprecated and rejected; declare top-level '
     "[services] (with services.main) instead"),
    (with_target(runtime='"web"', driver='"node"', port="80", entrypoint='"node server.js"'), "E101",
     "capsule.toml: targets.default.entrypoint: expected a script file path (shell command strings are not allowed "
     'for runtime=web), got string "node server.js"'),
    (with_target(runtime='"oci"'), "E002", 'capsule.toml: targets.default.image: runtime "oci" requires image (or entrypoint)'),
    (with_target(runtime='"oci"', image='"x"', driver='"node"'), "E002",
     'capsule.toml: targets.default.driver: driver "node" is not compatible with runtime "oci" (allowed: none)'),
    (with_target(runtime='"wasm"'), "E003",
     'capsule.toml: targets.default.entrypoint: runtime "wasm" requires entrypoint (or digest)'),
    (BASE + 'required_env = ["BAD-NAME"]\n', "E002",
     "capsule.toml: targets.default.required_env[0]: expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*), "
     'got string "BAD-NAME"'),
    (BASE + 'env = { ATO_ORCH_REQUIRED_ENVS = "A,B C" }\n', "E002",
     "capsule.toml: targets.default.env.ATO_ORCH_REQUIRED_ENVS: expected comma-separated environment variable names, "
     'got string "B C"'),
    (BASE + "env = { PORT = 8000 }\n", "E002", "capsule.toml: targets.default.env.PORT: expected a string, got integer 8000"),
    (BASE + 'cmd = "run"\n', "E002", 'capsule.toml: targets.default.cmd: expected an array, got string "run"'),
    (BASE + 'working_dir = "../x"\n', "E002",
     "capsule.toml: targets.default.working_dir: \"../x\" must not contain '..' (it would escape the project)"),
    (BASE.replace("[targets.default]", '[targets."my app"]').replace('"default"', '"my app"'), "E002",
     'capsule.toml: targets."my app": expected a label of letters, digits, \'.\', \'_\' or \'-\' (starting with a '
     "letter or digit, at most 64 characters)"),
    (BASE + "\n[pack]\ninclude = [\"../secrets/**\"]\n", "E002",
     "capsule.toml: pack.include[0]: \"../secrets/**\" must not contain '..' (it would escape the project)"),
    (BASE + "\n[pack]\nexclude = [\"/etc/**\"]\n", "E002",
     'capsule.toml: pack.exclude[0]: "/etc/**" must be a relative path inside the project, not an absolute path'),
    (BASE + "\n[pack]\ninclude = [\"\"]\n", "E002",
     'capsule.toml: pack.include[0]: expected a non-empty glob pattern, got string ""'),
    (BASE + "\n[pack]\ninclude = []\n", "E002",
     "capsule.toml: pack.include: expected at least one pattern (omit include to pack every file not excluded)"),
    (BASE + "\n[pack]\nincludes = [\"a\"]\n", "E002",
     "capsule.toml: pack.includes: unknown key (expected one of: exclude, include)"),
    (BASE + '\n[services.api]\nentrypoint = "python b.py"\n', "E003",
     "capsule.toml: services.main: required key is missing (services mode needs a main service; it receives PORT "
     "from targets.default.port)"),
    (BASE + '\n[services.main]\nentrypoint = "python a.py"\ndepends_on = ["api"]\n', "E002",
     'capsule.toml: services.main.depends_on[0]: unknown service "api" (declared: main)'),
    (BASE + '\n[services.main]\nentrypoint = "python a.py"\ndepends_on = ["api"]\n'
            '[services.api]\nentrypoint = "python b.py"\ndepends_on = ["main"]\n', "E002",
     "capsule.toml: services.api.depends_on: dependency cycle: api -> main -> api"),
    (BASE + '\n[services.main]\nentrypoint = "python a.py"\ndepends_on = ["main"]\n', "E002",
     "capsule.toml: services.main.depends_on: dependency cycle: main -> main"),
    (BASE + "\n[services.main]\nenv = {}\n", "E003",
     "capsule.toml: services.main.entrypoint: required key is missing (a service needs entrypoint, cmd or target)"),
    (BASE + '\n[services.main]\nentrypoint = "a"\ntarget = "default"\n', "E002",
     "capsule.toml: services.main.target: expected either target or entrypoint/cmd, not both"),
    (BASE + '\n[services.main]\ntarget = "nope"\n', "E002",
     'capsule.toml: services.main.target: unknown target "nope" (declared: default)'),
    (BASE + '\n[services.main]\nentrypoint = "a"\nreadiness_probe = { http_get = "/health" }\n', "E003",
     "capsule.toml: services.main.readiness_probe.port: required key is missing"),
    (BASE + '\n[services.main]\nentrypoint = "a"\nreadiness_probe = { port = "PORT" }\n', "E003",
     "capsule.toml: services.main.readiness_probe: expected http_get or tcp_connect (with port)"),
    (BASE + '\n[services.main]\nentrypoint = "a"\nreadiness_probe = { tcp_connect = "x", port = "my port" }\n', "E002",
     "capsule.toml: services.main.readiness_probe.port: expected the name of an environment variable holding the "
     'port (e.g. "PORT") or a port number, got string "my port"'),
    (BASE + '\n[services.main]\nentrypoint = "a"\nreadiness_probe = { exec = "x", port = "P" }\n', "E002",
     "capsule.toml: services.main.readiness_probe.exec: unknown key (expected one of: http_get, port, tcp_connect)"),
    (BASE + "\n[execution]\nentrypoint = \"a\"\n", "E002",
     'capsule.toml: execution: [execution] belongs to the schema_version "1.1" form; with "0.2" declare '
     "[targets.<label>] and default_target"),
    (BASE + "ratio = nan\n", "E002", "capsule.toml: targets.default.ratio: expected a finite number, got nan"),
    (BASE + f"big = {2**60}\n", "E002",
     f"capsule.toml: targets.default.big: expected an integer within ±{2**53 - 1}, got {2**60}"),
    (V11.replace('type = "app"\n', ""), "E003", "capsule.toml: type: required key is missing"),
    (V11.split("[execution]")[0], "E003", "capsule.toml: execution: required key is missing"),
    (V11.replace('type = "app"', 'type = "app"\ndefault_target = "oci"'), "E002",
     'capsule.toml: default_target: belongs to the schema_version "0.2" form; with "1.1" the [execution] table is '
     "what runs"),
    (V11.replace('image = "python:3.11-slim"', ""), "E002",
     'capsule.toml: targets.oci.image: runtime "oci" requires image (or entrypoint)'),
    (V11.replace('run = "app"', 'run = "web"'), "E002",
     'capsule.toml: lifecycle.run: "web" is not a declared service or task (declared: app, install)'),
    (V11.replace('depends_on = ["install"]', 'depends_on = ["build"]'), "E002",
     'capsule.toml: services.app.depends_on[0]: unknown service or task "build" (declared: app, install)'),
    (V11.replace('cmd = "npm ci"', 'cmd = "npm ci"\ndepends_on = ["app"]'), "E002",
     "capsule.toml: services.app.depends_on: dependency cycle: app -> install -> app"),
    (V11.replace("[tasks.install]", "[tasks.app]"), "E002",
     "capsule.toml: tasks.app: name is also used by services.app; tasks and services share one dependency graph"),
    (V11.replace('cmd = "npm ci"', 'cmd = " "'), "E002", "capsule.toml: tasks.install.cmd: expected a non-empty command"),
    (V11.replace('cmd = "npm ci"', "env = {}"), "E003", "capsule.toml: tasks.install.cmd: required key is missing"),
]


@pytest.mark.parametrize(("text", "code", "message"), CASES, ids=[f"{i:02d}-{c[1]}" for i, c in enumerate(CASES)])
def test_invalid_manifests_fail_with_one_line_naming_file_key_and_expectation(text: str, code: str,
                                                                              message: str) -> None:
    err = error(text)
    assert (err.code, err.message) == (code, message)
    assert err.exit_code == 1


def test_toml_errors_carry_line_and_column() -> None:
    err = error('name = "x"\nversion = \n')
    assert err.details == {"file": "capsule.toml", "line": 2, "column": 11}


def test_structural_errors_report_the_shallowest_problem_and_list_the_rest() -> None:
    err = error(BASE.replace('name = "sample"\n', "").replace('version = "1.2.3"', "version = 3"))
    assert err.message == "capsule.toml: name: required key is missing"
    assert err.details["key"] == "name" and err.details["file"] == "capsule.toml"
    assert "capsule.toml: version: expected a string, got integer 3" in err.details["problems"]


def test_dates_are_rejected_where_strings_are_expected() -> None:
    err = error(BASE.replace('version = "1.2.3"', "version = 2024-01-01"))
    assert err.code == "E002" and err.message.startswith("capsule.toml: version: expected a string, got date")


def test_load_manifest_reads_the_file_and_reports_absence(tmp_path: Path) -> None:
    with pytest.raises(AtoError) as info:
        load_manifest(tmp_path)
    assert info.value.code == "CAPSULE_TOML_NOT_FOUND" and info.value.message == "capsule.toml was not found"
    (tmp_path / "capsule.toml").write_text(BASE)
    m = load_manifest(tmp_path)
    assert m.path == tmp_path / "capsule.toml" and m.project_dir == tmp_path
    assert load_manifest(tmp_path / "capsule.toml").name == "sample"


def test_non_utf8_manifest_is_a_parse_error(tmp_path: Path) -> None:
    (tmp_path / "capsule.toml").write_bytes(b'name = "\xff"\n')
    with pytest.raises(AtoError) as info:
        load_manifest(tmp_path)
    assert info.value.code == "E001" and "not UTF-8" in info.value.message


# --- normalized(): the manifest written into the artifact ---------------------------------------------


def test_normalized_is_sorted_recursively_and_independent_of_source_order() -> None:
    reordered = """\
default_target = "default"
version = "1.2.3"
[targets.default]
entrypoint = "src/main.py"
env = { Z = "1", A = "2" }
driver = "python"
runtime = "source"
[metadata]
tags = ["b", "a"]
released = 2024-05-01T10:00:00Z
"""
    a = parse(BASE.replace('type = "app"\n', "") + 'env = { A = "2", Z = "1" }\n\n[metadata]\nreleased = 2024-05-01T10:00:00Z\ntags = ["b", "a"]\n')
    b = parse('name = "sample"\nschema_version = "0.2"\n' + reordered)
    na, nb = a.normalized(), b.normalized()
    assert na == nb
    assert tomli_w.dumps(na) == tomli_w.dumps(nb)

    def keys_sorted(value: object) -> bool:
        if isinstance(value, dict):
            return list(value) == sorted(value) and all(keys_sorted(v) for v in value.values())
        if isinstance(value, list):
            return all(keys_sorted(v) for v in value)
        return True

    assert keys_sorted(na)
    assert na["metadata"]["tags"] == ["b", "a"]  # arrays keep their order: it is meaning, not layout
    assert na["metadata"]["released"] == "2024-05-01T10:00:00+00:00"


def test_normalized_round_trips_and_drops_distribution() -> None:
    m = parse(DYNAMIC + '\n[distribution]\nmanifest_hash = "blake3:00"\n')
    norm = m.normalized()
    assert "distribution" not in norm and norm["targets"]["default"]["port"] == 4173
    again = parse(tomli_w.dumps(norm))
    assert again.normalized() == norm
    assert tomllib.loads(tomli_w.dumps(norm)) == norm
    assert parse(DYNAMIC).normalized() == norm


def test_normalized_does_not_mutate_raw() -> None:
    m = parse(BASE + "\n[metadata]\nat = 2024-01-01\n")
    m.normalized()
    assert isinstance(m.raw["metadata"]["at"], dt.date)


# --- the DAG helpers ----------------------------------------------------------------------------------


def test_find_cycle_and_layers() -> None:
    assert find_cycle({"a": ("b",), "b": ("c",), "c": ()}) is None
    assert find_cycle({"a": ("b",), "b": ("c",), "c": ("a",)}) == ["a", "b", "c", "a"]
    assert topological_order({"main": ("api", "worker"), "api": ("db",), "worker": ("db",), "db": ()}) == [
        ["db"], ["api", "worker"], ["main"]]
    with pytest.raises(ValueError):
        topological_order({"a": ("a",)})
