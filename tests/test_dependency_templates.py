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
