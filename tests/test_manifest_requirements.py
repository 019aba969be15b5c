"""Requirements derived from capsule.toml (the data behind `ato inspect requirements`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.envelope import validation_errors
from pipeline.errors import AtoError
from pipeline.manifest import parse_manifest
from pipeline.manifest.requirements import derive, inspect_local, is_secret, looks_local

PATH = Path("/proj/capsule.toml")

FULL = """\
schema_version = "0.2"
name = "vault"
version = "1.0.0"
default_target = "web"

[isolation]
allow_env = ["LOG_LEVEL", "CLOUDFLARE_ACCOUNT_ID", "EXTRA_API_KEY"]

[network]
egress_allow = ["b.example.com", " a.example.com ", "b.example.com", " "]
egress_id_allow = [{ type = "spiffe", value = "spiffe://x/y" }, { type = "cidr", value = "10.0.0.0/8" }]

[state.data]
durability = "persistent"
attach = "explicit"
purpose = "primary database"
schema_id = "vaultwarden/data/v1"

[state.cache]
durability = "ephemeral"

[targets.web]
runtime = "web"
driver = "deno"
port = 8080
required_env = ["CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID"]

[targets.worker]
runtime = "source"
driver = "node"
entrypoint = "worker.js"
env = { ATO_ORCH_REQUIRED_ENVS = "CLOUDFLARE_ACCOUNT_ID,DB_PASSWORD" }

[targets.db]
runtime = "oci"
image = "postgres:16"

[services.main]
entrypoint = "node server.js"
depends_on = ["api", "db"]

[services.api]
entrypoint = "python api.py"

[services.db]
target = "db"
"""


def requirements(text: str) -> dict:
    return derive(parse_manifest(text, PATH))


def test_full_manifest_requirements() -> None:
    r = requirements(FULL)
    assert r["secrets"] == [
        {"key": "CLOUDFLARE_API_TOKEN", "required": True, "description": "Required environment variable for target(s): web"},
        {"key": "DB_PASSWORD", "required": True, "description": "Required environment variable for target(s): worker"},
        {"key": "EXTRA_API_KEY", "required": False, "description": "Optional host environment variable passthrough"},
    ]
    assert r["env"] == [
        {"key": "CLOUDFLARE_ACCOUNT_ID", "required": True,
         "description": "Required environment variable for target(s): web, worker"},
        {"key": "LOG_LEVEL", "required": False, "description": "Optional host environment variable passthrough"},
    ]
    assert r["state"] == [
        {"key": "cache", "required": True, "kind": "filesystem", "durability": "ephemeral", "attach": "auto"},
        {"key": "data", "required": True, "kind": "filesystem", "durability": "persistent", "attach": "explicit",
         "purpose": "primary database", "schemaId": "vaultwarden/data/v1"},
    ]
    assert r["network"] == [{
        "key": "external-network", "required": True, "description": "Requires outbound network access",
        "hosts": ["a.example.com", "b.example.com"],
        "identities": [{"type": "cidr", "value": "10.0.0.0/8"}, {"type": "spiffe", "value": "spiffe://x/y"}],
    }]
    assert r["services"] == [
        {"key": "api", "required": True, "description": "Service declared in capsule.toml"},
        {"key": "db", "required": True, "description": "Service declared in capsule.toml targeting 'db'", "target": "db"},
        {"key": "main", "required": True, "description": "Primary runtime service", "dependsOn": ["api", "db"]},
    ]
    assert [c["key"] for c in r["consent"]] == ["network.egress", "filesystem.write", "secrets.access"]


def test_minimal_manifest_needs_nothing() -> None:
    text = ('schema_version = "0.2"\nname = "x"\nversion = "0.1.0"\ndefault_target = "d"\n'
            '[targets.d]\nruntime = "source"\nentrypoint = "main.py"\n')
    assert requirements(text) == {"secrets": [], "state": [], "env": [], "network": [], "services": [], "consent": []}


def test_v11_execution_env_tasks_and_lifecycle_primary() -> None:
    text = """\
schema_version = "1.1"
name = "example-app"
version = "0.1.0"
type = "app"
[execution]
runtime = "source"
entrypoint = "main.py"
required_env = ["APP_SECRET"]
[tasks.install]
cmd = "npm ci"
[services.app]
cmd = "npm start"
depends_on = ["install"]
[lifecycle]
run = "app"
"""
    r = requirements(text)
    assert r["secrets"] == [{"key": "APP_SECRET", "required": True,
                             "description": "Required environment variable for target(s): execution"}]
    assert r["services"] == [{"key": "app", "required": True, "description": "Primary runtime service",
                              "dependsOn": ["install"]}]
    assert r["consent"] == [{"key": "secrets.access", "required": True,
                             "description": "Requires secret provisioning before launch"}]


@pytest.mark.parametrize(("key", "secret"), [
    ("API_TOKEN", True), ("db_password", True), ("MY_SECRET_X", True), ("OPENAI_API_KEY", True), ("SSH_KEY", True),
    ("KEYBOARD", False), ("LOG_LEVEL", False), ("PORT", False),
])
def test_secret_classification(key: str, secret: bool) -> None:
    assert is_secret(key) is secret


def test_input_classification(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    assert looks_local("proj", tmp_path)  # exists
    for text in ("./x", "../x", "/abs/x", "~/x", "x.capsule", "dir/capsule.toml", "C:\\x", "plain"):
        assert looks_local(text, tmp_path), text
    for text in ("demo/inspect-remote", "koh0920/ato-cli@1.0.0"):
        assert not looks_local(text, tmp_path), text


def test_inspect_local_document_and_errors(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "capsule.toml").write_text(FULL)
    doc, warnings = inspect_local("p", cwd=tmp_path)
    assert doc["target"] == {"input": "p", "kind": "local", "resolved": {"path": str((tmp_path / "p").resolve())}}
    assert validation_errors(doc, "inspect-requirements") == [] and warnings == []

    with pytest.raises(AtoError) as info:
        inspect_local("empty", cwd=tmp_path)
    assert info.value.code == "TARGET_NOT_FOUND"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtoError) as info:
        inspect_local("empty", cwd=tmp_path)
    assert (info.value.code, info.value.message) == ("CAPSULE_TOML_NOT_FOUND", "capsule.toml was not found")
    assert info.value.details["input"] == "empty"
    (tmp_path / "empty" / "capsule.toml").write_text("name = \n")
    with pytest.raises(AtoError) as info:
        inspect_local("empty", cwd=tmp_path)
    assert info.value.code == "E001" and info.value.details["input"] == "empty"
