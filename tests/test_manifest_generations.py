"""0.3 and v1 manifests onto the one model: translation, strictness, contracts, the normalized model, upgrades."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from pipeline.errors import AtoError
from pipeline.manifest import Manifest, parse_manifest
from pipeline.manifest.platforms import host_platform
from pipeline.manifest.requirements import derive
from pipeline.manifest.upgrade import upgrade, view
from tests.generation_fixtures import ALL, V03, V1, Fixture

PATH = Path("/proj/capsule.toml")


def parse(text: str, *, strict: bool = False) -> Manifest:
    return parse_manifest(text, PATH, strict=strict)


def error(text: str, *, strict: bool = False) -> AtoError:
    with pytest.raises(AtoError) as info:
        parse(text, strict=strict)
    assert "\n" not in info.value.message
    return info.value


def fixture(name: str) -> Manifest:
    fx = next(f for f in ALL if f.name == name)
    return parse(fx.files["capsule.toml"])


def semantic(m: Manifest) -> dict:
    """What build and run read from the model (everything but where it was written)."""
    return {"targets": m.targets, "default": m.default_target, "services": m.services, "tasks": m.tasks,
            "pack": m.pack, "state": m.state, "network": m.network, "isolation": m.isolation,
            "steps": [(s.command, s.working_dir) for s in m.build_steps], "deps": m.dependencies,
            "contracts": m.contracts, "platforms": m.platforms, "required_env": m.required_env,
            "name": m.name, "version": m.version, "type": m.type, "delivery": m.delivery}


# --- every fixture ---------------------------------------------------------------------------------


def test_the_suite_holds_ten_of_each_generation_covering_every_key_family() -> None:
    assert len(V03) >= 10 and len(V1) >= 10
    covered = {c for f in ALL for c in f.covers}
    for family in ("web-static", "node", "python", "deno", "tool", "services", "contracts", "templates", "state",
                   "isolation", "network", "build", "build-steps", "web", "config", "source", "workspace"):
        assert family in covered, family


@pytest.mark.parametrize("fx", ALL, ids=lambda f: f.name)
def test_fixture_reads_and_its_normalized_model_reads_back_to_the_same_model(fx: Fixture) -> None:
    m = parse(fx.files["capsule.toml"])
    assert m.generation == fx.generation and m.form == "0.2"
    assert [w for w in m.warnings if "seal_at" not in w] == []
    norm = m.normalized()
    assert norm["schema_version"] == "0.2" and norm["type"] in ("app", "tool")
    again = parse(tomli_w.dumps(norm))
    assert again.generation == "0.2" and again.normalized() == norm
    assert semantic(again) == semantic(m)


# --- 0.3 translation ---------------------------------------------------------------------------------


def test_flat_03_folds_into_the_default_target() -> None:
    m = fixture("node-flat")
    t = m.primary_target()
    assert (t.label, t.runtime, t.driver, t.entrypoint, t.port) == ("app", "source", "node", "node server.js flat",
                                                                   40123)
    assert t.readiness_probe == {"http_get": "/health", "port": "PORT"}
    assert t.required_env == ("GREETING",) and m.required_env == ("GREETING",)
    assert t.env == {"GREETING_PREFIX": "say:"} and t.runtime_version == "@NODE_MAJOR@"


def test_flat_web_static_serves_the_run_directory_and_the_build_string_is_a_build_step() -> None:
    m = fixture("static-site")
    t = m.primary_target()
    assert (t.runtime, t.driver, t.entrypoint, t.port) == ("web", "static", "public", 40123)
    assert [(s.command, s.key) for s in m.build_steps] == [
        ("mkdir -p public && cp src/index.html public/index.html", "build")]
    assert m.metadata["tags"] == ["web", "static"]


@pytest.mark.parametrize(("run", "served"), [("dist/index.html", "dist"), ("dist/", "dist"), ("", "."),
                                             ("index.html", "."), ("out", "out")])
def test_a_flat_static_run_names_the_directory(run: str, served: str) -> None:
    m = parse(f'schema_version = "0.3"\nname = "s-s"\nversion = "1.0.0"\ntype = "app"\nruntime = "web/static"\n'
              f'run = "{run}"\nport = 8080\n')
    assert m.primary_target().entrypoint == served


@pytest.mark.parametrize(("runtime", "pair"), [("source/node", ("source", "node")), ("web/node", ("source", "node")),
                                               ("source/go", ("source", "native")), ("web/static", ("web", "static")),
                                               ("source/python", ("source", "python"))])
def test_compound_runtimes_split_into_runtime_and_driver(runtime: str, pair: tuple[str, str]) -> None:
    extra = 'port = 8080\n' if runtime.startswith("web") else ""
    m = parse(f'schema_version = "0.3"\nname = "c-c"\nversion = "1.0.0"\ntype = "app"\nruntime = "{runtime}"\n'
              f'run = "main"\n{extra}')
    assert (m.primary_target().runtime, m.primary_target().driver) == pair


def test_named_targets_keep_web_node_as_web_and_run_arrays_are_argv() -> None:
    m = fixture("named-multi")
    assert m.default_target == "site" and m.targets["site"].entrypoint == "www"
    cli = m.targets["cli"]
    assert (cli.entrypoint, cli.cmd) == ("cli.js", ("--shout", "two words"))


def test_tool_platforms_become_one_pinned_native_target_each() -> None:
    m = fixture("tool-platforms")
    assert m.type == "tool" and sorted(m.targets) == ["darwin-arm64", "linux-arm64", "linux-x86_64"]
    t = m.targets["linux-x86_64"]
    assert (t.runtime, t.driver, t.entrypoint) == ("source", "native", "bin/linux-x86_64/hello")
    assert t.digest == "sha256:" + m.platforms["linux-x86_64"]["sha256"]
    assert host_platform().count("-") == 1


def test_workspace_packages_become_targets_and_libraries_build_steps() -> None:
    m = fixture("workspace-packages")
    assert m.generation == "0.3" and m.schema_version == "0.3" and m.type == "app"
    assert list(m.targets) == ["api"] and m.default_target == "api"
    assert m.targets["api"].runtime_version == "@NODE_MAJOR@"
    assert [(s.command, s.key) for s in m.build_steps] == [("mkdir -p gen && echo 42 > gen/answer.txt",
                                                            "packages.lib")]


OCI_WORKSPACE = """\
schema_version = "0.3"
name = "oci-pair"
version = "0.1.0"
type = "app"

