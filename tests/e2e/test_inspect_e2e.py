"""`ato inspect requirements` end to end: the seed-000 success and failure contracts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

try:
    from tests.conftest import assert_schema
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest import assert_schema

MANIFEST = """\
schema_version = "0.2"
name = "inspect-demo"
version = "0.1.0"
type = "app"
default_target = "default"

[isolation]
allow_env = ["LOG_LEVEL"]

[network]
egress_allow = ["api.cloudflare.com"]

[state.data]
durability = "persistent"
attach = "explicit"
purpose = "application data"
schema_id = "inspect-demo/data/v1"

[targets.default]
runtime = "web"
driver = "deno"
port = 4173
required_env = ["CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID"]

[services.main]
entrypoint = "node server.js"
depends_on = ["api"]
readiness_probe = { http_get = "/health", port = "PORT" }

[services.api]
entrypoint = "python api.py"
env = { API_PORT = "8000" }
readiness_probe = { http_get = "/health", port = "API_PORT" }
"""

MINIMAL = """\
schema_version = "0.2"
name = "tiny"
version = "1.0.0"
default_target = "cli"

[targets.cli]
runtime = "source"
driver = "python"
entrypoint = "main.py"
"""


def project(root: Path, text: str = MANIFEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "capsule.toml").write_text(text)
    return root


def failure(res) -> dict:
    """The single JSON error object on stderr (nothing on stdout)."""
    assert res.code == 1, (res.code, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    doc = json.loads(lines[0])
    assert_schema(doc, "inspect-requirements-error")
    return doc["error"]


def test_local_project_success_shape(ato, tmp_path: Path) -> None:
    project(tmp_path / "examples" / "foo")
    res = ato(["inspect", "requirements", "./examples/foo", "--json"], cwd=tmp_path)
    assert res.code == 0, res.stderr
    assert res.stderr == ""
    doc = res.json()
    assert_schema(doc, "inspect-requirements")
    assert list(doc) == ["schemaVersion", "target", "requirements"] and doc["schemaVersion"] == "1"
    assert doc["target"] == {"input": "./examples/foo", "kind": "local",
                             "resolved": {"path": str((tmp_path / "examples" / "foo").resolve())}}
    reqs = doc["requirements"]
    assert list(reqs) == ["secrets", "state", "env", "network", "services", "consent"]
    assert reqs["secrets"] == [{"key": "CLOUDFLARE_API_TOKEN", "required": True,
                                "description": "Required environment variable for target(s): default"}]
    assert [(e["key"], e["required"]) for e in reqs["env"]] == [("CLOUDFLARE_ACCOUNT_ID", True), ("LOG_LEVEL", False)]
    assert reqs["state"] == [{"key": "data", "required": True, "kind": "filesystem", "durability": "persistent",
                              "attach": "explicit", "purpose": "application data",
                              "schemaId": "inspect-demo/data/v1"}]
    assert reqs["network"][0]["key"] == "external-network" and reqs["network"][0]["hosts"] == ["api.cloudflare.com"]
    assert [(s["key"], s.get("dependsOn")) for s in reqs["services"]] == [("api", None), ("main", ["api"])]
    assert [c["key"] for c in reqs["consent"]] == ["network.egress", "filesystem.write", "secrets.access"]


def test_minimal_project_has_empty_lists_and_canonical_path(ato, tmp_path: Path) -> None:
    real = project(tmp_path / "real", MINIMAL)
    os.symlink(real, tmp_path / "link")
    res = ato(["--json", "inspect", "requirements", str(tmp_path / "link")])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "inspect-requirements")
    assert doc["target"]["resolved"]["path"] == str(real.resolve())
    assert all(v == [] for v in doc["requirements"].values())


def test_legacy_required_envs_and_manifest_file_input(ato, tmp_path: Path) -> None:
    text = MINIMAL + 'env = { ATO_ORCH_REQUIRED_ENVS = "GITHUB_TOKEN,REGION" }\n'
    proj = project(tmp_path / "p", text)
    res = ato(["inspect", "requirements", str(proj / "capsule.toml"), "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "inspect-requirements")
    assert doc["target"]["resolved"]["path"] == str((proj / "capsule.toml").resolve())
    assert [s["key"] for s in doc["requirements"]["secrets"]] == ["GITHUB_TOKEN"]
    assert [s["key"] for s in doc["requirements"]["env"]] == ["REGION"]


def test_v11_manifest(ato, tmp_path: Path) -> None:
    text = """\
schema_version = "1.1"
name = "example-app"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
entrypoint = "./main.py"

[targets.oci]
image = "python:3.11-slim"

[tasks.install]
cmd = "npm ci"

[services.app]
cmd = "npm start"
depends_on = ["install"]
readiness_probe = { http_get = "/health", port = "APP_PORT" }

