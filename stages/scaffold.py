"""``ato init``: a first capsule.toml from what the project already says.

A project usually already names itself and its entry (package.json, pyproject.toml,
deno.json, a Makefile, an index.html); init copies those facts into a commented
capsule.toml of the canonical generation (schema 0.2) instead of asking for them
again, the way ``cap init`` does for capability.json. Detection, in this order:

- ``deno.json``/``deno.jsonc`` -> deno; ``package.json`` -> node (a ``bin`` makes it a tool);
- ``pyproject.toml``/``uv.lock``/``requirements.txt``/a top-level ``*.py`` -> python;
- a ``Makefile`` or top-level ``*.c`` -> native (built by ``[build.lifecycle].build``);
- an ``index.html`` at the root or in public/, dist/, build/, static/, site/, www/ -> static.

A template named with ``--template`` wins. When the entry file it needs does not exist,
a small hello-world starter is written (never over an existing file), so an empty
directory builds and runs at once too. Every rendered manifest is parsed and validated
before it is written: a template that does not validate is a bug (E999), not a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cas.atomic import write_bytes_atomic
from pipeline.errors import E_INTERNAL, E_MANIFEST_EXISTS, E_USAGE, AtoError
from pipeline.manifest import MANIFEST_NAME, parse_manifest

TEMPLATES = ("static", "node", "deno", "python", "native", "tool")
SCHEMA_URL = "https://ato.run/schemas/capsule-manifest.json"
DEFAULT_VERSION = "0.1.0"
DEFAULT_PORTS = {"static": 8080, "node": 3000, "deno": 8000, "python": 8000}
STATIC_DIRS = (".", "public", "dist", "build", "static", "site", "www")
NODE_ENTRIES = ("index.js", "main.js", "server.js", "app.js", "cli.js", "index.mjs", "main.mjs", "src/index.js",
                "src/main.js")
DENO_ENTRIES = ("main.ts", "mod.ts", "server.ts", "index.ts", "main.js")
PYTHON_ENTRIES = ("main.py", "app.py", "server.py", "__main__.py", "cli.py")
WEB_FRAMEWORKS = frozenset({"express", "fastify", "koa", "hono", "@hono/node-server", "http-server", "polka",
                            "restify", "@nestjs/core"})
SERVER_HINTS = re.compile(r"\.listen\(|createServer\(|Deno\.serve\(|http\.server|HTTPServer|Flask\(|FastAPI\(|"
                          r"uvicorn\.run\(")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_./+-]*)\s*:(?!=)(.*)$")


@dataclass
class Spec:
    """Everything the rendered capsule.toml says, plus the starter files it needs."""

    template: str
    name: str
    version: str
    type: str
    label: str
    runtime: str
    driver: str
    entrypoint: str
    port: int | None = None
    build_hook: str | None = None
    description: str | None = None
    pack_exclude: list[str] = field(default_factory=list)
    starters: dict[str, tuple[str, int]] = field(default_factory=dict)  # relpath -> (text, mode), only if missing
    evidence: list[str] = field(default_factory=list)  # the files that decided the template
    notes: list[str] = field(default_factory=list)  # what a person should know (engine, port)


@dataclass
class InitPlan:
    project_dir: Path
    spec: Spec
    manifest_text: str

    @property
    def manifest_path(self) -> Path:
        return self.project_dir / MANIFEST_NAME


# ---------------------------------------------------------------- small readers


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file ({} when absent); a broken one is an error, never silently ignored."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AtoError(E_USAGE, f"{path.name} is not valid JSON: {exc}", details={"file": str(path)}) from None
    return doc if isinstance(doc, dict) else {}


def _jsonc(path: Path) -> dict[str, Any]:
    """deno.jsonc: JSON with // and /* */ comments (outside strings) and trailing commas."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    text = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', lambda m: m.group(1) or "", text, flags=re.S)
    text = re.sub(r",(\s*[}\]])", r"\1", text)
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _pyproject(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AtoError(E_USAGE, f"{path.name} is not valid TOML: {exc}", details={"file": str(path)}) from None
    project = doc.get("project")
    return project if isinstance(project, dict) else {}


def _text(path: Path, limit: int = 200_000) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def sanitize_name(raw: str) -> str:
    """``@acme/My_Tool`` -> ``my-tool``: the manifest's kebab-case name (``my-capsule`` when nothing is left)."""
    base = raw.rsplit("/", 1)[-1].lower()
    out = re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:64].strip("-")
    return out if NAME_RE.match(out) else "my-capsule"


