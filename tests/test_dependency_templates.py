"""Units of pipeline.runtime.dependencies: durations, capsule URLs, template rendering, credential files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import AtoError
from pipeline.manifest.contracts import Contract, Dependency, Export
from pipeline.runtime import dependencies as deps


@pytest.mark.parametrize(("raw", "expected"), [("30s", 30), ("2m", 120), ("500ms", 0.5), (7, 7.0), (None, 30.0),
                                               (" 1h ", 3600)])
def test_durations(raw, expected) -> None:
    assert deps.seconds(raw) == expected


@pytest.mark.parametrize("raw", ["soon", "1d", "-1s", True])
def test_bad_durations_are_refused(raw) -> None:
    with pytest.raises(AtoError) as err:
        deps.seconds(raw)
    assert err.value.code == "E002"


def test_capsule_urls() -> None:
    assert deps.provider_ref("capsule://ato/acme/kv@1.0.0") == "acme/kv@1.0.0"
    for url in ("capsule://ato/postgres@16", "capsule://github.com/acme/kv@abc"):
        with pytest.raises(AtoError) as err:
            deps.provider_ref(url, "db")
        assert err.value.code == "ATO_ERR_RUNTIME_NOT_RESOLVED" and err.value.hint and "'db'" in err.value.message


def _context(tmp_path: Path, **dep) -> deps.Context:
    contract = Contract(id="service@1", target="server",
                        parameters={"database": {"type": "string", "required": True},
                                    "size": {"type": "int", "default": 3}},
                        credentials={"password": {"type": "string", "required": True}},
                        runtime_exports={"URL": Export("pg://u:{{credentials.password}}@{{host}}:{{port}}")})
    dependency = Dependency(alias="db", capsule="capsule://ato/acme/pg@1", contract="service@1",
                            parameters=dep.get("parameters", {"database": "reports"}),
                            credentials=dep.get("credentials", {"password": "{{env.DB_PASS}}"}))
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    for old in secrets.iterdir():
        old.unlink()
    return deps.Context("db", dependency, contract, 5433, None, secrets, secrets / "s.sock")


def test_credentials_are_files_in_commands_and_values_in_exports(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DB_PASS", "pw-123")
    ctx = _context(tmp_path)
    in_process = deps.render("serve --password-file {{credentials.password}} --port {{port}} "
                             "--db {{params.database}} --size {{ params.size }}", ctx.lookup(credentials_as_files=True))
    path = tmp_path / "secrets" / "password"
    assert in_process == f"serve --password-file {path} --port 5433 --db reports --size 3"
    assert path.read_text() == "pw-123" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    exported = deps.render("pg://u:{{credentials.password}}@{{host}}:{{port}}", ctx.lookup(credentials_as_files=False))
    assert exported == "pg://u:pw-123@127.0.0.1:5433"


def test_missing_values_fail_closed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DB_PASS", raising=False)
    with pytest.raises(AtoError) as err:
        _context(tmp_path)
    assert err.value.code == "ATO_ERR_MISSING_REQUIRED_ENV" and "DB_PASS" in err.value.message
    monkeypatch.setenv("DB_PASS", "x")
    with pytest.raises(AtoError) as err:
        _context(tmp_path, parameters={})
    assert "parameters.database" in err.value.message
    ctx = _context(tmp_path)
    with pytest.raises(AtoError):
        deps.render("{{state.dir}}", ctx.lookup(credentials_as_files=True))  # no state named


def test_state_lock_is_exclusive(tmp_path: Path) -> None:
    lock = deps.state_lock(tmp_path / "pgdata")
    fd = deps.try_lock(lock)
    assert fd is not None and fd >= 0
    assert deps.try_lock(lock) is None
    with pytest.raises(AtoError) as err:
        deps.check_free(lock, "db")
    assert err.value.code == "ATO_ERR_STATE_IN_USE"
    os.close(fd)
    deps.check_free(lock, "db")


PROVIDER = """\
schema_version = "0.3"
name = "pg"
version = "16.0.0"
type = "app"
default_target = "server"

[targets.server]
runtime = "source"
driver = "native"
run = "sh serve.sh {{port}}"

[contracts."service@1"]
target = "server"
ready = { type = "tcp", target = "{{host}}:{{port}}" }
state = { version = "16", mount = "MOUNT" }
"""

CONSUMER = """\
schema_version = "0.3"
name = "report"
version = "0.1.0"
type = "app"
default_target = "app"

[dependencies.db]
capsule = "capsule://ato/acme/pg@16.0.0"
contract = "service@1"
state = { name = "pgdata" }

[targets.app]
runtime = "source"
driver = "native"
run = "sh app.sh"
needs = ["db"]
"""


def _plan(tmp_path: Path, mount: str) -> list[deps.Provided]:
    from pipeline.manifest import load_manifest
    from pipeline.runtime.resolve import Resolved

    for name, text in (("pg", PROVIDER.replace("MOUNT", mount)), ("report", CONSUMER)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "capsule.toml").write_text(text)
    provider = load_manifest(tmp_path / "pg")
    consumer = load_manifest(tmp_path / "report")
    asked: list[str] = []

    def resolve_provider(ref: str) -> Resolved:
        asked.append(ref)
        return Resolved("installed", ref, provider.project_dir, provider, scoped_id="acme/pg")

    def plan_provider(res, rt, inject, reach):  # what the provider is given; its units come from session.prepare
        from pipeline.runtime.drivers import Launch
        return Launch(units=[], prefix=True, entry="main", runtime_label="test", port=rt.target.port, url=None,
                      network="host", permissions={"inject": inject, "reach": reach}), "--yes"

    out = deps.plan(consumer, consumer.primary_target(), run_id="capsule-0000abcd", resolve_provider=resolve_provider,
                    plan_provider=plan_provider)
    assert asked == ["acme/pg@16.0.0"]
    return out


def test_a_state_mount_variable_receives_the_consumer_owned_state_dir(tmp_path: Path) -> None:
    (p,) = _plan(tmp_path, "PGDATA")
    state = Path(os.environ["ATO_HOME"]) / "state" / "dependencies" / "report" / "db" / "16" / "pgdata"
    assert p.state_dir == str(state) and state.is_dir()
    assert p.launch.permissions["inject"] == {"PGDATA": str(state)} and str(state) in p.launch.permissions["reach"]
    assert p.ready["tcp_connect"] == f"127.0.0.1:{p.launch.port}"
    deps.discard("capsule-0000abcd")


def test_a_fixed_state_mount_path_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    with pytest.raises(AtoError) as err:
        _plan(tmp_path, "/var/lib/postgresql/data")
    assert err.value.code == "ATO_ERR_EXECUTION_CONTRACT_INVALID" and "/var/lib/postgresql/data" in err.value.message
    assert not deps.secrets_dir("capsule-0000abcd").exists()
