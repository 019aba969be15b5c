"""Store-side flows against `ato registry serve --store-user` on loopback: login/whoami/logout,
search and inspect with ATO_STORE_API_URL as the default registry, and gen-ci."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry, make_project

ALICE = "alice-session-token"


@pytest.fixture
def store(tmp_path: Path):
    reg = Registry(tmp_path / "store-data", token=TOKEN, extra_args=["--store-user", f"alice={ALICE}"])
    yield reg
    reg.stop()


def store_env(store: Registry) -> dict[str, str]:
    return {"ATO_STORE_API_URL": store.url, "ATO_STORE_SITE_URL": store.url}


def test_login_whoami_logout(ato, store: Registry, isolated_home: Path) -> None:
    env = store_env(store)
    res = ato(["whoami"], env=env)
    assert res.code == 1 and "not logged in" in res.stderr and "E201" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.startswith("error")]) == 1

    res = ato(["login", "--token", "wrong", "--json"], env=env)
    assert res.code == 1 and "rejected the session token" in res.stderr
    assert not (isolated_home / ".ato" / "credentials.json").exists()

    res = ato(["login"], env=env, input_text="")  # no TTY, no token
    assert res.code == 1 and "not a terminal" in res.stderr

    res = ato(["login", "--token", ALICE, "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "login")
    assert doc["handle"] == "alice" and doc["api_url"] == store.url
    cred = isolated_home / ".ato" / "credentials.json"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert json.loads(cred.read_text())["token"] == ALICE

    res = ato(["whoami", "--json"], env=env)
    assert res.code == 0, res.stderr
    assert res.json() == {"schema_version": "1", "handle": "alice", "api_url": store.url,
                          "token_source": "credentials"}
    # ATO_TOKEN always wins over the stored session
    res = ato(["whoami"], env={**env, "ATO_TOKEN": "bogus"})
    assert res.code == 1 and "rejected" in res.stderr

    res = ato(["logout", "--json"], env=env)
    assert res.code == 0 and res.json()["removed"] is True
    assert not cred.exists()
    assert ato(["whoami"], env=env).code == 1
    res = ato(["whoami", "--json"], env={**env, "ATO_TOKEN": ALICE})
    assert res.code == 0 and res.json()["token_source"] == "env"


def test_login_against_unreachable_store_is_one_line(ato, tmp_path: Path) -> None:
    res = ato(["login", "--token", ALICE], env={"ATO_STORE_API_URL": "http://127.0.0.1:9"})
    assert res.code == 3 and "cannot reach" in res.stderr


def test_search_and_inspect_default_to_store_api_url(ato, store: Registry, tmp_path: Path) -> None:
    project = make_project(tmp_path / "req-app", "req-app", "0.1.0", description="needs things")
    with open(project / "capsule.toml", "a") as fh:
        fh.write('\n[targets.default.env]\nATO_ORCH_REQUIRED_ENVS = "API_TOKEN,REGION"\n')
    built = ato(["build", ".", "--json"], cwd=project)
    assert built.code == 0, built.stderr
    pub = ato(["publish", "--registry", store.url, "--artifact", built.json()["artifact"], "--scoped-id",
               "alice/req-app", "--json"], cwd=tmp_path, env={"ATO_TOKEN": TOKEN})
    assert pub.code == 0, pub.stderr
    env = store_env(store)

    res = ato(["search", "req", "--json"], env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "search")
    assert doc["registry"] == store.url and [c["scoped_id"] for c in doc["capsules"]] == ["alice/req-app"]

    local = ato(["inspect", "requirements", str(project), "--json"])
    remote = ato(["inspect", "requirements", "alice/req-app", "--json"], env=env)
    assert local.code == 0 and remote.code == 0, remote.stderr
    ldoc, rdoc = local.json(), remote.json()
    assert_schema(rdoc, "inspect-requirements")
    assert set(ldoc) == set(rdoc)
    assert rdoc["target"] == {"input": "alice/req-app", "kind": "remote",
                              "resolved": {"publisher": "alice", "slug": "req-app"}}
    assert rdoc["requirements"] == ldoc["requirements"]
    assert [i["key"] for i in rdoc["requirements"]["secrets"]] == ["API_TOKEN"]
    # explicit --registry works too, and an unknown capsule is the documented failure shape
    res = ato(["inspect", "requirements", "alice/nope", "--registry", store.url, "--json"])
    assert res.code == 1
    err = [d for d in res.stderr_json_lines() if "error" in d][-1]
    assert_schema(err, "inspect-requirements-error")
    assert err["error"]["code"] == "TARGET_NOT_FOUND"


def test_gen_ci_needs_a_capsule_toml_and_locks_from_the_index(ato, tmp_path: Path) -> None:
    """The install itself is proven in test_gen_ci.py; here: the refusal and the idempotent rewrite."""
    from tests.e2e.pyindex_support import SimpleIndex, listing_only

    res = ato(["gen-ci"], cwd=tmp_path)  # no capsule.toml here
    assert res.code == 1 and "capsule.toml not found" in res.stderr
    project = make_project(tmp_path / "ci-app", "ci-app")
    index = SimpleIndex(tmp_path, page=listing_only)
    try:
        res = ato(["gen-ci", "--index-url", index.url, "--python", "3.11", "--json"], cwd=project)
        assert res.code == 0, res.stderr
        doc = res.json()
        assert_schema(doc, "gen-ci")
        assert doc["state"] == "generated" and doc["python"] == "3.11" and doc["index_url"] == index.url
        path = project / ".github" / "workflows" / "ato-publish.yml"
        wf = yaml.safe_load(path.read_text())
        on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
        assert on["push"]["tags"] == ["v*.*.*"] and "workflow_dispatch" in on
        job = wf["jobs"]["publish"]
        assert job["runs-on"] == "ubuntu-latest"
        assert job["permissions"] == {"contents": "read", "id-token": "write"}
        steps = job["steps"]
        assert steps[0]["uses"] == "actions/checkout@v4"
        assert steps[1]["uses"] == "actions/setup-python@v5" and steps[1]["with"] == {"python-version": "3.11"}
        assert steps[-1]["run"] == "ato publish --ci"
        for step in steps:
            assert ("uses" in step) != ("run" in step)
        mtime = path.stat().st_mtime_ns
        again = ato(["gen-ci", "--index-url", index.url, "--python", "3.11", "--json"], cwd=project)
        assert again.code == 0 and again.json()["state"] == "unchanged"
        assert path.stat().st_mtime_ns == mtime
        changed = ato(["gen-ci", "--index-url", index.url, "--python", "3.12", "--json"], cwd=project)
        assert changed.code == 0 and changed.json()["state"] == "updated"
        for bad in (["--index-url", "ftp://x/simple"], ["--python", "3"]):
            res = ato(["gen-ci", *bad], cwd=project)
            assert res.code == 1 and "E100" in res.stderr and "must" in res.stderr, res.stderr
    finally:
        index.close()
    gone = ato(["gen-ci", "--index-url", index.url], cwd=project)  # the index is down
    assert gone.code == 3 and "network error" in gone.stderr


def test_interactive_login_on_a_tty(store: Registry, isolated_home: Path) -> None:
    import os
    import pty
    import select
    import subprocess
    import time

    from tests.conftest import cli_path

    leader, follower = pty.openpty()
    env = {**os.environ, **store_env(store)}
    proc = subprocess.Popen([cli_path("ato"), "login"], stdin=follower, stdout=follower, stderr=follower, env=env,
                            close_fds=True)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 30
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        if not sent and b"Token" in out:
            os.write(leader, ALICE.encode() + b"\n")
            sent = True
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=10)
    os.close(leader)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"Create a token at {store.url}/settings/tokens" in text and "Logged in as alice" in text
    assert ALICE not in text  # the token is not echoed
    assert json.loads((isolated_home / ".ato" / "credentials.json").read_text())["handle"] == "alice"