def _version(raw: Any) -> str:
    return raw if isinstance(raw, str) and SEMVER_RE.match(raw) else DEFAULT_VERSION


def _rel(value: str) -> str:
    text = value.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _first(project: Path, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if (project / n).is_file()), None)


# ---------------------------------------------------------------- detection


def detect(project: Path) -> tuple[str | None, list[str]]:
    """(template, the files that decided it); (None, []) when nothing is recognized."""
    for name in ("deno.json", "deno.jsonc"):
        if (project / name).is_file():
            return "deno", [name]
    if (project / "package.json").is_file():
        pkg = _json(project / "package.json")
        return ("tool" if pkg.get("bin") else "node"), ["package.json"]
    for name in ("pyproject.toml", "uv.lock", "requirements.txt"):
        if (project / name).is_file():
            return "python", [name]
    py = sorted(p.name for p in project.glob("*.py") if p.is_file())
    if py:
        return "python", py[:1]
    for name in ("Makefile", "makefile", "GNUmakefile"):
        if (project / name).is_file():
            return "native", [name]
    c_files = sorted(p.name for p in project.glob("*.c") if p.is_file())
    if c_files:
        return "native", c_files[:1]
    static = _static_dir(project)
    if static is not None:
        return "static", [f"{static}/index.html" if static != "." else "index.html"]
    return None, []


def _static_dir(project: Path) -> str | None:
    return next((d for d in STATIC_DIRS if (project / d / "index.html").is_file()), None)


def _language(project: Path) -> str | None:
    """The language of a tool project (a tool is a node, python, deno or native program)."""
    template, _evidence = detect(project)
    if template == "tool":
        return "node"
    if template in ("node", "python", "deno", "native"):
        return template
    if (project / "bin").is_dir():
        return "native"
    return None


# ---------------------------------------------------------------- per template


def _web_or_source(entry_text: str, port: int | None, template: str, hinted: bool) -> tuple[str, int | None]:
    if port is not None or hinted or SERVER_HINTS.search(entry_text):
        return "web", port or DEFAULT_PORTS[template]
    return "source", None


def _node(project: Path, name: str | None, port: int | None, tool: bool) -> Spec:
    pkg = _json(project / "package.json")
    evidence = ["package.json"] if pkg else []
    final = sanitize_name(name or str(pkg.get("name") or project.name))
    version = _version(pkg.get("version"))
    bin_field = pkg.get("bin")
    entry = None
    if isinstance(bin_field, str) and bin_field.strip():
        entry, tool = _rel(bin_field), True
    elif isinstance(bin_field, dict) and bin_field:
        own = bin_field.get(str(pkg.get("name") or "").rsplit("/", 1)[-1])
        pick = own if isinstance(own, str) else next((v for _k, v in sorted(bin_field.items())
                                                     if isinstance(v, str)), None)
        if pick:
            entry, tool = _rel(pick), True
    if entry is None and isinstance(pkg.get("main"), str) and pkg["main"].strip():
        entry = _rel(pkg["main"])
    start = (pkg.get("scripts") or {}).get("start") if isinstance(pkg.get("scripts"), dict) else None
    if entry is None and isinstance(start, str):
        match = re.match(r"^\s*node\s+(\S+\.[cm]?js)\b", start)
        entry = _rel(match.group(1)) if match else None
    entry = entry or _first(project, NODE_ENTRIES)
    starters: dict[str, tuple[str, int]] = {}
    if not pkg:
        fields: dict[str, Any] = {"name": final, "version": version, "private": True, "main": entry or "main.js"}
        if tool:
            fields["bin"] = {final: entry or "main.js"}
        starters["package.json"] = (json.dumps(fields, indent=2) + "\n", 0o644)
    if entry is None or not (project / entry).is_file():
        entry = entry or "main.js"
        shebang = "#!/usr/bin/env node\n" if tool else ""
        starters[entry] = (shebang + f"console.log(`hello from {final}`, ...process.argv.slice(2));\n",
                           0o755 if tool else 0o644)
    deps = {**(pkg.get("dependencies") or {})} if isinstance(pkg.get("dependencies"), dict) else {}
    runtime, the_port = ("source", port) if tool else _web_or_source(
        _text(project / entry), port, "node", bool(WEB_FRAMEWORKS & set(deps)))
    spec = Spec("tool" if tool else "node", final, version, "tool" if tool else "app",
                "cli" if tool else ("web" if runtime == "web" else "app"), runtime, "node", entry, the_port,
                description=pkg.get("description") if isinstance(pkg.get("description"), str) else None,
                starters=starters, evidence=evidence)
    if runtime == "web":
        spec.notes.append(f"the app must listen on the port in $PORT ({the_port})")
    return spec


