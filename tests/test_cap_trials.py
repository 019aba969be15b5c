"""Safe trials: isolation from the host's home, secrets and files; timeouts; no remote execution."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import assert_schema
from test_cap_sample import base_manifest, make_package, url_manifest, write_manifest

from pipeline.cap.manifest import load
from pipeline.cap.trials import run_trials, trial_env

FAKE_KEY = "FAKE-PRIVATE-KEY-0xDEADBEEF"
SECRETS = {
    "OPENAI_API_KEY": "sk-fake-openai-1234567890",
    "ANTHROPIC_API_KEY": "sk-ant-fake-0987654321",
    "GITHUB_TOKEN": "ghp_fakegithubtoken000",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-key-xyz",
    "MY_SERVICE_PASSWORD": "hunter2-fake-password",
    "EXAMPLESERVICE_CREDENTIALS": "fake-credential-blob",
    "PLAIN_HOST_SETTING": "plain-host-value-not-allowlisted",
}

# A "safe" trial that is anything but: it hunts for the host's secrets and writes everywhere it can.
NOSY_SCRIPT = """#!/bin/sh
echo "home=$HOME"
echo "cap_home=$CAP_HOME"
echo "tmpdir=$TMPDIR"
echo "cap_review=$CAP_REVIEW"
cat "$HOME/.ssh/id_rsa" 2>/dev/null || echo "no-ssh-key"
env | sort
echo pwned > "$HOME/home-write.txt"
echo pwned > ./cwd-write.txt
echo pwned > "$TMPDIR/tmp-write.txt"
echo pwned > "$CAP_HOME/cap-write.txt"
echo pwned > bin/my-tool-rewritten
"""


def test_trial_sees_no_host_home_secret_env_or_files(tmp_path: Path, isolated_home: Path, cap) -> None:
    ssh = isolated_home / ".ssh"
    ssh.mkdir()
    (ssh / "id_rsa").write_text(FAKE_KEY)
    pkg = make_package(tmp_path / "pkg", script=NOSY_SCRIPT)
    write_manifest(pkg, base_manifest())
    before = sorted(p.relative_to(pkg) for p in pkg.rglob("*"))
    home_before = sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*"))

    res = cap(["review", "--run-trials", "--json"], cwd=pkg, env=SECRETS)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cap-review")
    trial = doc["trials"]["results"][0]
    assert trial["status"] == "passed"
    out = trial["stdout"]

    assert "no-ssh-key" in out and FAKE_KEY not in out
    for name, value in SECRETS.items():
        assert value not in out and f"{name}=" not in out
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines["cap_review"] == "1"
    trial_home = Path(lines["home"])
    assert trial_home != isolated_home and not str(trial_home).startswith(str(isolated_home))
    for key in ("cap_home", "tmpdir"):
        assert Path(lines[key]).parent == trial_home.parent
    # Only allowlisted host names plus the isolation variables reach the trial.
    env_names = {k for k in lines if k.isupper()}
    assert env_names <= {"PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "TZ",
                         "HOME", "CAP_HOME", "TMPDIR", "TMP", "TEMP", "CAP_REVIEW", "PWD", "SHLVL", "_",
                         "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "OLDPWD"}

    # Nothing the trial wrote reached the host, and its temp tree is gone.
    assert sorted(p.relative_to(pkg) for p in pkg.rglob("*")) == before
    assert sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*")) == home_before
    assert not trial_home.parent.exists()


def test_trial_env_is_built_from_an_allowlist(tmp_path: Path) -> None:
    host = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "TERM": "xterm", "HOME": "/home/real", **SECRETS,
            "SSH_AUTH_SOCK": "/tmp/agent.sock", "LC_ALL_TOKEN": "sneaky"}
    env = trial_env(tmp_path, host)
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C.UTF-8"
    assert env["HOME"] == str(tmp_path / "home") and env["CAP_REVIEW"] == "1"
    assert env["TMPDIR"] == str(tmp_path / "tmp") and env["CAP_HOME"] == str(tmp_path / "cap-home")
    assert not set(SECRETS) & set(env)
    assert "SSH_AUTH_SOCK" not in env and "LC_ALL_TOKEN" not in env


def test_a_hanging_trial_is_killed_with_its_children(tmp_path: Path) -> None:
    late = tmp_path / "late-write"
    script = f"#!/bin/sh\n(sleep 0.6; echo late > '{late}') &\nexec sleep 30\n"
    pkg = make_package(tmp_path / "pkg", script=script)
    m = load(write_manifest(pkg, base_manifest()))
    started = time.monotonic()
    [result] = run_trials(m, timeout=0.3)
    assert time.monotonic() - started < 5
    assert result.status == "failed" and result.exit_code is None
    assert result.reason == "timed out after 0.3s"
    time.sleep(0.8)
    assert not late.exists(), "the trial's background child survived the timeout"


def test_single_file_url_trials_are_never_downloaded_or_run(tmp_path: Path, cap) -> None:
    pkg = make_package(tmp_path / "pkg")
    write_manifest(pkg, url_manifest())
    res = cap(["review", "--run-trials", "--json"], cwd=pkg)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cap-review")
    [trial] = doc["trials"]["results"]
    assert trial["status"] == "skipped" and trial["exit_code"] is None
    assert "not downloaded or executed" in trial["reason"]
    assert {c["id"]: c["status"] for c in doc["checks"]}["trials.run"] == "skip"


def test_trial_output_is_kept_to_a_tail(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg", script="#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' x\necho END\n")
    [result] = run_trials(load(write_manifest(pkg, base_manifest())), timeout=10)
    assert result.status == "passed"
    assert len(result.stdout) <= 4000 and result.stdout.endswith("END\n")
    json.dumps(result.to_json())
