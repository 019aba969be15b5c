"""Manifests of the 0.3 and v1 (authoring) generations, with the little projects around them.

Written for this test suite (not copied from the reference ato): each fixture is a
project (``files``) plus what running it should show (``run``). Placeholders that
depend on the machine or the test: ``40123`` and ``40124`` are ports (replaced by free ones),
``@NODE_MAJOR@`` the host's node major version.

``run`` kinds: ``http`` (background run, GET ``path``, expect ``expect`` in the
body), ``stdout`` (foreground run, ``expect`` in stdout), ``refused`` (exit 1 with
``code``). ``needs``: host parts the run needs (node, bwrap for Tier 2, deno).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PORT = "40123"
PORT2 = "40124"

NODE_HTTP = """\
const http = require('http');
const name = process.argv[2] || 'node';
// Under Tier 1 (Deno) reading a variable the manifest does not declare throws: treat it as unset.
const env = (key) => { try { return process.env[key] || ''; } catch (e) { return ''; } };
http.createServer((req, res) => {
  if (req.url === '/health') { res.end('ok'); return; }
  res.end(`${name} ok ${env('GREETING_PREFIX')}${env('GREETING')} ${req.url}`);
}).listen(Number(process.env.PORT), '127.0.0.1', () => console.log('listening'));
"""
NODE_LOCKS = {"capsule.lock": 'version = "1"\n', "package-lock.json": '{"lockfileVersion": 3, "packages": {}}\n'}
UV_LOCK = """\
version = 1
revision = 3
requires-python = ">=3.8"