def _deno(project: Path, name: str | None, port: int | None, tool: bool) -> Spec:
    conf_name = next((n for n in ("deno.json", "deno.jsonc") if (project / n).is_file()), None)
    conf = _jsonc(project / conf_name) if conf_name else {}
    final = sanitize_name(name or str(conf.get("name") or project.name))
    version = _version(conf.get("version"))
    entry = None
    tasks = conf.get("tasks") if isinstance(conf.get("tasks"), dict) else {}
    for task in ("start", "dev"):
        cmd = tasks.get(task)
        match = re.search(r"\bdeno\s+(?:run|serve)\b[^\n]*?\s([^\s-][^\s]*\.[jt]sx?)\b", cmd or "") \
            if isinstance(cmd, str) else None
        if match:
            entry = _rel(match.group(1))
            break
    if entry is None and isinstance(conf.get("exports"), str):
        entry = _rel(conf["exports"])
    entry = entry or _first(project, DENO_ENTRIES)
    starters: dict[str, tuple[str, int]] = {}
    if conf_name is None:
        starters["deno.json"] = (json.dumps({"name": final, "version": version, "exports": f"./{entry or 'main.ts'}"},
                                            indent=2) + "\n", 0o644)
    if entry is None or not (project / entry).is_file():
        entry = entry or "main.ts"
        starters[entry] = (f"console.log(`hello from {final}`, ...Deno.args);\n", 0o644)
    runtime, the_port = ("source", port) if tool else _web_or_source(_text(project / entry), port, "deno", False)
    spec = Spec("tool" if tool else "deno", final, version, "tool" if tool else "app",
                "cli" if tool else ("web" if runtime == "web" else "app"), runtime, "deno", entry, the_port,
                starters=starters, evidence=[conf_name] if conf_name else [])
    if runtime == "web":
        spec.notes.append(f"the app must listen on the port in $PORT ({the_port})")
    return spec


