"""``ato run --skill <name>`` / ``--from-skill <SKILL.md>``: a SKILL.md turned into a runnable capsule.

The frontmatter (``name``, ``version``, ``driver``, ``entrypoint``, ``permissions``)
and the body's first fenced code block become a small capsule in a temp dir,
which then runs through the normal path — consent, sandbox and all.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import tomli_w

from pipeline import paths
from pipeline.errors import AtoError, Problem

SKILL_NOT_FOUND = "ATO_ERR_SKILL_NOT_FOUND"
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LANGS = {"js": ("node", "main.js"), "javascript": ("node", "main.js"), "node": ("node", "main.js"),
         "ts": ("deno", "main.ts"), "typescript": ("deno", "main.ts"),
         "py": ("python", "main.py"), "python": ("python", "main.py"),
         "sh": ("native", "main.sh"), "bash": ("native", "main.sh"), "shell": ("native", "main.sh")}


def search_paths(name: str, cwd: Path) -> list[Path]:
    return [cwd / ".agents" / "skills" / name / "SKILL.md", cwd / ".mcp" / "skills" / name / "SKILL.md",
            paths.home() / ".config" / "agents" / "skills" / name / "SKILL.md"]


def find_skill(name: str, cwd: Path) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise AtoError("E100", f"invalid skill name {name!r}")
    places = search_paths(name, cwd)
    for place in places:
        if place.is_file():
            return place
    message = f"skill '{name}' was not found (searched: {', '.join(str(p) for p in places)})"
    raise AtoError(SKILL_NOT_FOUND, message, details={"skill": name},
                   problems=[Problem(SKILL_NOT_FOUND, message, {"skill": name})])


def _frontmatter(text: str) -> tuple[dict[str, str], str]:
    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    meta: dict[str, str] = {}
    for line in text[3:end].splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            key, _, value = line.partition(":")
            meta[key.strip()] = value.strip().strip('"').strip("'")
    return meta, text[end + 4:]


def materialize(skill_md: Path) -> Path:
    """Write the capsule for ``skill_md`` into a fresh temp dir and return that dir."""
    if not skill_md.is_file():
        message = f"skill file {skill_md} does not exist"
        raise AtoError(SKILL_NOT_FOUND, message, details={"skill": str(skill_md)},
                       problems=[Problem(SKILL_NOT_FOUND, message, {"skill": str(skill_md)})])
    meta, body = _frontmatter(skill_md.read_text("utf-8"))
    match = FENCE.search(body)
    if not match:
        raise AtoError("E101", f"{skill_md}: no fenced code block to run")
    lang = (match.group(1) or meta.get("driver") or "sh").lower()
    driver, filename = LANGS.get(lang, ("native", "main.sh"))
    if meta.get("driver") in ("node", "deno", "python", "native"):
        driver = meta["driver"]
    name = re.sub(r"[^a-z0-9-]+", "-", (meta.get("name") or "skill-imported-capsule").lower()).strip("-")
    name = (name or "skill-imported-capsule")[:64].ljust(3, "x")
    out = Path(tempfile.mkdtemp(prefix="ato-skill-"))
    (out / filename).write_text(match.group(2), "utf-8")
    if filename.endswith(".sh"):
        (out / filename).chmod(0o755)
    target = {"runtime": "source", "driver": driver, "entrypoint": filename}
    doc = {"schema_version": "0.2", "name": name, "version": meta.get("version") or "0.1.0", "type": "tool",
           "default_target": "cli", "targets": {"cli": target}}
    (out / "capsule.toml").write_text(tomli_w.dumps(doc), "utf-8")
    if driver in ("node", "deno"):
        (out / "capsule.lock").write_text('version = "1"\n', "utf-8")
        (out / "package-lock.json").write_text('{"lockfileVersion": 3, "packages": {}}\n', "utf-8")
    if driver == "python":
        (out / "uv.lock").write_text('version = 1\nrequires-python = ">=3.8"\n', "utf-8")
    return out
