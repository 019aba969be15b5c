"""Safe trials: isolation from the host's home, secrets and files; declared writes only (in the bubblewrap
sandbox, and without it); timeouts; no remote execution."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import assert_schema
from test_cap_sample import base_manifest, make_package, url_manifest, write_manifest

from pipeline.cap import trials as trials_mod
from pipeline.cap.manifest import load
from pipeline.cap.review import review
from pipeline.cap.trials import run_trials, sandbox_engine, trial_env

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

# A "safe" trial that is anything but: it hunts for the host's secrets (by $HOME and by the host's
# absolute home path) and prints its whole environment.
NOSY_SCRIPT = """#!/bin/sh
echo "home=$HOME"
echo "cap_home=$CAP_HOME"
echo "tmpdir=$TMPDIR"
echo "cap_review=$CAP_REVIEW"
cat "$HOME/.ssh/id_rsa" 2>/dev/null || echo "no-ssh-key"
cat "{host_home}/.ssh/id_rsa" 2>/dev/null || echo "no-host-ssh-key"
env | sort
"""

# ...and one that writes everywhere it can: declared, scratch, undeclared and the host.
WRITER_SCRIPT = """#!/bin/sh
mkdir -p "$HOME/.config/my-tool" && echo ok > "$HOME/.config/my-tool/settings.json"
echo ok > "$TMPDIR/scratch.txt"
echo pwned > "$HOME/home-write.txt"
echo pwned > ./cwd-write.txt
echo pwned > "$CAP_HOME/cap-write.txt"
echo pwned > bin/my-tool-rewritten
echo pwned > "{host_file}"
exit 0
"""

SANDBOXED = sandbox_engine() is not None
needs_sandbox = pytest.mark.skipif(not SANDBOXED and not os.environ.get("CI"),
                                   reason="bubblewrap cannot sandbox here (make system-deps installs bwrap)")


def test_trial_sees_no_host_home_secret_env_or_files(tmp_path: Path, isolated_home: Path, cap) -> None:
    ssh = isolated_home / ".ssh"
    ssh.mkdir()
    (ssh / "id_rsa").write_text(FAKE_KEY)
    pkg = make_package(tmp_path / "pkg", script=NOSY_SCRIPT.format(host_home=isolated_home))
    write_manifest(pkg, base_manifest())
    before = sorted(p.relative_to(pkg) for p in pkg.rglob("*"))
    home_before = sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*"))

    res = cap(["review", "--run-trials", "--json"], cwd=pkg, env=SECRETS)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert_schema(doc, "cap-review")
    trial = doc["trials"]["results"][0]
    assert trial["status"] == "passed" and trial["undeclared_writes"] == []
    out = trial["stdout"]

    assert "no-ssh-key" in out and FAKE_KEY not in out or not SANDBOXED
    if SANDBOXED:  # the host's real HOME is hidden, not only replaced in $HOME
        assert trial["sandbox"] == "bubblewrap" and "no-host-ssh-key" in out and FAKE_KEY not in out
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
                         "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "OLDPWD",
                         "PYTHONDONTWRITEBYTECODE"}

    # Nothing reached the host, and the trial's temp tree is gone.
    assert sorted(p.relative_to(pkg) for p in pkg.rglob("*")) == before
    assert sorted(p.relative_to(isolated_home) for p in isolated_home.rglob("*")) == home_before
    assert not trial_home.parent.exists()


def writer(tmp_path: Path, host_file: Path, **trial: object):
    pkg = make_package(tmp_path / "pkg", script=WRITER_SCRIPT.format(host_file=host_file))
    trials = [{"command": "my-tool --help", "writes": ["~/.config/my-tool/settings.json"], "network": [], **trial}]
    return pkg, load(write_manifest(pkg, base_manifest(safeTrials=trials)))


def test_undeclared_writes_fail_the_trial_without_a_sandbox(tmp_path: Path, monkeypatch) -> None:
    """No bwrap: the trial's private dirs are writable, and every undeclared change there is named."""
    monkeypatch.setattr(trials_mod, "sandbox_engine", lambda: None)
    pkg, m = writer(tmp_path, tmp_path / "host-write.txt")
    [result] = run_trials(m, timeout=30)
    assert result.sandbox == "none" and result.status == "failed"
    assert result.undeclared_writes == ["$CAP_HOME/cap-write.txt", "./bin/my-tool-rewritten", "./cwd-write.txt",
                                        "~/home-write.txt"]
    assert result.reason.startswith("wrote outside its declared writes: $CAP_HOME/cap-write.txt")
    # declared (~/.config/my-tool/settings.json, and the dirs leading to it) and TMPDIR are not listed
    rv = review(m, [result])
    assert [c.id for c in rv.failures] == ["trials.run"] and "trials.unsandboxed" in rv.warnings
    assert not (pkg / "cwd-write.txt").exists()  # the package copy took it, not the package
    # the documented limit: without a sandbox a write by absolute path reaches the host
    assert (tmp_path / "host-write.txt").exists()