def _python(project: Path, name: str | None, port: int | None, tool: bool) -> Spec:
    meta = _pyproject(project / "pyproject.toml")
    evidence = [n for n in ("pyproject.toml", "uv.lock") if (project / n).is_file()]
    final = sanitize_name(name or str(meta.get("name") or project.name))
    version = _version(meta.get("version"))
    entry = _first(project, PYTHON_ENTRIES)
    if entry is None:
        py = sorted(p.name for p in project.glob("*.py") if p.is_file())
        entry = py[0] if len(py) == 1 else None
    starters: dict[str, tuple[str, int]] = {}
    if not (project / "pyproject.toml").is_file():
        major, minor = sys.version_info[:2]
        starters["pyproject.toml"] = (f'[project]\nname = {json.dumps(final)}\nversion = {json.dumps(version)}\n'
                                      f'requires-python = ">={major}.{minor}"\ndependencies = []\n', 0o644)
        if (project / "requirements.txt").is_file():
            evidence.append("requirements.txt")
    if entry is None:
        entry = "main.py"
        starters[entry] = ("import sys\n\n" f'print("hello from {final}", *sys.argv[1:])\n', 0o644)
    runtime, the_port = ("source", port) if tool else _web_or_source(_text(project / entry), port, "python", False)
    spec = Spec("tool" if tool else "python", final, version, "tool" if tool else "app",
                "cli" if tool else ("web" if runtime == "web" else "app"), runtime, "python", entry, the_port,
                description=meta.get("description") if isinstance(meta.get("description"), str) else None,
                starters=starters, evidence=evidence)
    spec.notes.append("python runs in the sandbox (Tier 2): register the bundled engine once with "
                      "`ato engine register`")
    if (project / "requirements.txt").is_file() and "pyproject.toml" in starters:
        spec.notes.append("requirements.txt is not read: list the dependencies in pyproject.toml, then `ato lock`")
    if runtime == "web":
        spec.notes.append(f"the app must listen on the port in $PORT ({the_port})")
    return spec


def _make_binary(makefile: Path) -> str | None:
    """The program a Makefile builds by default: its first rule (or the first prerequisite of ``all``)."""
    for line in _text(makefile).splitlines():
        if line.startswith(("\t", " ", "#", ".")) or "=" in line.split(":", 1)[0]:
            continue
        match = MAKE_TARGET.match(line)
        if not match:
            continue
        target = match.group(1)
        if target in ("all", "default"):
            prereqs = match.group(2).split("#", 1)[0].split()
            return _rel(prereqs[0]) if prereqs and "$" not in prereqs[0] else None
        if "$" in target or "%" in target:
            continue
        return _rel(target)
    return None


def _native(project: Path, name: str | None, tool: bool) -> Spec:
    final = sanitize_name(name or project.name)
    makefile = next((project / n for n in ("Makefile", "makefile", "GNUmakefile") if (project / n).is_file()), None)
    c_files = sorted(p.name for p in project.glob("*.c") if p.is_file())
    starters: dict[str, tuple[str, int]] = {}
    evidence = [makefile.name] if makefile else c_files[:1]
    script = None
    if tool and makefile is None and not c_files and (project / "bin").is_dir():
        script = next((f"bin/{p.name}" for p in sorted((project / "bin").iterdir())
                       if p.is_file() and p.stat().st_mode & 0o111), None)
    if script is not None:
        spec = Spec("tool", final, DEFAULT_VERSION, "tool", "cli", "source", "native", script, evidence=[script])
    else:
        if makefile is not None:
            binary = _make_binary(makefile) or final
            hook = "make"
        elif c_files:
            binary = Path(c_files[0]).stem if len(c_files) == 1 else final
            hook = f"cc -O2 -o {binary} {' '.join(c_files)}"
        else:
            binary, hook = final, "make"
            starters["main.c"] = ('#include <stdio.h>\n\nint main(int argc, char **argv) {\n'
                                  f'    printf("hello from {final}");\n'
                                  '    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);\n'
                                  '    printf("\\n");\n    return 0;\n}\n', 0o644)
            starters["Makefile"] = (f"{binary}: main.c\n\t$(CC) -O2 -o {binary} main.c\n\n"
                                    f"clean:\n\trm -f {binary}\n\n.PHONY: clean\n", 0o644)
        spec = Spec("tool" if tool else "native", final, DEFAULT_VERSION, "tool" if tool else "app",
                    "cli" if tool else "app", "source", "native", binary, build_hook=hook,
                    pack_exclude=["**/*.o"], starters=starters, evidence=evidence)
    spec.notes.append("native programs run in the sandbox (Tier 2): register the bundled engine once with "
                      "`ato engine register`")
    return spec


