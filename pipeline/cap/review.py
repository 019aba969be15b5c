"""Review: the blocking checks and warnings of seed 002, each with a stable id.

Blocking checks stop publish; warnings lower a package's quality for autonomous
agents but do not block. Every check reports pass, fail or skip (skip when
another check already reports the underlying problem, so one defect fails one
check). Failure messages are the seed's troubleshooting texts, so the fix is
findable from the message.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cap.bins import SHA256_HEX, bin_file, package_digest, path_problem
from pipeline.cap.manifest import BACKEND_LOCAL, BACKEND_URL, BACKENDS, CapManifest, normalize, shape_problems
from pipeline.cap.skills import skill_problem
from pipeline.cap.trials import TrialResult, run_trials
from pipeline.errors import E_POLICY, AtoError

ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
# Semantic Versioning 2.0.0 (semver.org), without a leading "v".
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                       r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
                       r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
SNAKE_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
SUMMARY_MAX = 200

# Blocking checks in report order: id -> what passing means.
BLOCKING: dict[str, str] = {
    "manifest.shape": "Manifest matches the cap-manifest.v0 shape",
    "package.id": 'Package id looks like "namespace/name"',
    "package.version": "Package version is a semantic version (MAJOR.MINOR.PATCH)",
    "package.summary": "Package declares a short one-line summary",
    "package.tasks": "Capability card declares at least one task",
    "install.backend": "Install metadata uses local-bin or single-file-url",
    "install.bins": "Package declares at least one command or bin",
    "trials.present": "Package declares at least one safe trial",
    "trials.bins": "Safe trials start with one of the package's declared bins",
    "bins.paths": "Declared local bin paths exist inside the package",
    "source.pin": "single-file-url source pins url and sha256",
    "mcp.tools": "MCP tool names use lower snake case",
    "skill.files": "Declared skill files exist with name and description frontmatter",
    "package.digest": "Executable package has a digest",
    "trials.run": "Safe trials ran in isolation, wrote only what they declare, and exited 0",
}

# Warnings: id -> message (present only when the warning applies).
WARNINGS: dict[str, str] = {
    "skill.missing": "No skill declared",
    "mcp.missing": "No MCP tools declared",
    "output.structured": "No structured output declaration",
    "pricing.unenforced": "Pricing metadata present but not enforced locally",
    "trials.unsandboxed": "Safe trials ran without the bubblewrap sandbox (bwrap missing or unusable): undeclared "
                          "writes to their private HOME, CAP_HOME and package copy were still caught, but the host "
                          "filesystem and network were not shielded",
}


@dataclass
class Check:
    """One blocking check's outcome: status pass, fail or skip, with every problem found."""

    id: str
    status: str
    message: str
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "severity": "blocking", "status": self.status,
                "message": self.message, "problems": self.problems}


@dataclass
class Review:
    """All checks, the warnings that apply, and trial results when trials ran."""

    checks: list[Check]
    warnings: list[str]
    trials: list[TrialResult] | None = None

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def error(self) -> AtoError:
        """The failure publish (and review) report: the first failing check's own message."""
        failures = self.failures
        more = f"{len(failures)} blocking checks failed; see `cap review`" if len(failures) > 1 else None
        return AtoError(E_POLICY, failures[0].message, hint=more,
                        details={"failed": [c.id for c in failures],
                                 "problems": [p for c in failures for p in c.problems]})

    def warnings_json(self) -> list[dict[str, str]]:
        return [{"id": w, "severity": "warning", "message": WARNINGS[w]} for w in self.warnings]

    def record(self) -> dict[str, Any]:
        """The review record a compiled package carries into the registry."""
        return {
            "status": "passed" if self.passed else "failed",
            "checks": {c.id: c.status for c in self.checks},
            "warnings": list(self.warnings),
            "trials": "not-run" if self.trials is None
            else "failed" if any(t.status == "failed" for t in self.trials) else "passed",
        }


# A check function returns the problems it found, or a string: the reason it was skipped.
CheckFn = Callable[[CapManifest], "list[str] | str"]


def _id(m: CapManifest) -> list[str] | str:
    return [] if ID_RE.match(m.id) else ['Package id must look like "namespace/name"']


def _version(m: CapManifest) -> list[str] | str:
    if SEMVER_RE.match(m.version):
        return []
    return [f'Package version must be a semantic version like 1.0.0 (MAJOR.MINOR.PATCH), not "{m.version}"']


def _summary(m: CapManifest) -> list[str] | str:
    s = m.summary.strip()
    if s and "\n" not in s and len(s) <= SUMMARY_MAX:
        return []
    return [f"Package summary must be a short one-line description (1-{SUMMARY_MAX} characters)"]


def _tasks(m: CapManifest) -> list[str] | str:
    return [] if m.tasks else ["Capability card must declare at least one task"]


def _backend(m: CapManifest) -> list[str] | str:
    if m.backend in BACKENDS:
        return []
    return [f'Install backend must be "{BACKEND_LOCAL}" or "{BACKEND_URL}", not "{m.backend}"']


def _bins(m: CapManifest) -> list[str] | str:
    problems = [] if m.bins else ["Package must declare at least one command or bin"]
    return problems + [f'Bin "{n}" is declared with two different paths' for n in m.bin_conflicts]


def _trials_present(m: CapManifest) -> list[str] | str:
    return [] if m.trials else ["Package must declare at least one safe trial"]