[lifecycle]
run = "app"
"""
    res = ato(["inspect", "requirements", str(project(tmp_path / "p", text)), "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "inspect-requirements")
    assert doc["requirements"]["services"] == [{"key": "app", "required": True, "description": "Primary runtime service",
                                                "dependsOn": ["install"]}]


def test_missing_capsule_toml_failure_shape(ato, tmp_path: Path) -> None:
    (tmp_path / "examples" / "foo").mkdir(parents=True)
    res = ato(["inspect", "requirements", "./examples/foo", "--json"], cwd=tmp_path)
    err = failure(res)
    assert err["code"] == "CAPSULE_TOML_NOT_FOUND"
    assert err["message"] == "capsule.toml was not found"
    assert err["details"]["input"] == "./examples/foo"


def test_missing_path_and_remote_ref_fail_closed(ato, tmp_path: Path) -> None:
    err = failure(ato(["inspect", "requirements", "./nope", "--json"], cwd=tmp_path))
    assert err["code"] == "TARGET_NOT_FOUND" and err["details"]["input"] == "./nope"
    # remote refs go to the registry (issue 8); an unreachable one is a one-line network failure (exit 3)
    res = ato(["inspect", "requirements", "demo/inspect-remote", "--json"], cwd=tmp_path,
              env={"ATO_STORE_API_URL": "http://127.0.0.1:9"})
    assert res.code == 3 and res.stdout == ""
    doc = json.loads(res.stderr.strip().splitlines()[-1])
    assert_schema(doc, "inspect-requirements-error")
    assert doc["error"]["code"] == "E900" and doc["error"]["details"]["input"] == "demo/inspect-remote"


@pytest.mark.parametrize(("text", "code", "key", "fragment"), [
    ('name = "x"\nversion = \n', "E001", None, "line 2, column 11"),
    (MINIMAL.replace('runtime = "source"\ndriver = "python"', 'runtime = "web"'), "E002", "targets.cli.driver",
     'runtime "web" requires driver (static|node|deno|python)'),
    (MINIMAL.replace('name = "tiny"\n', ""), "E003", "name", "required key is missing"),
    (MINIMAL.replace('"main.py"', '"../main.py"'), "E101", "targets.cli.entrypoint", "'..'"),
    (MINIMAL + '\n[services.main]\nentrypoint = "a"\ndepends_on = ["b"]\n[services.b]\nentrypoint = "b"\n'
               'depends_on = ["main"]\n', "E002", "services.b.depends_on", "dependency cycle: b -> main -> b"),
])
def test_manifest_errors_keep_their_code(ato, tmp_path: Path, text: str, code: str, key: str | None,
                                         fragment: str) -> None:
    proj = project(tmp_path / "p", text)
    err = failure(ato(["inspect", "requirements", str(proj), "--json"]))
    assert err["code"] == code and fragment in err["message"] and err["message"].startswith("capsule.toml: ")
    assert err["details"]["input"] == str(proj) and err["details"]["file"] == "capsule.toml"
    if key:
        assert err["details"]["key"] == key
    human = ato(["inspect", "requirements", str(proj)])
    assert human.code == 1 and human.stdout == ""
    lines = human.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: capsule.toml: ") and fragment in lines[0]


def test_human_summary(ato, tmp_path: Path) -> None:
    proj = project(tmp_path / "p", MANIFEST.replace("port = 4173", 'port = 4173\npublic = ["dist"]'))
    res = ato(["inspect", "requirements", str(proj)])
    assert res.code == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"Requirements for {proj}",
        "  Secrets: CLOUDFLARE_API_TOKEN",
        "  State: data",
        "  Env: CLOUDFLARE_ACCOUNT_ID, LOG_LEVEL (optional)",
        "  Network: external-network",
        "  Services: api, main",
        "  Consent: network.egress, filesystem.write, secrets.access",
    ]
    assert "targets.default.public: deprecated" in res.stderr
    quiet = ato(["inspect", "requirements", str(proj), "--json"])
    assert quiet.code == 0 and quiet.stderr == ""  # warnings never mix into --json runs


def test_help_lists_the_command(ato) -> None:
    res = ato(["inspect", "--help"])
    assert res.code == 0 and "requirements" in res.stdout


def test_a_built_capsule_gives_its_projects_requirements(ato, tmp_path: Path) -> None:
    """A .capsule file is inspected from its own capsule.toml once the one verifier accepts it;
    a changed byte is refused with the verifier's code, in this command's error shape."""
    src = project(tmp_path / "src", MINIMAL + 'required_env = ["GREETING"]\n')
    (src / "main.py").write_text("print('tiny')\n")
    artifact = tmp_path / "tiny.capsule"
    built = ato(["build", str(src), "--out", str(artifact), "--json"])
    assert built.code == 0, built.stderr
    from_dir = ato(["inspect", "requirements", str(src), "--json"])
    res = ato(["inspect", "requirements", "tiny.capsule", "--json"], cwd=tmp_path)
    assert res.code == 0 and from_dir.code == 0, res.stderr + from_dir.stderr
    doc = res.json()
    assert_schema(doc, "inspect-requirements")
    assert doc["target"] == {"input": "tiny.capsule", "kind": "local", "resolved": {"path": str(artifact.resolve())}}
    assert doc["requirements"] == from_dir.json()["requirements"]
    assert [e["key"] for e in doc["requirements"]["env"]] == ["GREETING"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    err = failure(ato(["inspect", "requirements", str(artifact), "--json"]))
    assert err["code"] == "E208" and err["details"]["input"] == str(artifact)