def _static(project: Path, name: str | None, port: int | None) -> Spec:
    directory = _static_dir(project)
    starters: dict[str, tuple[str, int]] = {}
    final = sanitize_name(name or project.name)
    if directory is None:
        directory = "public"
        starters["public/index.html"] = (f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>{final}</title>\n"
                                         f"<h1>hello from {final}</h1>\n", 0o644)
    the_port = port or DEFAULT_PORTS["static"]
    return Spec("static", final, DEFAULT_VERSION, "app", "site", "web", "static", directory, the_port,
                starters=starters, evidence=[f"{directory}/index.html" if directory != "." else "index.html"]
                if not starters else [],
                notes=[f"served on http://127.0.0.1:{the_port}/ (change port in capsule.toml)"])


def plan_spec(project: Path, template: str | None, name: str | None, port: int | None) -> Spec:
    if template is not None and template not in TEMPLATES:
        raise AtoError(E_USAGE, f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")
    detected, evidence = detect(project)
    chosen = template or detected
    if chosen is None:
        if not project.exists():
            raise AtoError(E_USAGE, f"{project} does not exist, so there is no project to detect",
                           hint=f"create it with a starter: ato init {project} --template {'|'.join(TEMPLATES)}")
        raise AtoError(E_USAGE, f"cannot tell what kind of project {project} is (no package.json, pyproject.toml, "
                                "deno.json, Makefile, *.c or index.html)",
                       hint=f"pass --template {'|'.join(TEMPLATES)}")
    if chosen == "tool":
        language = _language(project) or "node"
        spec = {"node": lambda: _node(project, name, None, True), "deno": lambda: _deno(project, name, None, True),
                "python": lambda: _python(project, name, None, True),
                "native": lambda: _native(project, name, True)}[language]()
    elif chosen == "node":
        spec = _node(project, name, port, False)
    elif chosen == "deno":
        spec = _deno(project, name, port, False)
    elif chosen == "python":
        spec = _python(project, name, port, False)
    elif chosen == "native":
        spec = _native(project, name, False)
    else:
        spec = _static(project, name, port)
    if not spec.evidence and template is None:
        spec.evidence = evidence
    return spec


# ---------------------------------------------------------------- rendering


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value)


def _lines(rows: list[tuple[str, str]]) -> list[str]:
    """``key = value`` lines with their comments aligned."""
    width = max((len(code) for code, note in rows if note), default=0)
    return [f"{code:<{width}}  # {note}" if note else code for code, note in rows]


DRIVER_NOTES = {
    "static": "serves the entrypoint directory over HTTP (Tier 1, no lockfile needed)",
    "node": "runs the entrypoint as Node code under Deno's permissions (Tier 1; needs package-lock.json)",
    "deno": "runs `deno run <entrypoint>` under Deno's permissions (Tier 1; needs deno.lock)",
    "python": "runs under the sandbox in a uv environment from uv.lock (Tier 2)",
    "native": "runs the program under the sandbox (Tier 2)",
}


