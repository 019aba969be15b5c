"""Skill files: SKILL.md with a YAML-ish frontmatter block naming the skill.

Agents pick skills by their ``name`` and ``description`` frontmatter, so review
requires both. Only the flat subset skills use is parsed (``key: value`` plus
``|``/``>`` block scalars); a full YAML parser would be a new dependency for
two strings.
"""

from __future__ import annotations

from pathlib import Path

SKILL_FILE = "SKILL.md"
# Where `cap init` looks for skills, relative to the package directory.
SKILL_GLOBS = ("SKILL.md", "skills/*/SKILL.md", ".claude/skills/*/SKILL.md")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_frontmatter(text: str) -> dict[str, str] | None:
    """Top-level ``key: value`` pairs between the leading ``---`` fences, or None without a block."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return None
    out: dict[str, str] = {}
    body = lines[1:end]
    i = 0
    while i < len(body):
        line = body[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#") or line[0].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        value = value.strip()
        if value[:1] in ("|", ">"):
            block: list[str] = []
            while i < len(body) and (not body[i].strip() or body[i][0].isspace()):
                block.append(body[i].strip())
                i += 1
            joiner = "\n" if value[0] == "|" else " "
            value = joiner.join(b for b in block if b)
        out[key.strip()] = _unquote(value)
    return out


def read_skill(path: Path) -> dict[str, str] | None:
    """Frontmatter of a skill file, or None when the file has none (or cannot be read as text)."""
    try:
        return parse_frontmatter(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def skill_problem(path: Path, rel: str) -> str | None:
    """Why ``rel`` is not a usable skill file, or None when it is."""
    if not path.is_file():
        return f"Declared skill file does not exist: {rel}"
    meta = read_skill(path) or {}
    if not meta.get("name") or not meta.get("description"):
        return f"Skill file {rel} must have name and description frontmatter"
    return None


def find_skills(package_dir: Path) -> list[str]:
    """Skill files near a package, as sorted POSIX paths relative to it."""
    found = {p.relative_to(package_dir).as_posix()
             for pattern in SKILL_GLOBS for p in package_dir.glob(pattern) if p.is_file()}
    return sorted(found)