@needs_sandbox
def test_in_the_sandbox_undeclared_writes_fail_and_the_host_is_read_only(tmp_path: Path) -> None:
    host_file = Path.home() / "host-write.txt"  # the host's HOME is hidden: the write lands nowhere
    pkg, m = writer(tmp_path, host_file)
    [result] = run_trials(m, timeout=30)
    assert result.sandbox == "bubblewrap" and result.status == "failed"
    assert result.undeclared_writes == ["$CAP_HOME/cap-write.txt", "./bin/my-tool-rewritten", "./cwd-write.txt",
                                        "~/home-write.txt"]
    assert not host_file.exists() and not (pkg / "cwd-write.txt").exists()
    # the package source outside the trial's copy is read-only too
    touch = "#!/bin/sh\necho pwned > \"{}\" && exit 0\nexit 7\n".format(tmp_path / "pkg2" / "sneaky.txt")
    pkg2 = make_package(tmp_path / "pkg2", script=touch)
    [blocked] = run_trials(load(write_manifest(pkg2, base_manifest())), timeout=30)
    assert not (pkg2 / "sneaky.txt").exists()
    assert blocked.status == "failed" and blocked.exit_code == 7
    # declared exactly what it writes: passes
    ok_script = "#!/bin/sh\nmkdir -p \"$HOME/.config/my-tool\" && echo ok > \"$HOME/.config/my-tool/settings.json\"\n" \
                "echo scratch > \"$TMPDIR/x\"\nexit 0\n"
    pkg3 = make_package(tmp_path / "pkg3", script=ok_script)
    m3 = load(write_manifest(pkg3, base_manifest(safeTrials=[
        {"command": "my-tool --help", "writes": ["~/.config/my-tool"], "network": []}])))
    [good] = run_trials(m3, timeout=30)
    assert good.status == "passed" and good.sandbox == "bubblewrap", good.stderr
    rv = review(m3, [good])
    assert rv.passed and "trials.unsandboxed" not in rv.warnings
    assert "ran in the bubblewrap sandbox" in next(c for c in rv.checks if c.id == "trials.run").message


def test_a_write_next_to_a_declared_file_is_caught(tmp_path: Path) -> None:
    script = "#!/bin/sh\nmkdir -p \"$HOME/.config/my-tool\"\necho x > \"$HOME/.config/my-tool/settings.json\"\n" \
             "echo sneaky > \"$HOME/.config/my-tool/other.txt\"\n"
    pkg = make_package(tmp_path / "pkg", script=script)
    m = load(write_manifest(pkg, base_manifest(safeTrials=[
        {"command": "my-tool --help", "writes": ["~/.config/my-tool/settings.json"], "network": []}])))
    [result] = run_trials(m, timeout=30)
    assert result.status == "failed" and result.undeclared_writes == ["~/.config/my-tool/other.txt"]


@pytest.mark.parametrize("declared", ["/etc/passwd", "../outside", "~/../../etc"])
def test_writes_that_cannot_be_granted_fail_the_trial(tmp_path: Path, declared: str) -> None:
    pkg = make_package(tmp_path / "pkg")
    m = load(write_manifest(pkg, base_manifest(safeTrials=[
        {"command": "my-tool --help", "writes": [declared], "network": []}])))
    [result] = run_trials(m, timeout=30)
    assert result.status == "failed" and declared in result.reason


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