def render_manifest(spec: Spec, evidence_note: str) -> str:
    head = [
        "# capsule.toml: how `ato build` packages this project and how `ato run` starts it.",
        f"# Written by `ato init`{evidence_note}. Edit freely, then run `ato lock`.",
        '# Reference: the "Writing capsule.toml" section of the ato README;',
        f"# JSON Schema: {SCHEMA_URL}",
        "",
    ]
    top = [
        ('schema_version = "0.2"', "the manifest generation: [targets.<label>] + default_target"),
        (f"name = {_q(spec.name)}", "lowercase kebab-case; the slug it is published under"),
        (f"version = {_q(spec.version)}", "semver; bump it for every publish"),
        (f"type = {_q(spec.type)}", "app | tool (a command: `ato install --bin` puts it on PATH)"),
        (f"default_target = {_q(spec.label)}", "the [targets.<label>] that `ato run` starts"),
    ]
    out = head + _lines(top)
    if spec.description:
        out += ["", "[metadata]", f"description = {_q(spec.description)}"]
    if spec.build_hook:
        out += ["", "[build.lifecycle]"]
        out += _lines([(f"build = {_q(spec.build_hook)}",
                        "`ato build` runs this first, so the payload holds what it built")])
    target = [(f"runtime = {_q(spec.runtime)}", "source (a process) | web (serves HTTP on port) | oci | wasm"),
              (f"driver = {_q(spec.driver)}", DRIVER_NOTES[spec.driver]),
              (f"entrypoint = {_q(spec.entrypoint)}",
               "the directory to serve" if spec.driver == "static" else "what runs, relative to this file")]
    if spec.port is not None:
        target.append((f"port = {spec.port}", "`ato run` passes it to the app as $PORT"))
    out += ["", f"[targets.{spec.label}]", *_lines(target)]
    if spec.driver in ("node", "deno", "python"):
        out.append(f'# runtime_version = "..."  # pin the {spec.driver} version the host must have')
    out.append('# required_env = ["API_TOKEN"]  # variables `ato run` refuses to start without')
    out += ["", "[pack]"]
    excludes = ", ".join(_q(p) for p in spec.pack_exclude)
    out += _lines([('# include = ["src/**", "package.json"]', "a strict allowlist (default: every file not excluded)"),
                   (f"exclude = [{excludes}]", "more globs to leave out; .git, node_modules, .venv, .env* and keys "
                                               "always are")])
    return "\n".join(out) + "\n"


def plan_init(project_dir: Path, *, template: str | None = None, name: str | None = None,
              port: int | None = None) -> InitPlan:
    """Detect, fill in and render; nothing is written."""
    project = project_dir.absolute()
    if port is not None and not 0 < port < 65536:
        raise AtoError(E_USAGE, f"--port must be between 1 and 65535, got {port}")
    spec = plan_spec(project, template, name, port)
    note = f" from {', '.join(spec.evidence)}" if spec.evidence else f" (template {spec.template})"
    text = render_manifest(spec, note)
    try:
        parse_manifest(text, project / MANIFEST_NAME)
    except AtoError as exc:
        raise AtoError(E_INTERNAL, f"ato init rendered an invalid capsule.toml: {exc.message}") from None
    return InitPlan(project, spec, text)


# ---------------------------------------------------------------- writing

@dataclass
class Written:
    """What :func:`write_init` put on disk, so a later failure can take exactly that back."""

    created: list[Path] = field(default_factory=list)
    replaced: tuple[Path, bytes] | None = None  # capsule.toml overwritten with --force: its old bytes

    def rollback(self) -> None:
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        if self.replaced is not None:
            write_bytes_atomic(self.replaced[0], self.replaced[1])


def write_init(plan: InitPlan, *, force: bool = False) -> Written:
    """Write the starter files that are missing, then capsule.toml (refused over an existing one without force)."""
    target = plan.manifest_path
    old = None
    if os.path.lexists(target):
        if not force:
            raise AtoError(E_MANIFEST_EXISTS, f"{target} already exists", details={"path": str(target)},
                           hint="pass --force to overwrite it, or edit it by hand")
        if target.is_symlink() or not target.is_file():
            raise AtoError(E_MANIFEST_EXISTS, f"{target} is not a regular file; refusing to replace it",
                           details={"path": str(target)})
        old = target.read_bytes()
    written = Written()
    try:
        if not plan.project_dir.is_dir():
            _mkdirs(plan.project_dir, written.created)
        for rel, (text, mode) in sorted(plan.spec.starters.items()):
            path = plan.project_dir / rel
            if os.path.lexists(path):
                continue
            _mkdirs(path.parent, written.created)
            if write_bytes_atomic(path, text.encode("utf-8"), mode=mode, no_clobber=True):
                written.created.append(path)
        write_bytes_atomic(target, plan.manifest_text.encode("utf-8"))
        if old is None:
            written.created.append(target)
        else:
            written.replaced = (target, old)
    except BaseException:
        written.rollback()
        raise
    return written


def _mkdirs(path: Path, created: list[Path]) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