[packages.web]
type = "app"
runtime = "source/node"
run = "node server.js"
port = 18080

[packages.cache]
type = "app"
runtime = "oci"
image = "docker.io/library/busybox:1.36"
cmd = ["sh", "-c", "echo cache-ok && sleep 3600"]

[services.main]
target = "web"
depends_on = ["cache"]

[services.cache]
target = "cache"
"""


def test_an_oci_package_may_give_its_container_command_as_a_cmd_array() -> None:
    m = parse(OCI_WORKSPACE)
    assert m.targets["cache"].runtime == "oci"
    assert m.normalized()["targets"]["cache"]["cmd"] == ["sh", "-c", "echo cache-ok && sleep 3600"]
    assert parse_manifest(tomli_w.dumps(m.normalized()), PATH).normalized() == m.normalized()
    err = error(OCI_WORKSPACE.replace('image = "docker.io/library/busybox:1.36"',
                                      'image = "docker.io/library/busybox:1.36"\nrun = ["sh", "-c", "x"]'))
    assert err.message == "capsule.toml: packages.cache.cmd: give the command once: run (an argv array) or cmd, not both"
    err = error(OCI_WORKSPACE.replace('run = "node server.js"', 'cmd = ["node", "server.js"]'))
    assert err.message.startswith('capsule.toml: packages.web.cmd: "cmd" is the 0.2 spelling')


def test_services_and_state_read_as_in_02() -> None:
    m = fixture("services-named")
    assert set(m.services) == {"main", "api"} and m.services["main"].depends_on == ("api",)
    m = fixture("stateful-isolated")
    assert m.state["data"]["durability"] == "persistent" and m.isolation == {"allow_env": ["APP_MODE"]}
    assert m.network == {"egress_allow": ["example.com"]}


def test_03_version_is_optional_and_the_upstream_spellings_are_read() -> None:
    m = parse('schema_version = "0.3"\nname = "no-ver"\ntype = "app"\nruntime = "source/node"\nrun = "node a.js"\n'
              '[env]\nrequired = ["TOKEN"]\nPLAIN = "1"\n')
    assert m.version == "0.0.0" and "version: not set" in m.warnings[0]
    t = m.primary_target()
    assert t.required_env == ("TOKEN",) and t.env == {"PLAIN": "1"}
    m = parse('schema_version = "0.3"\nname = "probes"\ntype = "app"\nversion = "1.0.0"\ndefault_target = "a"\n'
              '[targets.a]\nruntime = "source"\ndriver = "node"\nrun = "node a.js"\ndepends_on = ["b"]\n'
              'readiness_probe = { type = "tcp", target = "127.0.0.1", timeout_seconds = 5 }\n'
              '[targets.b]\nruntime = "source"\ndriver = "node"\nrun = "node b.js"\n')
    a = m.targets["a"]
    assert a.needs == ("b",) and a.readiness_probe == {"tcp_connect": "127.0.0.1", "port": "PORT"}
    assert any("timeout_seconds: not applied" in w for w in m.warnings)


def test_10_targets_source_without_runtime_gets_the_upstream_default() -> None:
    m = parse('schema_version = "1.0"\nname = "legacy-src"\nversion = "0.1.0"\ntype = "app"\n'
              '[execution]\nruntime = "source"\nentrypoint = "main.py"\n'
              '[targets]\npreference = ["source"]\n[targets.source]\nlanguage = "python"\nentrypoint = "main.py"\n'
              'dev_mode = true\n')
    assert m.targets["source"].runtime == "source"
    assert m.warnings == ["capsule.toml: targets.source.dev_mode: unknown key, ignored"]


# --- v1 translation ----------------------------------------------------------------------------------


def test_v1_run_web_tools_config_and_env() -> None:
    m = fixture("v1-node-web")
    t = m.primary_target()
    assert (t.runtime, t.driver, t.entrypoint, t.cmd) == ("source", "node", "node", ("server.js", "board"))
    assert (t.port, t.bind, t.readiness_probe) == (40123, "127.0.0.1", {"http_get": "/", "port": "PORT"})
    assert t.runtime_version == "@NODE_MAJOR@" and t.runtime_tools == {"node": "@NODE_MAJOR@"}
    assert t.required_env == ("BOARD_TOKEN",) and t.secret_env == ("BOARD_TOKEN",) and t.env == {"GREETING": "hi"}
    assert m.raw["seal_at"]["timeout_seconds"] == 40 and "seal_at" in m.normalized()


def test_v1_static_output_serves_root_and_the_run_command_is_not_used() -> None:
    m = fixture("v1-static-output")
    t = m.primary_target()
    assert (t.runtime, t.driver, t.entrypoint, t.port) == ("web", "static", "dist", 40123)
    assert m.normalized()["targets"]["app"]["static_web"]["connect_src"] == ["https://api.example.org",
                                                                           "wss://live.example.org"]
    assert [s.command for s in m.build_steps] == [("sh", "-c", "mkdir -p dist && cp site/index.html dist/index.html")]
    assert m.pack.exclude == ("**/node_modules", "**/node_modules/**", "**/*.log", "**/*.log/**")
    m = parse('schema_version = "1"\nname = "no-web"\nversion = "1"\n[run]\ncommand = ["true"]\n'
              '[outputs.static_web]\nroot = "."\n'.replace('version = "1"\n[run]', 'version = "1.0.0"\n[run]'))
    assert m.primary_target().port == 8080


def test_v1_source_root_packs_only_the_root_and_runs_there() -> None:
    m = fixture("v1-source-root")
    t = m.primary_target()
    assert t.working_dir == "app" and m.pack.include == ("app/**",)
    assert m.pack.exclude == ("app/**/*.log", "app/**/*.log/**", "app/scratch", "app/scratch/**")


def test_v1_config_optional_settings_and_drivers_by_program() -> None:
    t = fixture("v1-config").primary_target()
    assert t.required_env == ("API_KEY",) and t.secret_env == ("API_KEY",) and t.optional_env == ("THEME",)
    assert fixture("v1-native-script").primary_target().driver == "native"
    assert fixture("v1-deno").primary_target().driver == "deno"
    assert fixture("v1-python-cli").primary_target().cmd == ("main.py", "arg with spaces", "")


def test_v1_state_is_persistent_filesystem_state() -> None:
    m = fixture("v1-stateful")
    assert m.state["notes"] == {"kind": "filesystem", "durability": "persistent", "attach": "auto",
                                "schema_id": "v1-stateful/notes/v1", "mount": "/var/lib/notes",
                                "access": "read-write", "snapshot": {"exclude": ["*.tmp"]}}


# --- errors: one line, the key as written --------------------------------------------------------------

FLAT = 'schema_version = "0.3"\nname = "flat-app"\nversion = "1.0.0"\ntype = "app"\nruntime = "source/node"\n' \
       'run = "node a.js"\n'
V1_BASE = 'schema_version = "1"\nname = "v1-app"\nversion = "1.0.0"\n\n[run]\ncommand = ["node", "a.js"]\n'
CONSUMER = next(f for f in V03 if f.name == "deps-consumer").files["capsule.toml"]
PROVIDER = next(f for f in V03 if f.name == "deps-provider").files["capsule.toml"]

V02_HEAD = 'schema_version = "0.2"\nname = "a"\nversion = "1.0.0"\ntype = "app"\ndefault_target = "app"\n'
V02_TARGET = '[targets.app]\nruntime = "source"\ndriver = "node"\nentrypoint = "a.js"\n'
V11_TEXT = 'schema_version = "1.1"\nname = "a"\nversion = "1.0.0"\ntype = "app"\n' \
           '[execution]\nruntime = "source"\nentrypoint = "a.js"\n'

CASES = [
    # unsupported schema: always the headline, naming the versions read
    (FLAT.replace('"0.3"', '"2"') + 'build = 5\n', False, "E002",
     'capsule.toml: schema_version: expected "0.2" ([targets.<label>] form), "0.3" (flat or [targets.<label>] '
     'form), "1" (v1 authoring form) or "1.1" ([execution] form; "1.0" is also read), got string "2"'),
    (FLAT.replace('"0.3"', "3"), False, "E002",
     'capsule.toml: schema_version: expected a string: "0.2" ([targets.<label>] form), "0.3" (flat or '
     '[targets.<label>] form), "1" (v1 authoring form) or "1.1" ([execution] form; "1.0" is also read), '
     "got integer 3"),
    # wrong type, named at the key as written
    (FLAT + "port = \"8080\"\n", False, "E002", "capsule.toml: port: expected an integer, "
                                               'got string "8080"'),
    (FLAT + "build = 5\n", False, "E002",
     "capsule.toml: build: expected a command line (string) or a [build] table, got integer 5"),
    # a table in another generation's form: the schema version is the headline
    (V1_BASE.replace('[run]\ncommand = ["node", "a.js"]', 'run = "node a.js"'), False, "E002",
     'capsule.toml: schema_version "1": run is written in the "0.3" form (run: expected a table, got string '
     '"node a.js")'),
    (V02_HEAD + 'build = "pnpm build"\n' + V02_TARGET, False, "E002",
     'capsule.toml: schema_version "0.2": build is written in the "0.3" form (build: expected a table, got string '
     '"pnpm build")'),
    (V02_HEAD.replace('default_target = "app"\n', 'runtime = "source/node"\nrun = "node a.js"\n'), False, "E003",
     'capsule.toml: schema_version "0.2": runtime, run are written in the "0.3" form (default_target: required key '
     'is missing)'),
    (V11_TEXT.replace("[execution]", 'build = "pnpm build"\n[execution]'), False, "E002",
     'capsule.toml: schema_version "1.1": build is written in the "0.3" form (build: expected a table, got string '
     '"pnpm build")'),
    (FLAT.replace('runtime = "source/node"\nrun = "node a.js"\n', '[execution]\nruntime = "source"\n'
                  'entrypoint = "a.js"\n'), False, "E003",
     'capsule.toml: schema_version "0.3": execution is written in the "1.1" form (default_target: required key is '
     'missing (name the target that runs, or use the flat form: runtime = "source/node", run = "..."))'),
    (V1_BASE + '[web]\nport = 70000\nbind = "127.0.0.1"\n', False, "E002",
     "capsule.toml: web.port: expected a port number between 1 and 65535, got integer 70000"),
    (V1_BASE + '[web]\nport = 8080\n', False, "E003", "capsule.toml: web.bind: required key is missing"),
    (V1_BASE.replace('["node", "a.js"]', "[]"), False, "E002",
     "capsule.toml: run.command: expected a non-empty array of strings (argv), got array"),
    # semantic rules of the 0.2 model, reported at the 0.3/v1 key
    (FLAT.replace("source/node", "web/static"), False, "E002",
     'capsule.toml: port: runtime "web" requires port (1-65535)'),
    (FLAT.replace('run = "node a.js"', 'run = "node ../a.js"'), False, "E101",
     "capsule.toml: run: \"node ../a.js\" must not contain '..' (it would escape the project)"),
    (FLAT.replace("type = \"app\"\n", ""), False, "E003",
     "capsule.toml: type: required key is missing (app|tool|inference|job|library)"),
    ('schema_version = "0.3"\nname = "legacy"\nversion = "1.0.0"\ntype = "app"\ndefault_target = "a"\n'
     '[targets.a]\nruntime = "source"\nentrypoint = "a.js"\n', False, "E002",
     'capsule.toml: targets.a.entrypoint: "entrypoint" is the 0.2 spelling; with schema_version "0.3" use run '
     "(a command line string, or an argv array)"),
    (V1_BASE + '[env]\nAPI_TOKEN = "x"\n', False, "E002",
     'capsule.toml: env.API_TOKEN: a secret-looking name cannot have a value in the manifest; declare '
     '[config.API_TOKEN] kind = "secret" and pass it at run time'),
    (V1_BASE + '[source]\nroot = "../up"\n', False, "E002",
     "capsule.toml: source.root: expected a relative directory without '.', '..' or empty segments, '\\\\', '%' "
     'or a leading/trailing \'/\', got "../up"'),
    (V1_BASE + '[source]\nignore = ["!keep"]\n', False, "E002",
     'capsule.toml: source.ignore[0]: negated patterns are not supported by this ato, got "!keep"'),
    # unknown table / typo: warnings by default, E002 under strict
    (FLAT + "[buid]\nx = 1\n", True, "E002", 'capsule.toml: buid: unknown table (did you mean "build"?)'),
    (FLAT + "prot = 8080\n", True, "E002", 'capsule.toml: prot: unknown key (did you mean "port"?)'),
    (V1_BASE + '[web]\nport = 8080\nbind = "127.0.0.1"\nbnid = "x"\n', True, "E002",
     'capsule.toml: web.bnid: unknown key (did you mean "bind"?)'),
    (FLAT + '[storage.volumes]\ndata = "/data"\n', True, "E002",
     "capsule.toml: storage: unsupported: [storage] volumes are not mounted by this ato"),
    (FLAT + '[ipc.imprts.x]\nfrom = "y"\n', True, "E002",
     'capsule.toml: ipc.imprts: unknown table (did you mean "imports"?)'),
    # templates
    (CONSUMER.replace("runtime_exports.DATABASE_URL", "runtime_export.DATABASE_URL"), False, "E002",
     "capsule.toml: targets.app.env.DATABASE_URL: invalid template: unsupported template expression "
     "'{{deps.db.runtime_export.DATABASE_URL}}' (allowed: host, port, socket, state.dir, params.K, credentials.K, "
     "env.K, deps.D.runtime_exports.K, deps.D.identity_exports.K)"),
    (CONSUMER.replace('"{{deps.db.runtime_exports.DATABASE_URL}}"', '"{{deps.db.runtime_exports.DATABASE_URL"'),
     False, "E002", "capsule.toml: targets.app.env.DATABASE_URL: invalid template: unterminated '{{' (no "
                    "closing '}}')"),
    (CONSUMER.replace("deps.db.runtime_exports", "deps.cache.runtime_exports"), False, "E002",
     'capsule.toml: targets.app.env.DATABASE_URL: {{deps.cache.runtime_exports.DATABASE_URL}} names dependency '
     '"cache", which is not declared (declared: db)'),
    (CONSUMER.replace('DB_NAME = "{{ deps.db.identity_exports.database }}"', 'DB_NAME = "{{}}"'), False, "E002",
     "capsule.toml: targets.app.env.DB_NAME: invalid template: empty template expression '{{}}'"),
    (CONSUMER.replace('"{{env.PG_PASSWORD}}"', '"hunter2"'), False, "E002",
     'capsule.toml: dependencies.db.credentials.password: expected a pure {{env.X}} reference (a literal '
     'credential would be packed and published), got "hunter2"'),
    (CONSUMER.replace('required_env = ["PG_PASSWORD"]\n', ""), False, "E002",
     "capsule.toml: dependencies.db.credentials.password: {{env.PG_PASSWORD}} reads PG_PASSWORD, which is not in "
     "the top-level required_env (the scope of {{env.X}} in [dependencies])"),
    # unknown aliases, bad refs, cycles
    (CONSUMER.replace('needs = ["db"]', 'needs = ["cache"]'), False, "E002",
     'capsule.toml: targets.app.needs[0]: unknown dependency or target "cache" (dependencies: db; targets: app)'),
    (CONSUMER.replace("capsule://ato/pg-provider@16", "https://example.com/pg"), False, "E002",
     'capsule.toml: dependencies.db.capsule: expected capsule://<authority>/<path>@<ref> (authority "ato" or a '
     'host name; ref a version such as 16 or sha256:<64 hex>), got "https://example.com/pg"'),
    (CONSUMER.replace("capsule://ato/pg-provider@16", "capsule://ato/pg-provider"), False, "E002",
     'capsule.toml: dependencies.db.capsule: expected capsule://<authority>/<path>@<ref> (authority "ato" or a '
     'host name; ref a version such as 16 or sha256:<64 hex>), got "capsule://ato/pg-provider"'),
    (CONSUMER.replace('contract = "service@1"', 'contract = "service"'), False, "E002",
     'capsule.toml: dependencies.db.contract: expected <name>@<major> (e.g. "service@1"), got "service"'),
    ('schema_version = "0.3"\nname = "cyc"\nversion = "1.0.0"\ntype = "app"\ndefault_target = "a"\n'
     '[targets.a]\nruntime = "source/node"\nrun = "node a.js"\nneeds = ["b"]\n'
     '[targets.b]\nruntime = "source/node"\nrun = "node b.js"\nneeds = ["a"]\n', False, "E002",
     "capsule.toml: targets.a.needs: dependency cycle: a -> b -> a"),
    (CONSUMER.replace('state = { name = "pgdata" }', 'state = { name = "pgdata", ownership = "shared" }'), False,
     "E002", 'capsule.toml: dependencies.db.state.ownership: expected "parent" (the only ownership a dependency\'s '
             'state can have), got string "shared"'),
    # provider contracts
    (PROVIDER.replace('"]\ntarget = "server"', '"]\ntarget = "db"'), False, "E002",
     'capsule.toml: contracts."service@1".target: unknown target "db" (declared: server)'),
    (PROVIDER.replace('database = "{{params.database}}"', 'database = "{{credentials.password}}"'), False, "E002",
     'capsule.toml: contracts."service@1".identity_exports.database: {{credentials.password}} cannot be an '
     "identity export (identity is fixed when the dependency is locked; credentials and run-time values are not)"),
    (PROVIDER.replace("/{{params.database}}", "/{{params.db}}"), False, "E002",
     'capsule.toml: contracts."service@1".runtime_exports.DATABASE_URL.value: {{params.db}} reads parameters.db, '
     "which the contract does not declare (declared: database, pool, tls)"),
    (PROVIDER.replace('password = { type = "string", required = true }',
                      'password = { type = "string", default = "x" }'), False, "E002",
     'capsule.toml: contracts."service@1".credentials.password.default: a credential cannot have a default (it '
     "would be packed and published)"),
    (PROVIDER.replace('ready = { type = "tcp"', 'ready = { type = "http"'), False, "E002",
     'capsule.toml: contracts."service@1".ready.type: ready type "http" is reserved; use tcp, probe or postgres'),
    (PROVIDER.replace('version = "16"\n', ""), False, "E003",
     'capsule.toml: contracts."service@1".state.version: required key is missing (a required state needs a '
     "version, so data of another layout is never reused)"),
    # tools
    (next(f for f in V03 if f.name == "tool-platforms").files["capsule.toml"].replace("linux-arm64]", "linux-ppc]"),
     False, "E002", 'capsule.toml: platforms.linux-ppc: expected <darwin|linux|windows>-<arm64|x86_64> (e.g. '
                    'linux-x86_64), got "linux-ppc"'),
    (FLAT + '[platforms.linux-x86_64]\nartifact = "a"\nsha256 = "' + "0" * 64 + '"\n', False, "E002",
     "capsule.toml: platforms: [platforms] describes a tool's per-platform programs; it needs type = \"tool\", got "
     'type string "app"'),
]


@pytest.mark.parametrize(("text", "strict", "code", "message"), CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_errors_are_one_line_naming_the_key_as_written(text: str, strict: bool, code: str, message: str) -> None:
    err = error(text, strict=strict)
    assert (err.code, err.message) == (code, message)
    assert err.exit_code == 1


def test_the_schema_version_headline_lists_every_other_problem_once() -> None:
    err = error(FLAT.replace('"0.3"', '"0.9"'))
    assert err.message.startswith("capsule.toml: schema_version: expected ") and err.details["readable"] == [
        "0.2", "0.3", "1", "1.0", "1.1"]


def test_without_schema_version_03_spellings_read_as_03_and_the_rest_is_refused() -> None:
    m = parse(FLAT.replace('schema_version = "0.3"\n', ""))
    assert m.generation == "0.3" and m.schema_version == "0.3"
    err = error('name = "x-y"\nversion = "1.0.0"\n[execution]\nentrypoint = "a"\n')
    assert (err.code, err.message) == ("E003", "capsule.toml: schema_version: required key is missing")
    assert err.hint == 'add schema_version = "1.1" (the [execution] form)'


def test_unknown_keys_warn_with_did_you_mean_at_every_level() -> None:
    m = parse(FLAT + 'prot = 1\n[buid]\nx = 1\n[metadata]\ndescripton = "d"\n[network]\negress_alow = []\n'
                     '[ipc]\nexprts = {}\n[storage]\nx = 1\n[services.main]\nentrypoint = "node a.js"\ndepnds_on = []\n')
    assert m.warning_lines() == [
        'capsule.toml: prot: unknown key, ignored (did you mean "port"?)',
        'capsule.toml: buid: unknown table, ignored (did you mean "build"?)',
        'capsule.toml: metadata.descripton: unknown key, ignored (did you mean "description"?)',
        'capsule.toml: network.egress_alow: unknown key, ignored (did you mean "egress_allow"?)',
        'capsule.toml: ipc.exprts: unknown table, ignored (did you mean "exports"?)',
        "capsule.toml: storage: unsupported: [storage] volumes are not mounted by this ato; kept, but nothing acts "
        "on it",
        'capsule.toml: services.main.depnds_on: unknown key, ignored (did you mean "depends_on"?)',
    ]
    assert m.normalized()["buid"] == {"x": 1} and m.normalized()["ipc"] == {"exprts": {}}  # kept, never dropped
    err = error(FLAT + 'prot = 1\n[buid]\nx = 1\n', strict=True)
    assert err.details["problems"] == ['capsule.toml: prot: unknown key (did you mean "port"?)',
                                       'capsule.toml: buid: unknown table (did you mean "build"?)']


def test_strict_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATO_STRICT_MANIFEST", "1")
    with pytest.raises(AtoError) as info:
        parse_manifest(FLAT + "prot = 1\n", PATH)
    assert info.value.code == "E002"
    monkeypatch.setenv("ATO_STRICT_MANIFEST", "no")
    assert parse_manifest(FLAT + "prot = 1\n", PATH).warnings


def test_02_unknown_tables_now_warn_but_read_as_before() -> None:
    text = ('schema_version = "0.2"\nname = "old"\nversion = "1.0.0"\ndefault_target = "d"\n[targets.d]\n'
            'runtime = "source"\ndriver = "node"\nentrypoint = "a.js"\n[transparency]\nlevel = 1\n')
    m = parse(text)
    assert m.primary_target().entrypoint == "a.js" and m.warnings == [
        "capsule.toml: transparency: unsupported: [transparency] is not acted on by this ato; kept, but nothing "
        "acts on it"]


# --- dependency contracts ------------------------------------------------------------------------------


def test_consumer_and_provider_contracts_are_read() -> None:
    m = parse(CONSUMER)
    dep = m.dependencies["db"]
    assert (dep.capsule, dep.contract, dep.state) == ("capsule://ato/pg-provider@16", "service@1", "pgdata")
    assert dep.parameters == {"database": "reports", "pool": 4, "tls": False}
    assert dep.credential_env() == ["PG_PASSWORD"] and m.targets["app"].needs == ("db",)
    p = parse(PROVIDER)
    c = p.contracts["service@1"]
    assert c.target == "server" and c.ready["type"] == "tcp" and c.runtime_exports["DATABASE_URL"].secret
    assert not c.runtime_exports["HOST"].secret and c.identity_exports["protocol"] == "postgresql"


def test_a_template_without_needs_is_a_warning() -> None:
    m = parse(CONSUMER.replace('needs = ["db"]\n', ""))
    assert any("targets.app.needs does not list" in w for w in m.warnings)


def test_provider_checks_find_missing_exports_and_parameters() -> None:
    from pipeline.manifest.contracts import check_provider

    consumer, provider = parse(CONSUMER), parse(PROVIDER)
    check_provider("db", consumer.dependencies["db"], provider.contracts, consumer.targets, "capsule.toml", "p")
    missing = parse(CONSUMER.replace("runtime_exports.DATABASE_URL", "runtime_exports.DSN"))
    with pytest.raises(AtoError) as info:
        check_provider("db", missing.dependencies["db"], provider.contracts, missing.targets, "capsule.toml", "p")
    assert info.value.message == ("capsule.toml: targets.app.env.DATABASE_URL: {{deps.db.runtime_exports.DSN}}: "
                                  'the provider\'s service@1 does not export "DSN" as runtime_exports (exports: '
                                  "DATABASE_URL, HOST, PORT)")
    wrong = parse(CONSUMER.replace("pool = 4", 'pool = "four"'))
    with pytest.raises(AtoError) as info:
        check_provider("db", wrong.dependencies["db"], provider.contracts, wrong.targets, "capsule.toml", "p")
    assert info.value.message == "capsule.toml: dependencies.db.parameters.pool: expected a int (the provider's type)"


def test_requirements_list_dependencies_credentials_and_their_state() -> None:
    req = derive(parse(CONSUMER))
    assert req["services"] == [{"key": "db", "required": True, "description": "Dependency "
                                "capsule://ato/pg-provider@16 offering service@1, needed by target(s): app"}]
    assert [(i["key"], i["required"]) for i in req["secrets"]] == [("PG_PASSWORD", True), ("REPORT_TOKEN", True)]
    assert req["secrets"][0]["description"] == "Required for the credentials of dependency 'db'"
    assert [i["key"] for i in req["state"]] == ["db/pgdata"]
    req = derive(fixture("v1-config"))
    assert [(i["key"], i["required"]) for i in req["secrets"]] == [("API_KEY", True)]
    assert [(i["key"], i["required"]) for i in req["env"]] == [("THEME", False)]


# --- upgrades: the same normalized model in another generation -----------------------------------------

V02 = """\
schema_version = "0.2"
name = "my-dynamic-app"
version = "0.1.0"
default_target = "default"

