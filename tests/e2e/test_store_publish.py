"""Personal Dock publishing and `ato publish --ci` against `ato registry serve` acting as the Store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_schema
from tests.e2e.registry_support import TOKEN, Registry, make_project

ALICE = "alice-session-token"
OIDC = "oidc-token-for-acme-widgets"


@pytest.fixture
def store(tmp_path: Path):
    reg = Registry(tmp_path / "store-data", token=TOKEN,
                   extra_args=["--store-user", f"alice={ALICE}", "--store-user", "bob=bob-token",
                               "--ci-oidc-token", f"{OIDC}=Acme/widgets"])
    yield reg
    reg.stop()


def env_for(store: Registry) -> dict[str, str]:
    return {"ATO_STORE_API_URL": store.url, "ATO_STORE_SITE_URL": "http://127.0.0.1:1"}


def built(ato, tmp_path: Path, name: str, version: str = "0.1.0") -> tuple[Path, Path]:
    project = make_project(tmp_path / name, name, version)
    res = ato(["build", ".", "--json"], cwd=project)
    assert res.code == 0, res.stderr
    return project, Path(res.json()["artifact"])


def test_personal_dock_is_the_default_target_when_logged_in(ato, store: Registry, tmp_path: Path) -> None:
    env = env_for(store)
    project, artifact = built(ato, tmp_path, "dock-app")
    res = ato(["publish", "--artifact", str(artifact)], cwd=project, env=env)
    assert res.code == 1 and "No default publish target found. Run `ato login`" in res.stderr

    assert ato(["login", "--token", ALICE], env=env).code == 0
    res = ato(["publish", "--artifact", str(artifact), "--json"], cwd=project, env=env)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "publish")
    assert doc["route"] == "personal_dock" and doc["scoped_id"] == "alice/dock-app"
    assert doc["dock"] == {"handle": "alice", "url": "http://127.0.0.1:1/d/alice"}
    assert doc["registry"] == store.url
    dock = store.get("/d/alice").json()
    assert [c["scoped_id"] for c in dock["capsules"]] == ["alice/dock-app"]
    assert store.get("/d/bob").json()["capsules"] == []

    # an explicit --scoped-id must name the Dock's handle
    res = ato(["publish", "--artifact", str(artifact), "--scoped-id", "bob/dock-app"], cwd=project, env=env)
    assert res.code == 1 and "must match your Personal Dock handle 'alice'" in res.stderr
    # build + deploy from source, human output
    _p2, _a2 = built(ato, tmp_path, "dock-two")
    res = ato(["publish"], cwd=tmp_path / "dock-two", env=env)
    assert res.code == 0, res.stderr
    assert "Published alice/dock-two 0.1.0 to your Personal Dock" in res.stdout
    assert "Next step: ato install alice/dock-two" in res.stdout
    # installs from the Store by default
    inst = ato(["install", "alice/dock-two", "--allow-unsigned", "--yes", "--json"], env=env)
    assert inst.code == 0, inst.stderr


def test_dock_publish_with_a_stale_session_or_foreign_handle_fails(ato, store: Registry, tmp_path: Path) -> None:
    env = env_for(store)
    project, artifact = built(ato, tmp_path, "stale-app")
    res = ato(["publish", "--artifact", str(artifact)], cwd=project, env={**env, "ATO_TOKEN": "expired"})
    assert res.code == 1 and "rejected the session token" in res.stderr and "E201" in res.stderr
    # a Store user token cannot upload under somebody else's publisher
    res = ato(["publish", "--registry", store.url, "--artifact", str(artifact), "--scoped-id", "alice/stale-app"],
              cwd=project, env={"ATO_TOKEN": "bob-token"})
    assert res.code != 0 and "cannot publish as 'alice'" in res.stderr
    # ATO_TOKEN alone (no `ato login`) is a session too: its handle comes from the Store
    res = ato(["publish", "--artifact", str(artifact), "--dry-run", "--json"], cwd=project,
              env={**env, "ATO_TOKEN": "bob-token"})
    assert res.code == 0, res.stderr
    assert res.json()["route"] == "personal_dock" and res.json()["scoped_id"] == "bob/stale-app"
    res = ato(["publish", "--artifact", str(artifact), "--json"], cwd=project, env={**env, "ATO_TOKEN": "bob-token"})
    assert res.code == 0, res.stderr
    assert res.json()["publish"]["scoped_id"] == "bob/stale-app"


def ci_env(store: Registry, **extra: str) -> dict[str, str]:
    env = {"ATO_STORE_API_URL": store.url, "GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "Acme/widgets",
           "GITHUB_REF_TYPE": "tag", "GITHUB_REF_NAME": "v1.2.0", "ATO_OIDC_TOKEN": OIDC}
    env.update(extra)
    return env


def test_publish_ci_with_oidc(ato, store: Registry, tmp_path: Path) -> None:
    project = make_project(tmp_path / "widgets", "widgets", "1.2.0")
    res = ato(["publish", "--ci"], cwd=project, env={"ATO_STORE_API_URL": store.url})
    assert res.code == 1 and "runs only in GitHub Actions" in res.stderr
    res = ato(["publish", "--ci"], cwd=project, env=ci_env(store, ATO_OIDC_TOKEN=""))
    assert res.code == 1 and "id-token: write" in res.stderr
    res = ato(["publish", "--ci"], cwd=project, env=ci_env(store, GITHUB_REF_NAME="v9.9.9"))
    assert res.code == 1 and "expected ref v1.2.0" in res.stderr
    res = ato(["publish", "--ci"], cwd=project, env=ci_env(store, ATO_OIDC_TOKEN="forged"))
    assert res.code == 1 and "E201" in res.stderr
    res = ato(["publish", "--ci"], cwd=project, env=ci_env(store, GITHUB_REPOSITORY="evil/widgets"))
    assert res.code != 0 and "not 'evil/widgets'" in res.stderr
    res = ato(["publish", "--ci", "--deploy"], cwd=project, env=ci_env(store))
    assert res.code == 1 and "cannot be combined" in res.stderr

    res = ato(["publish", "--ci", "--json"], cwd=project, env=ci_env(store))
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "publish")
    assert doc["code"] == "CI_PUBLISHED" and doc["route"] == "ci" and doc["scoped_id"] == "acme/widgets"
    assert store.get("/v1/capsules/by/acme/widgets").json()["latest_version"] == "1.2.0"
    again = ato(["publish", "--ci"], cwd=project, env=ci_env(store))
    assert again.code == 1 and "E202" in again.stderr


def test_official_handoff_diagnoses_and_fix_writes_the_workflow(ato, tmp_path: Path) -> None:
    from tests.e2e.pyindex_support import SimpleIndex, listing_only

    index = SimpleIndex(tmp_path, page=listing_only)  # stands in for PyPI's simple API
    try:
        project = make_project(tmp_path / "official", "official-app", "2.0.0")
        no_net = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}
        res = ato(["publish", "--registry", "https://api.ato.run", "--json"], cwd=project, env=no_net)
        assert res.code == 1, res.stderr  # a failing diagnostic fails the command, after printing the hand-off
        assert res.json()["ok"] is False and res.stderr_json_lines()[-1]["error"]["code"] == "E230"
        h = res.json()["handoff"]
        assert h["network_requests"] == 0 and h["diagnosis"][0]["ok"] is False and h["fix"] is None
        assert h["next_steps"][0].startswith("ato publish --fix")
        text = ato(["publish", "--registry", "https://api.ato.run", "--no-tui"], cwd=project, env=no_net)
        assert text.code == 1 and "FAIL workflow_check" in text.stdout and "error[E230]" in text.stderr
        assert ato(["publish", "--no-tui", "--ci"], cwd=project).code == 1

        # --fix locks afresh from the default index ($PIP_INDEX_URL, else PyPI): one request per package
        env = {**no_net, "PIP_INDEX_URL": index.url}
        res = ato(["publish", "--registry", "https://api.ato.run", "--fix", "--json"], cwd=project, env=env)
        assert res.code == 0, res.stderr
        doc = res.json()
        assert_schema(doc, "publish")
        assert doc["ok"] is True
        h = doc["handoff"]
        assert h["fix"]["state"] == "generated" and h["diagnosis"][0]["ok"] is True
        wf = project / ".github" / "workflows" / "ato-publish.yml"
        assert h["network_requests"] == wf.read_text().count("==") > 10
        assert "--require-hashes" in wf.read_text() and index.url in wf.read_text()
        # a damaged workflow is repaired from its own pins, without the network
        wf.write_text(wf.read_text().replace("      id-token: write\n", ""))
        res = ato(["publish", "--registry", "https://api.ato.run", "--fix", "--json"], cwd=project, env=no_net)
        assert res.code == 0, res.stderr
        h = res.json()["handoff"]
        assert h["fix"]["state"] == "updated" and h["network_requests"] == 0 and h["diagnosis"][0]["ok"] is True
        res = ato(["publish", "--registry", "https://api.ato.run", "--fix", "--json"], cwd=project, env=no_net)
        assert res.json()["handoff"]["fix"] is None
    finally:
        index.close()