[[package]]
name = "app"
version = "0.1.0"
source = { virtual = "." }
"""
PYPROJECT = '[project]\nname = "app"\nversion = "0.1.0"\nrequires-python = ">=3.8"\ndependencies = []\n'
PY_LOCKS = {"uv.lock": UV_LOCK, "pyproject.toml": PYPROJECT}
DENO_LOCKS = {"capsule.lock": 'version = "1"\n', "deno.lock": '{"version": "4"}\n'}
HELLO_TOOL = "#!/bin/sh\necho \"hello from {platform} [$*]\"\n"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Fixture:
    name: str
    generation: str  # "0.3" | "1"
    files: dict[str, str]
    run: dict[str, Any]
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # what a run needs from the environment
    covers: tuple[str, ...] = ()  # key families: web-static, node, python, deno, tool, services, contracts...

    def materialize(self, root: Path, *, ports: tuple[int, int] | None = None, node_major: str = "20") -> Path:
        for rel, text in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if ports is not None:
                text = text.replace(PORT, str(ports[0])).replace(PORT2, str(ports[1]))
            path.write_text(text.replace("@NODE_MAJOR@", node_major))
            if rel.endswith(".sh") or "/bin/" in f"/{rel}":
                path.chmod(0o755)
        return root


V03: list[Fixture] = [
    Fixture("static-site", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "static-site"
version = "1.0.0"
type = "app"
runtime = "web/static"
run = "public"
port = {PORT}
build = "mkdir -p public && cp src/index.html public/index.html"

[metadata]
display_name = "Static site"
description = "A page built by the 0.3 build string"
tags = ["web", "static"]
""",
        "src/index.html": "<h1>static site built by 0.3</h1>\n",
    }, {"kind": "http", "path": "/", "expect": "static site built by 0.3"}, covers=("web-static", "build")),

    Fixture("node-flat", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "node-flat"
version = "0.2.0"
type = "app"
runtime = "source/node"
runtime_version = "@NODE_MAJOR@"
run = "node server.js flat"
port = {PORT}
readiness_probe = "/health"
required_env = ["GREETING"]

[env]
GREETING_PREFIX = "say:"
""",
        "server.js": NODE_HTTP, **NODE_LOCKS,
    }, {"kind": "http", "path": "/x", "expect": "flat ok say:hello /x"}, needs=("node",),
        env={"GREETING": "hello"}, covers=("node", "readiness", "required_env")),

    Fixture("python-flat", "0.3", {
        "capsule.toml": """\
schema_version = "0.3"
name = "python-flat"
version = "0.1.0"
type = "app"
runtime = "source/python"
runtime_version = "3.11"
run = "python main.py --name capsule"
""",
        "main.py": "import sys\nprint('hello', sys.argv[2], 'from python')\n", **PY_LOCKS,
    }, {"kind": "stdout", "expect": "hello capsule from python"}, needs=("bwrap",), covers=("python",)),

    Fixture("deno-flat", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "deno-flat"
version = "0.1.0"
type = "app"
runtime = "web/deno"
run = "main.ts"
port = {PORT}
""",
        "main.ts": "Deno.serve({ port: Number(Deno.env.get('PORT')), hostname: '127.0.0.1' }, "
                   "() => new Response('deno ok'));\n",
        **DENO_LOCKS,
    }, {"kind": "http", "path": "/", "expect": "deno ok"}, needs=("deno",), covers=("deno",)),

    Fixture("tool-platforms", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "hello-tool"
version = "1.0.0"
type = "tool"

[platforms.linux-x86_64]
artifact = "bin/linux-x86_64/hello"
sha256 = "{sha256(HELLO_TOOL.format(platform='linux-x86_64'))}"

[platforms.linux-arm64]
artifact = "bin/linux-arm64/hello"
sha256 = "{sha256(HELLO_TOOL.format(platform='linux-arm64'))}"

[platforms.darwin-arm64]
artifact = "bin/darwin-arm64/hello"
sha256 = "{sha256(HELLO_TOOL.format(platform='darwin-arm64'))}"
""",
        **{f"bin/{p}/hello": HELLO_TOOL.format(platform=p) for p in ("linux-x86_64", "linux-arm64", "darwin-arm64")},
    }, {"kind": "stdout", "expect": "hello from {host} [a b]", "args": ["a", "b"]}, needs=("bwrap",),
        covers=("tool", "platforms")),

    Fixture("services-named", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "services-named"
version = "0.3.0"
type = "app"
default_target = "web"

[targets.web]
runtime = "source"
driver = "node"
port = {PORT}
runtime_tools = {{ node = "@NODE_MAJOR@" }}

[services.main]
entrypoint = "node main.js"
depends_on = ["api"]
env = {{ API_PORT = "{PORT2}" }}
readiness_probe = {{ http_get = "/health", port = "PORT" }}

[services.api]
entrypoint = "node api.js"
env = {{ API_PORT = "{PORT2}" }}
readiness_probe = {{ http_get = "/", port = "API_PORT" }}
""",
        "main.js": """\
const http = require('http');
http.createServer((req, res) => {
  if (req.url === '/health') { res.end('ok'); return; }
  http.get(`http://127.0.0.1:${process.env.API_PORT}/`, (r) => {
    let body = '';
    r.on('data', (c) => { body += c; });
    r.on('end', () => res.end('main sees ' + body));
  });
}).listen(Number(process.env.PORT), '127.0.0.1');
""",
        "api.js": """\
const http = require('http');
const port = Number(process.env.API_PORT);
http.createServer((req, res) => res.end('api on ' + port)).listen(port, '127.0.0.1');
""",
        **NODE_LOCKS,
    }, {"kind": "http", "path": "/", "expect": "main sees api on"}, needs=("node",), covers=("services", "node")),

    Fixture("deps-consumer", "0.3", {
        "capsule.toml": """\
schema_version = "0.3"
name = "report-svc"
version = "0.1.0"
type = "app"
default_target = "app"
required_env = ["PG_PASSWORD"]

[dependencies.db]
capsule = "capsule://ato/pg-provider@16"
contract = "service@1"
parameters = { database = "reports", pool = 4, tls = false }
credentials = { password = "{{env.PG_PASSWORD}}" }
state = { name = "pgdata" }

[targets.app]
runtime = "source"
driver = "node"
run = "node app.js"
needs = ["db"]
required_env = ["REPORT_TOKEN"]

[targets.app.env]
DATABASE_URL = "{{deps.db.runtime_exports.DATABASE_URL}}"
DB_NAME = "{{ deps.db.identity_exports.database }}"
""",
        "app.js": "console.log(process.env.DATABASE_URL);\n", **NODE_LOCKS,
    }, {"kind": "refused", "code": "ATO_ERR_RUNTIME_NOT_RESOLVED",
        "expect": "dependency 'db' needs capsule://ato/pg-provider@16, which this ato cannot resolve"},
        env={"PG_PASSWORD": "pw", "REPORT_TOKEN": "t"}, covers=("contracts", "templates", "needs")),

    Fixture("deps-provider", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "pg-provider"
version = "16.0.0"
type = "app"
default_target = "server"

[targets.server]
runtime = "source"
driver = "node"
run = "node server.js provider"
port = {PORT}

[contracts."service@1"]
target = "server"
ready = {{ type = "tcp", target = "{{{{host}}}}:{{{{port}}}}", timeout = "30s" }}

[contracts."service@1".parameters]
database = {{ type = "string", required = true }}
pool = {{ type = "int", default = 2 }}
tls = {{ type = "bool", default = false }}

[contracts."service@1".credentials]
password = {{ type = "string", required = true }}

[contracts."service@1".identity_exports]
database = "{{{{params.database}}}}"
protocol = "postgresql"

[contracts."service@1".runtime_exports]
HOST = "{{{{host}}}}"
PORT = "{{{{port}}}}"

[contracts."service@1".runtime_exports.DATABASE_URL]
value = "postgresql://app:{{{{credentials.password}}}}@{{{{host}}}}:{{{{port}}}}/{{{{params.database}}}}"
secret = true

[contracts."service@1".state]
required = true
version = "16"
mount = "PGDATA"
""",
        "server.js": NODE_HTTP, **NODE_LOCKS,
    }, {"kind": "http", "path": "/p", "expect": "provider ok"}, needs=("node",), covers=("contracts", "templates")),

    Fixture("stateful-isolated", "0.3", {
        "capsule.toml": """\
schema_version = "0.3"
name = "stateful-isolated"
version = "0.1.0"
type = "app"
runtime = "source/python"
run = "python state.py"

[state.data]
kind = "filesystem"
durability = "persistent"
attach = "explicit"
purpose = "notes written by the app"
schema_id = "stateful-isolated/data/v1"

[isolation]
allow_env = ["APP_MODE"]

[network]
egress_allow = ["example.com"]
""",
        "state.py": """\
import os
path = os.path.join(os.environ["ATO_STATE_DATA"], "note.txt")
with open(path, "a") as fh:
    fh.write("written\\n")
print("mode=" + os.environ.get("APP_MODE", "unset"), "state ok")
""",
        **PY_LOCKS,
    }, {"kind": "stdout", "expect": "mode=prod state ok", "state_file": "data/note.txt"}, needs=("bwrap",),
        env={"APP_MODE": "prod"}, covers=("state", "isolation", "network", "python")),

    Fixture("workspace-packages", "0.3", {
        "capsule.toml": """\
# no schema_version: the [packages] workspace marks it as 0.3, as the reference ato reads it
name = "mono-demo"
version = "0.1.0"

[workspace.defaults]
runtime_version = "@NODE_MAJOR@"

[packages.lib]
type = "library"
build = "mkdir -p gen && echo 42 > gen/answer.txt"

[packages.api]
runtime = "source/node"
run = "node api.js"
""",
        "api.js": "const fs = require('fs');\nconsole.log('answer ' + fs.readFileSync('gen/answer.txt', 'utf8').trim());\n",
        **NODE_LOCKS,
    }, {"kind": "stdout", "expect": "answer 42"}, needs=("node",), covers=("workspace", "build", "node")),

    Fixture("named-multi", "0.3", {
        "capsule.toml": f"""\
schema_version = "0.3"
name = "named-multi"
version = "0.1.0"
type = "app"
default_target = "site"

[targets.site]
runtime = "web"
driver = "static"
run = "www"
port = {PORT}

[targets.cli]
runtime = "source"
driver = "node"
run = ["cli.js", "--shout", "two words"]
""",
        "www/index.html": "<p>named site</p>\n",
        "cli.js": "console.log(process.argv[3].toUpperCase());\n", **NODE_LOCKS,
    }, {"kind": "stdout", "expect": "TWO WORDS", "target": "cli"}, needs=("node",), covers=("named", "node")),
]

V1: list[Fixture] = [
    Fixture("v1-node-web", "1", {
        "capsule.toml": f"""\
schema_version = "1"
name = "v1-node-web"
version = "0.4.0"

[tools]
node = "@NODE_MAJOR@"

[run]
command = ["node", "server.js", "board"]

[web]
port = {PORT}
bind = "127.0.0.1"

[config.BOARD_TOKEN]
kind = "secret"
required = true
description = "token the board checks"

[env]
GREETING = "hi"

[seal_at]
command = ["node", "-e", "process.exit(0)"]
timeout_seconds = 40
""",
        "server.js": NODE_HTTP, **NODE_LOCKS,
    }, {"kind": "http", "path": "/b", "expect": "board ok hi /b"}, needs=("node",), env={"BOARD_TOKEN": "t"},
        covers=("node", "web", "config", "env", "seal_at")),

    Fixture("v1-python-cli", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-python-cli"
version = "1.0.0"

[tools]
python = "3.11"

[run]
command = ["python3", "main.py", "arg with spaces", ""]
""",
        "main.py": "import sys\nprint('argv', sys.argv[1:])\n", **PY_LOCKS,
    }, {"kind": "stdout", "expect": "argv ['arg with spaces', '']"}, needs=("bwrap",), covers=("python",)),

    Fixture("v1-static-output", "1", {
        "capsule.toml": f"""\
schema_version = "1"
name = "v1-static-output"
version = "1.0.0"

[source]
ignore = ["node_modules", "*.log"]

[[build.steps]]
command = ["sh", "-c", "mkdir -p dist && cp site/index.html dist/index.html"]

[run]
command = ["true"]

[web]
port = {PORT}
bind = "127.0.0.1"

[outputs.static_web]
root = "dist"
entry_path = "index.html"
spa_fallback = true
connect_src = ["https://api.example.org", "wss://live.example.org"]
""",
        "site/index.html": "<h1>v1 static output</h1>\n",
        "build.log": "not packed\n",
    }, {"kind": "http", "path": "/", "expect": "v1 static output"}, covers=("web-static", "build-steps", "source")),

    Fixture("v1-deno", "1", {
        "capsule.toml": f"""\
schema_version = "1"
name = "v1-deno"
version = "0.1.0"

[tools]
deno = "2"

[run]
command = ["main.ts"]

[web]
port = {PORT}
bind = "127.0.0.1"
""",
        "main.ts": "Deno.serve({ port: Number(Deno.env.get('PORT')), hostname: '127.0.0.1' }, "
                   "() => new Response('v1 deno ok'));\n",
        **DENO_LOCKS,
    }, {"kind": "http", "path": "/", "expect": "v1 deno ok"}, needs=("deno",), covers=("deno",)),

    Fixture("v1-stateful", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-stateful"
version = "0.1.0"

[tools]
python = "3.11"

[run]
command = ["python3", "notes.py"]

[state.notes]
mount = "/var/lib/notes"
access = "read-write"
schema = "v1-stateful/notes/v1"
snapshot = { exclude = ["*.tmp"] }
""",
        "notes.py": """\
import os
with open(os.path.join(os.environ["ATO_STATE_NOTES"], "n.txt"), "a") as fh:
    fh.write("x\\n")
print("notes saved")
""",
        **PY_LOCKS,
    }, {"kind": "stdout", "expect": "notes saved", "state_file": "notes/n.txt"}, needs=("bwrap",),
        covers=("state", "python")),

    Fixture("v1-source-root", "1", {
        "capsule.toml": f"""\
schema_version = "1"
name = "v1-source-root"
version = "0.1.0"

[source]
root = "app"
ignore = ["*.log", "/scratch"]

[run]
command = ["node", "server.js", "rooted"]

[web]
port = {PORT}
bind = "127.0.0.1"
""",
        "app/server.js": NODE_HTTP, "app/debug.log": "ignored\n", "app/scratch/tmp.txt": "ignored\n",
        "outside.txt": "not packed: outside the source root\n", **{f"app/{k}": v for k, v in NODE_LOCKS.items()},
    }, {"kind": "http", "path": "/r", "expect": "rooted ok  /r"}, needs=("node",), covers=("source", "node", "web")),

    Fixture("v1-native-script", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-native-script"
version = "0.1.0"

[run]
command = ["./hello.sh", "two words"]
""",
        "hello.sh": "#!/bin/sh\necho \"native hello [$1]\"\n",
    }, {"kind": "stdout", "expect": "native hello [two words]"}, needs=("bwrap",), covers=("native",)),

    Fixture("v1-metadata", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-metadata"
version = "2.1.0"

[metadata]
short_description = "A CLI with store metadata"
description = "Shows that v1 [metadata] is read and kept."
license = "Apache-2.0"
tags = ["cli", "demo"]
store = { category = "tools", subcategory = "text" }
assets = { icon = { path = "icon.png" } }

[tools]
node = "@NODE_MAJOR@"

[run]
command = ["node", "cli.js"]
""",
        "cli.js": "console.log('metadata cli ran');\n", "icon.png": "not really a png\n", **NODE_LOCKS,
    }, {"kind": "stdout", "expect": "metadata cli ran"}, needs=("node",), covers=("metadata", "node")),

    Fixture("v1-config", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-config"
version = "0.1.0"

[run]
command = ["node", "env.js"]

[env]
MODE = "batch"

[config.THEME]
kind = "string"
required = false

[config.API_KEY]
kind = "secret"
required = true
""",
        "env.js": "console.log(`mode=${process.env.MODE} theme=${process.env.THEME || 'default'} "
                  "key=${process.env.API_KEY ? 'set' : 'unset'}`);\n",
        **NODE_LOCKS,
    }, {"kind": "stdout", "expect": "mode=batch theme=dark key=set"}, needs=("node",),
        env={"API_KEY": "k", "THEME": "dark"}, covers=("config", "env", "node")),

    Fixture("v1-build-steps", "1", {
        "capsule.toml": """\
schema_version = "1"
name = "v1-build-steps"
version = "0.1.0"

[[build.steps]]
command = ["mkdir", "-p", "gen"]

[[build.steps]]
command = ["sh", "-c", "echo built-by-steps > gen/out.txt"]

[run]
command = ["node", "show.js"]
""",
        "show.js": "console.log(require('fs').readFileSync(__dirname + '/gen/out.txt', 'utf8').trim());\n",
        **NODE_LOCKS,
    }, {"kind": "stdout", "expect": "built-by-steps"}, needs=("node",), covers=("build-steps", "node")),
]

ALL = V03 + V1