[pack]
include = ["capsule.toml", "apps/**"]

[targets.default]
runtime = "web"
driver = "deno"
runtime_version = "1.46.3"
runtime_tools = { node = "20.11.0", python = "3.11.10" }
port = 4173
required_env = ["CLOUDFLARE_API_TOKEN"]
env = { ATO_ORCH_REQUIRED_ENVS = "A,B" }

[targets.cli]
runtime = "source"
driver = "python"
entrypoint = "main.py"
cmd = ["--verbose", "two words"]

[services.main]
entrypoint = "node apps/server.js"
readiness_probe = { http_get = "/health", port = "PORT" }

[state.data]
durability = "persistent"
"""


V02_SIMPLE = """\
schema_version = "0.2"
name = "simple"
version = "1.0.0"
type = "job"
default_target = "run"

[targets.run]
runtime = "source"
driver = "node"
entrypoint = "node job.js"
working_dir = "jobs"
readiness_probe = { tcp_connect = "127.0.0.1", port = 9000 }

[metadata]
tags = ["b", "a"]
"""


@pytest.mark.parametrize("text", [V02, V02_SIMPLE])
def test_02_to_03_and_back_keeps_the_normalized_model(text: str) -> None:
    m02 = parse(text)
    up = upgrade(m02, "0.3")
    m03 = parse(up)
    assert m03.generation == "0.3" and m03.normalized() == m02.normalized() and semantic(m03) == semantic(m02)
    assert 'run = [\n    "main.py",\n    "--verbose",\n    "two words",\n]' in up or 'run = "node job.js"' in up
    back = parse(upgrade(m03, "0.2"))
    assert back.generation == "0.2" and back.normalized() == m02.normalized()


@pytest.mark.parametrize("fx", ALL, ids=lambda f: f.name)
def test_every_fixture_moves_to_02_and_03_with_the_same_model(fx: Fixture) -> None:
    m = parse(fx.files["capsule.toml"])
    for to in ("0.2", "0.3"):
        again = parse(upgrade(m, to))
        assert again.normalized() == m.normalized(), to


def test_02_to_11_and_back_keeps_what_runs() -> None:
    single = V02.split("[targets.cli]")[0] + "[services.main]" + V02.split("[services.main]")[1]
    m02 = parse(single)
    m11 = parse(upgrade(m02, "1.1"))
    assert m11.form == "1.1" and m11.execution is not None and view(m11) == view(m02)
    back = parse(upgrade(m11, "0.2"))
    assert view(back) == view(m02) and back.default_target == "app"


def test_upgrades_refuse_what_the_other_form_cannot_say() -> None:
    with pytest.raises(AtoError) as info:
        upgrade(parse(V02), "1.1")
    assert info.value.message == ("capsule.toml: targets.cli: the 1.1 form has one [execution] and only "
                                  "[targets.oci|wasm|source] beside it; this target has no place there")
    routed = parse('schema_version = "1.1"\nname = "r-r"\nversion = "1.0.0"\ntype = "app"\n[execution]\n'
                   'entrypoint = "main.py"\n[targets.oci]\nimage = "python:3.11"\n')
    with pytest.raises(AtoError) as info:
        upgrade(routed, "0.3")
    assert "the router chooses between [execution]" in info.value.message and info.value.code == "E002"