def _trial_bins(m: CapManifest) -> list[str] | str:
    if not m.trials or not m.bins:
        return "no trials or no bins to compare"
    declared = ", ".join(sorted(m.bins))
    problems = []
    for t in m.trials:
        try:
            first = shlex.split(t.command)[:1]
        except ValueError:
            first = []
        if first == [] or first[0] not in m.bins:
            problems.append(f'Safe trial "{t.command}" must start with one of this package\'s '
                            f"declared bins: {declared}")
    return problems


def _bin_paths(m: CapManifest) -> list[str] | str:
    if m.backend != BACKEND_LOCAL:
        return f"not a {BACKEND_LOCAL} package"
    return [p for name in m.bins if (p := path_problem(m, name))]


def _source_pin(m: CapManifest) -> list[str] | str:
    if m.backend != BACKEND_URL:
        return f"not a {BACKEND_URL} package"
    problems = []
    if not (m.source_url or "").startswith("https://"):
        problems.append(f"{BACKEND_URL} packages must pin an https install.source.url")
    if not SHA256_HEX.match(m.source_sha256 or ""):
        problems.append(f"{BACKEND_URL} packages must pin install.source.sha256")
    return problems


def _mcp_tools(m: CapManifest) -> list[str] | str:
    return [f'MCP tool names must use lower snake case: "{t}"' for t in m.mcp_tools if not SNAKE_RE.match(t)]


def _skills(m: CapManifest) -> list[str] | str:
    if not m.skills:
        return "no skill declared (see warning skill.missing)"
    return [p for rel in m.skills if (p := skill_problem(m.source_dir / rel, rel))]


def _digest(m: CapManifest) -> list[str] | str:
    if not m.bins:
        return "not an executable package"
    if m.backend == BACKEND_URL and not SHA256_HEX.match(m.source_sha256 or ""):
        return "the artifact pin is reported by source.pin"
    if m.backend == BACKEND_LOCAL and any(path_problem(m, n) for n in m.bins):
        return "missing bins are reported by bins.paths"
    if m.backend not in BACKENDS:
        return "unknown backend is reported by install.backend"
    if package_digest(m):
        return []
    odd = [m.bins[n] for n in m.bins if not bin_file(m, n).is_file()]
    return [f"Executable packages must have a digest: {p} is not a readable regular file" for p in odd] or \
        ["Executable packages must have a digest: a bin file could not be read"]


STATIC_CHECKS: dict[str, CheckFn] = {
    "package.id": _id,
    "package.version": _version,
    "package.summary": _summary,
    "package.tasks": _tasks,
    "install.backend": _backend,
    "install.bins": _bins,
    "trials.present": _trials_present,
    "trials.bins": _trial_bins,
    "bins.paths": _bin_paths,
    "source.pin": _source_pin,
    "mcp.tools": _mcp_tools,
    "skill.files": _skills,
    "package.digest": _digest,
}


def _outcome(check_id: str, result: list[str] | str) -> Check:
    if isinstance(result, str):
        return Check(check_id, "skip", f"skipped: {result}")
    if result:
        return Check(check_id, "fail", result[0], result)
    return Check(check_id, "pass", BLOCKING[check_id])


def _trials_check(trials: list[TrialResult] | None) -> Check:
    if trials is None:
        return Check("trials.run", "skip", "skipped: not requested (pass --run-trials)")
    failed = [f'Safe trial "{t.command}" failed: {t.reason}' for t in trials if t.status == "failed"]
    ran = [t for t in trials if t.status == "passed"]
    if failed:
        return Check("trials.run", "fail", failed[0], failed)
    if not ran:
        return Check("trials.run", "skip", "skipped: no trial could run locally")
    how = "in the bubblewrap sandbox" if all(t.sandbox == "bubblewrap" for t in ran) else "in isolation (no sandbox)"
    return Check("trials.run", "pass", f"{len(ran)} safe trial(s) ran {how}, wrote only what they declare, "
                                        "and exited 0")


def warnings_for(m: CapManifest) -> list[str]:
    found = {
        "skill.missing": not m.skills,
        "mcp.missing": not m.mcp_tools,
        "output.structured": m.structured_output is not True,
        "pricing.unenforced": m.has_pricing,
        "trials.unsandboxed": False,  # added by review() when trials ran without the sandbox
    }
    return [w for w in WARNINGS if found[w]]


def review(m: CapManifest, trials: list[TrialResult] | None = None) -> Review:
    """Every check against a normalized manifest (``trials``: results of --run-trials, if run)."""
    checks = [Check("manifest.shape", "pass", BLOCKING["manifest.shape"])]
    checks += [_outcome(cid, fn(m)) for cid, fn in STATIC_CHECKS.items()]
    checks.append(_trials_check(trials))
    warnings = warnings_for(m)
    if any(t.sandbox == "none" for t in trials or []):
        warnings.append("trials.unsandboxed")
    return Review(checks, warnings, trials)


def shape_failure(problems: list[str]) -> Review:
    """The review of a manifest whose shape is wrong: nothing else can be judged."""
    checks = [Check("manifest.shape", "fail", f"Manifest shape is invalid: {problems[0]}", problems)]
    checks += [Check(cid, "skip", "skipped: manifest shape is invalid")
               for cid in BLOCKING if cid != "manifest.shape"]
    return Review(checks, [])


def review_document(path: Path, doc: dict[str, Any],
                    trial_timeout: float | None = None) -> tuple[Review, CapManifest | None]:
    """Review a raw manifest document: shape first, then every check; trials when a timeout is given."""
    problems = shape_problems(doc)
    if problems:
        return shape_failure(problems), None
    m = normalize(path, doc)
    return review(m, run_trials(m, trial_timeout) if trial_timeout is not None else None), m
