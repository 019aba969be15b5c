"""`ato config`: settings in $ATO_HOME/config.toml with one precedence (flag > env > config > default).

End to end against a real `ato registry serve`: once `ato config set registry URL` is done, search,
install, run and publish use that registry with no --registry on their command lines.
"""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import pytest

from pipeline import paths
from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry
from tests.e2e.test_run_e2e import Proc, http_get, static_site

DEAD = "http://127.0.0.1:9"  # nothing listens there: any use of it is exit 3 naming it


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "registry-data")
    yield reg
    reg.stop()


def setting(doc: dict, key: str) -> dict:
    return next(s for s in doc["settings"] if s["key"] == key)


def test_config_set_registry_is_used_by_publish_search_install_and_run(ato, tmp_path: Path, registry) -> None:
    project = tmp_path / "site"
    port = static_site(project)
    built = ato(["build", "."], cwd=project)
    assert built.code == 0, built.stderr
    # the Store default points nowhere: a command that ignored the setting would fail with exit 3
    env = {"ATO_STORE_API_URL": DEAD}

    res = ato(["config", "set", "registry", registry.url.removeprefix("http://"), "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "config")
    assert setting(doc, "registry") == {"key": "registry", "value": registry.url, "origin": "config",
                                        "env": ["ATO_REGISTRY"], "default": None}
    assert tomllib.loads(paths.config_path().read_text())["registry"] == registry.url

    pub = ato(["publish", "--artifact", "./site.capsule", "--json"], cwd=project, env={**env, "ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr
    assert pub.json()["registry"] == registry.url and pub.json()["route"] == "private"

    found = ato(["search", "site", "--json"], env=env)
    assert found.code == 0, found.stderr
    assert found.json()["registry"] == registry.url
    assert [c["scoped_id"] for c in found.json()["capsules"]] == ["local/site"]

    inst = ato(["install", "local/site", "--json"], env=env)
    assert inst.code == 0, inst.stderr
    assert inst.json()["registry"] == registry.url

    run = Proc(["run", "local/site", "--yes"], env=env)
    try:
        run.wait_line(f"http://127.0.0.1:{port}/", stream="err", timeout=60)
        assert "static ok" in http_get(f"http://127.0.0.1:{port}/")
        os.killpg(run.p.pid, signal.SIGINT)
        assert run.wait() == 130
    finally:
        run.kill()

    # precedence: the flag beats ATO_REGISTRY beats config.toml beats the default
    assert ato(["search", "--registry", DEAD], env=env).code == 3
    via_env = ato(["search", "--json"], env={**env, "ATO_REGISTRY": DEAD})
    assert via_env.code == 3 and "127.0.0.1:9" in via_env.stderr
    listed = ato(["config", "list", "--show-origin", "--json"], env={**env, "ATO_REGISTRY": DEAD}).json()
    assert_schema(listed, "config")
    assert setting(listed, "registry")["origin"] == "env:ATO_REGISTRY"
    assert setting(listed, "store_url") == {"key": "store_url", "value": DEAD, "origin": "env:ATO_STORE_API_URL",
                                            "env": ["ATO_STORE_API_URL"], "default": "https://api.ato.run"}
    assert setting(listed, "output.color")["origin"] == "default"
    text = ato(["config", "list", "--show-origin"], env=env).stdout
    assert f"config                     registry = {registry.url}" in text.splitlines()

    assert ato(["config", "unset", "registry"], env=env).code == 0
    assert "registry" not in tomllib.loads(paths.config_path().read_text())
    again = ato(["search", "site"], env=env)
    assert again.code == 3 and "127.0.0.1:9" in again.stderr  # back to the Store default (ATO_STORE_API_URL)
    assert ato(["config", "get", "registry", "--show-origin"], env=env).stdout == f"env:ATO_STORE_API_URL\t{DEAD}\n"


def test_config_refuses_what_it_does_not_know_and_keeps_engines(ato) -> None:
    for args, needle in ((["set", "output.color", "purple"], "must be one of auto, always, never"),
                         (["set", "no.such", "x"], "unknown configuration key 'no.such'"),
                         (["get", "nope"], "unknown configuration key 'nope'"),
                         (["set", "registry", "ftp://example.com"], "http or https")):
        res = ato(["config", *args])
        assert res.code == 1 and "error[E100]" in res.stderr and needle in res.stderr, res.stderr
    assert not paths.config_path().exists()  # nothing was written

    # entries written by `ato config engine` survive settings changes, and `list` shows them
    paths.config_path().parent.mkdir(parents=True, exist_ok=True)
    paths.config_path().write_text('default_engine = "nacelle"\n[engines.nacelle]\npath = "/opt/nacelle"\n')
    assert ato(["config", "set", "output.progress", "never"]).code == 0
    assert ato(["config", "set", "store_url", "https://store.example.com/"]).code == 0
    doc = tomllib.loads(paths.config_path().read_text())
    assert doc == {"default_engine": "nacelle", "engines": {"nacelle": {"path": "/opt/nacelle"}},
                   "output": {"progress": "never"}, "store_url": "https://store.example.com"}
    listed = ato(["config", "list"]).stdout.splitlines()
    assert "engines.nacelle.path = /opt/nacelle" in listed and "output.progress = never" in listed
    assert ato(["config", "unset", "output.progress"]).code == 0
    assert "output" not in tomllib.loads(paths.config_path().read_text())  # no empty [output] table left
    assert not list(paths.config_path().parent.glob(".config.toml.*"))  # no temp file left behind

    paths.config_path().write_text("registry = [unclosed\n")
    bad = ato(["config", "list"])
    assert bad.code == 1 and "not valid TOML" in bad.stderr and "Traceback" not in bad.stderr
