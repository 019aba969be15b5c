"""Fail-closed checks that run before anything starts: flags, required env, lockfiles, consent.

Each failure is an AtoError carrying one ``ATO_ERR_*`` JSONL problem per unmet
requirement, so automation sees every missing key at once, and nothing has been
spawned when it is raised.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cas.canonical import jcs_digest
from pipeline import paths
from pipeline.errors import AtoError, Problem
from pipeline.runtime.router import Route
from stages.project_lock import find_lockfile

MISSING_ENV = "ATO_ERR_MISSING_REQUIRED_ENV"
POLICY = "ATO_ERR_POLICY_VIOLATION"
CONSENT = "ATO_ERR_CONSENT_REQUIRED"
LOCK_INCOMPLETE = "ATO_ERR_PROVISIONING_LOCK_INCOMPLETE"
CAPSULE_LOCKS = ("capsule.lock", "capsule.lock.json")


def fail(code: str, message: str, **details: Any) -> AtoError:
    return AtoError(code, message, details=details, problems=[Problem(code, message, dict(details))])


# ------------------------------------------------------------------ flags


def check_dangerous_flag(requested: bool) -> None:
    """``--dangerously-skip-permissions`` needs CAPSULE_ALLOW_UNSAFE=1 exactly."""
    if requested and os.environ.get("CAPSULE_ALLOW_UNSAFE") != "1":
        raise fail(POLICY, "--dangerously-skip-permissions requires CAPSULE_ALLOW_UNSAFE=1",
                   flag="--dangerously-skip-permissions", env="CAPSULE_ALLOW_UNSAFE")


# ------------------------------------------------------------------ required env


def required_env_problems(route: Route, env_sources: list[dict[str, str]]) -> list[Problem]:
    """One problem per required key that is missing or blank in every source."""
    problems = []
    for key in route.target.required_env:
        value = next((src[key] for src in env_sources if (src.get(key) or "").strip()), None)
        if value is None:
            problems.append(Problem(MISSING_ENV,
                                    f"missing required environment variable '{key}' for target '{route.label}' "
                                    "(set it before `ato run`)", {"key": key, "target": route.label}))
    return problems


def check_required_env(route: Route, env_sources: list[dict[str, str]]) -> None:
    problems = required_env_problems(route, env_sources)
    if problems:
        keys = [p.details["key"] for p in problems]
        raise AtoError(MISSING_ENV, f"missing required environment variables for target '{route.label}': "
                                    f"{', '.join(keys)} (set them before `ato run`)",
                       details={"missing_keys": keys, "target": route.label}, problems=problems)


# ------------------------------------------------------------------ lockfiles


def required_lockfiles(route: Route) -> list[tuple[str, tuple[str, ...]]]:
    """(what, accepted file names) pairs the route needs, per seed 000's tier list."""
    driver = route.driver
    if route.runtime not in ("source", "web"):
        return []
    if driver == "node":
        return [("capsule.lock", CAPSULE_LOCKS), ("package-lock.json", ("package-lock.json",))]
    if driver == "deno":
        return [("capsule.lock", CAPSULE_LOCKS), ("deno.lock or package-lock.json", ("deno.lock",
                                                                                     "package-lock.json"))]
    if driver == "python":
        return [("uv.lock", ("uv.lock",))]
    return []


def check_lockfiles(route: Route, project_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    problems = []
    for what, names in required_lockfiles(route):
        path = find_lockfile(project_dir, names, route.target.working_dir)
        if path is None:
            problems.append(Problem(LOCK_INCOMPLETE, f"{what} is required for {route.pair} execution",
                                    {"lockfile": names[0], "accepted": list(names), "target": route.label,
                                     "driver": route.driver}))
        else:
            found[what] = path
    if problems:
        raise AtoError(LOCK_INCOMPLETE, "; ".join(p.message for p in problems),
                       details={"missing": [p.details["lockfile"] for p in problems]}, problems=problems,
                       hint="commit the lockfiles next to capsule.toml")
    return found


# ------------------------------------------------------------------ consent


@dataclass
class Plan:
    """What a run is allowed to do; consent is given to exactly this (by its hash)."""

    capsule: str
    version: str
    target: str
    runtime: str
    driver: str
    tier: int | None
    permissions: dict[str, Any] = field(default_factory=dict)

    def is_zero_permission(self) -> bool:
        return not any(self.permissions.values())

    def policy_hash(self) -> str:
        return jcs_digest({"runtime": self.runtime, "driver": self.driver, "tier": self.tier,
                           "permissions": self.permissions})

    def summary_lines(self) -> list[str]:
        p = self.permissions
        lines = [f"Capsule      : {self.capsule}@{self.version}",
                 f"Target       : {self.target} (runtime={self.runtime}, driver={self.driver or '-'}, "
                 f"tier={self.tier if self.tier is not None else 'container'})"]
        for key, title in (("host_execution", "Host exec"), ("network", "Network"), ("listen", "Listen"),
                           ("read_write", "Read Write"), ("secrets", "Secrets"), ("install", "Install"),
                           ("dangerous", "Dangerous")):
            value = p.get(key)
            if value:
                lines.append(f"{title:<13}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
        lines.append(f"Policy Hash  : {self.policy_hash()}")
        return lines


def _consent_records() -> list[dict[str, Any]]:
    path = paths.consent_path()
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _key(plan: Plan) -> dict[str, str]:
    return {"capsule": plan.capsule, "version": plan.version, "target_label": plan.target,
            "policy_hash": plan.policy_hash()}


def has_consent(plan: Plan) -> bool:
    key = _key(plan)
    return any(all(rec.get(k) == v for k, v in key.items()) for rec in _consent_records())


def record_consent(plan: Plan, how: str) -> None:
    path = paths.consent_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    line = json.dumps({**_key(plan), "approved_by": how,
                       "approved_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def ensure_consent(plan: Plan, *, yes: bool, prompt: Any = None) -> str:
    """Approve ``plan`` or fail closed. Returns how: ``none-needed``, ``recorded``, ``--yes`` or ``prompt``."""
    if plan.is_zero_permission():
        return "none-needed"
    if has_consent(plan):
        return "recorded"
    if yes:
        record_consent(plan, "--yes")
        return "--yes"
    if not interactive():
        raise fail(CONSENT, "this run needs consent and the session is not interactive; re-run with -y/--yes to "
                            "approve it", capsule=plan.capsule, target=plan.target,
                   permissions=plan.permissions, policy_hash=plan.policy_hash())
    approved = prompt(plan) if prompt is not None else False
    if not approved:
        raise fail(CONSENT, "execution plan was not approved", capsule=plan.capsule, target=plan.target)
    record_consent(plan, "prompt")
    return "prompt"
