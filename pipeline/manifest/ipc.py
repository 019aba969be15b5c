"""``[ipc]``: the services a capsule exports to other capsules and the ones it imports (IPC v1.1).

::

    [ipc.exports]
    name = "greeter"                     # the service's name (default: the capsule's name)
    [[ipc.exports.methods]]
    name = "greet"
    description = "Say hello"
    input_schema = "schemas/greet.in.json"    # JSON Schema files, relative to the capsule root
    output_schema = "schemas/greet.out.json"
    [ipc.exports.sharing]
    mode = "singleton"                   # singleton (shared) | exclusive (one per consumer) | daemon
    idle_timeout = 5                     # seconds a singleton outlives its last consumer

    [ipc.imports.greeter]                # the alias: CAPSULE_IPC_GREETER_* in the consumer's env
    from = "./greeter"                   # a path, an installed name, or publisher/slug
    activation = "eager"                 # eager (before the consumer starts) | lazy
    optional = false

Upstream's keys (its "shape 1", the one its code and fixtures use); upstream ignores
``protocol``, ``transport``, ``required`` and ``[[…capabilities]]``, and so does this reader.
:func:`check_ipc` reports upstream's codes, each a :class:`Finding` with a severity, so ``ato
validate``, ``ato build`` and ``ato run`` refuse the same manifests for the same reasons:

=======  =====  ==================================================================================
IPC-001  error  conflicting exports: a ``[lifecycle]`` capsule with non-default sharing, a method
                exported twice, or a sharing value that is not one of the modes
IPC-002  error  a reserved name (``_ipc_*``, ``_setup*``, ``_main*``) as a service, export, import
                alias or method
IPC-003  error  circular imports (followed through the providers' own manifests on disk)
IPC-004  error  an import alias that is also a ``[services]``/``[tasks]`` name (one DAG node each)
IPC-005  warn   a method whose description says it is remote (remote methods are not brokered)
IPC-006  error  an import whose provider is not found (a warning when ``optional``, or when it is a
                ``publisher/slug`` that ``ato run`` installs from the registry)
IPC-007  warn   an export with a name but no methods
IPC-008  error  an input/output schema that is missing, not JSON, or not a valid JSON Schema
=======  =====  ==================================================================================
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import AtoError

SHARING_MODES = ("singleton", "exclusive", "daemon")
ACTIVATIONS = ("eager", "lazy")
DEFAULT_MODE = "singleton"
DEFAULT_IDLE_TIMEOUT = 300  # upstream's default; a shorter one is usual for capsules that start fast
RESERVED_PREFIXES = ("_ipc_", "_setup", "_main")
ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
METHOD = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,127}$")
SCOPED = re.compile(r"^@?([a-z0-9][a-z0-9._-]*)/([a-z0-9][a-z0-9._-]*)(?::|@)?([^/\s]*)$", re.IGNORECASE)
MAX_IMPORT_DEPTH = 32


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # error | warning
    message: str
    location: str
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message, "location": self.location,
                "hint": self.hint}

    def line(self) -> str:
        return f"[{self.code}] {self.message} (at {self.location})"


@dataclass(frozen=True)
class Method:
    name: str
    description: str = ""
    input_schema: str | None = None
    output_schema: str | None = None


@dataclass(frozen=True)
class Sharing:
    mode: str = DEFAULT_MODE
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT
    max_clients: int = 0

    @property
    def is_default(self) -> bool:
        return self == Sharing()


@dataclass(frozen=True)
class IpcExport:
    name: str | None
    methods: tuple[Method, ...] = ()
    sharing: Sharing = field(default_factory=Sharing)

    def method(self, name: str) -> Method | None:
        return next((m for m in self.methods if m.name == name), None)


@dataclass(frozen=True)
class IpcImport:
    alias: str
    source: str  # upstream's `from`
    activation: str = "eager"
    optional: bool = False

    @property
    def env_prefix(self) -> str:
        """``CAPSULE_IPC_<ALIAS>_``: the alias upper-cased, ``-`` -> ``_``."""
        return "CAPSULE_IPC_" + self.alias.upper().replace("-", "_") + "_"

    def is_path(self) -> bool:
        return self.source.startswith(("./", "../", "/", "~")) or self.source in (".", "..")


@dataclass(frozen=True)
class IpcDecl:
    export: IpcExport | None = None
    imports: dict[str, IpcImport] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.export is None and not self.imports


def _int(value: Any, default: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def read_ipc(doc: dict[str, Any], findings: list[Finding]) -> IpcDecl:
    """The typed ``[ipc]`` of a manifest document; shape problems go into ``findings`` (never raised)."""
    raw = doc.get("ipc")
    if raw is None:
        return IpcDecl()
    if not isinstance(raw, dict):
        findings.append(Finding("IPC-001", "error", "[ipc] must be a table", "ipc"))
        return IpcDecl()
    export = _read_export(raw.get("exports"), findings)
    imports: dict[str, IpcImport] = {}
    table = raw.get("imports") or {}
    if not isinstance(table, dict):
        findings.append(Finding("IPC-006", "error", "[ipc.imports] must be a table of aliases", "ipc.imports"))
        table = {}
    for alias, spec in table.items():
        at = f"ipc.imports.{alias}"
        if not isinstance(spec, dict):
            findings.append(Finding("IPC-006", "error", "an import must be a table with `from`", at))
            continue
        source = spec.get("from")
        if not isinstance(source, str) or not source.strip():
            findings.append(Finding("IPC-006", "error", "`from` must name the provider (a path, an installed name "
                                                        "or publisher/slug)", f"{at}.from"))
            continue
        activation = spec.get("activation", "eager")
        if activation not in ACTIVATIONS:
            findings.append(Finding("IPC-006", "error", f"activation must be eager or lazy, not {activation!r}",
                                    f"{at}.activation"))
            activation = "eager"
        optional = spec.get("optional", False)
        if not isinstance(optional, bool):
            findings.append(Finding("IPC-006", "error", "optional must be true or false", f"{at}.optional"))
            optional = False
        if not ALIAS.match(alias):
            findings.append(Finding("IPC-006", "error", f"alias {alias!r} must be letters, digits, '-' or '_' (it "
                                                        "becomes an environment variable name)", at))
            continue
        imports[alias] = IpcImport(alias, source.strip(), activation, optional)
    return IpcDecl(export, imports)


def _read_export(raw: Any, findings: list[Finding]) -> IpcExport | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        findings.append(Finding("IPC-001", "error", "[ipc.exports] must be a table", "ipc.exports"))
        return None
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        findings.append(Finding("IPC-001", "error", "exports.name must be a non-empty string", "ipc.exports.name"))
        name = None
    methods: list[Method] = []
    seen: set[str] = set()
    raw_methods = raw.get("methods") or []
    if not isinstance(raw_methods, list):
        findings.append(Finding("IPC-001", "error", "methods must be an array of tables ([[ipc.exports.methods]])",
                                "ipc.exports.methods"))
        raw_methods = []
    for i, m in enumerate(raw_methods):
        at = f"ipc.exports.methods[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not METHOD.match(m["name"]):
            findings.append(Finding("IPC-001", "error", "a method needs a name of letters, digits, '_', '.', '/' "
                                                        "or '-'", at))
            continue
        if m["name"] in seen:
            findings.append(Finding("IPC-001", "error", f"method {m['name']!r} is exported twice", at,
                                    "give each method one [[ipc.exports.methods]] entry"))
            continue
        seen.add(m["name"])
        schemas = []
        for key in ("input_schema", "output_schema"):
            value = m.get(key)
            if value is not None and not (isinstance(value, str) and value.strip()):
                findings.append(Finding("IPC-008", "error", f"{key} must be a path to a JSON Schema file",
                                        f"{at}.{key}"))
                value = None
            schemas.append(value)
        description = m.get("description", "")
        methods.append(Method(m["name"], description if isinstance(description, str) else "", *schemas))
    sharing = Sharing()
    raw_sharing = raw.get("sharing")
    if raw_sharing is not None:
        if not isinstance(raw_sharing, dict):
            findings.append(Finding("IPC-001", "error", "[ipc.exports.sharing] must be a table",
                                    "ipc.exports.sharing"))
        else:
            mode = raw_sharing.get("mode", DEFAULT_MODE)
            idle = _int(raw_sharing.get("idle_timeout"), DEFAULT_IDLE_TIMEOUT)
            clients = _int(raw_sharing.get("max_clients"), 0)
            if mode not in SHARING_MODES:
                findings.append(Finding("IPC-001", "error", f"sharing.mode {mode!r} is not one of "
                                                            f"{', '.join(SHARING_MODES)}", "ipc.exports.sharing.mode"))
            if idle is None:
                findings.append(Finding("IPC-001", "error", "sharing.idle_timeout must be a whole number of seconds "
                                                            "(\"5m\" is not accepted)",
                                        "ipc.exports.sharing.idle_timeout"))
            if clients is None:
                findings.append(Finding("IPC-001", "error", "sharing.max_clients must be a whole number",
                                        "ipc.exports.sharing.max_clients"))
            # an invalid value still counts as "not the default" for the [lifecycle] conflict below
            sharing = Sharing(str(mode), idle if idle is not None else -1, clients if clients is not None else -1)
    return IpcExport(name.strip() if isinstance(name, str) else None, tuple(methods), sharing)


# ------------------------------------------------------------------ the checks


def findings_error(findings: list[Finding], file: str) -> AtoError | None:
    """The first IPC error as an AtoError (its code is the finding's), every finding in the details."""
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return None
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return AtoError(first.code, f"{file}: {first.line()}{more}", hint=first.hint,
                    details={"file": file, "findings": [f.to_json() for f in findings]})


def check_document(doc: dict[str, Any], project_dir: Path, file: str, *,
                   store_dir: Path | None = None) -> list[Finding]:
    """Read and check a manifest's ``[ipc]``: raise the first IPC error, return the warnings.

    One entry point for ``ato validate``, ``ato build`` and ``ato run``, so all three refuse
    the same manifests with the same codes.
    """
    if "ipc" not in doc:
        return []
    findings: list[Finding] = []
    decl = read_ipc(doc, findings)
    check_ipc(doc, decl, project_dir, findings, store_dir=store_dir)
    err = findings_error(findings, file)
    if err is not None:
        raise err
    return [f for f in findings if f.severity != "error"]




def _reserved(name: str) -> bool:
    return name.startswith(RESERVED_PREFIXES)


def check_ipc(doc: dict[str, Any], decl: IpcDecl, project_dir: Path, findings: list[Finding], *,
              store_dir: Path | None = None) -> None:
    """Upstream's checks IPC-001..008 (see the module doc), appended to ``findings``."""
    export = decl.export
    services = doc.get("services") if isinstance(doc.get("services"), dict) else {}
    tasks = doc.get("tasks") if isinstance(doc.get("tasks"), dict) else {}
    if export is not None and "lifecycle" in doc and not export.sharing.is_default:
        findings.append(Finding("IPC-001", "error", "a [lifecycle] capsule runs one main process and cannot also "
                                                    "export a service with non-default sharing", "ipc.exports.sharing",
                                "declare the service under [services] instead of [lifecycle], or drop the sharing"))
    for name in services:
        if _reserved(name):
            findings.append(Finding("IPC-002", "error", f"service name {name!r} is reserved", f"services.{name}",
                                    f"names starting with {', '.join(RESERVED_PREFIXES)} are ato's own DAG nodes"))
    if export is not None:
        if export.name and _reserved(export.name):
            findings.append(Finding("IPC-002", "error", f"export name {export.name!r} is reserved", "ipc.exports.name"))
        for i, m in enumerate(export.methods):
            if _reserved(m.name):
                findings.append(Finding("IPC-002", "error", f"method name {m.name!r} is reserved",
                                        f"ipc.exports.methods[{i}].name"))
            if "remote" in m.description.lower():
                findings.append(Finding("IPC-005", "warning", f"method {m.name!r} is described as remote; ato "
                                                              "brokers local (Unix socket) calls only",
                                        f"ipc.exports.methods[{i}].description"))
            for key in ("input_schema", "output_schema"):
                rel = getattr(m, key)
                if rel is not None:
                    problem = schema_problem(project_dir, rel)
                    if problem:
                        findings.append(Finding("IPC-008", "error", f"{key} {rel!r} of method {m.name!r}: {problem}",
                                                f"ipc.exports.methods[{i}].{key}"))
        if export.name and not export.methods:
            findings.append(Finding("IPC-007", "warning", f"export {export.name!r} has no methods",
                                    "ipc.exports.methods"))
    for alias, imp in decl.imports.items():
        at = f"ipc.imports.{alias}"
        if _reserved(alias):
            findings.append(Finding("IPC-002", "error", f"import alias {alias!r} is reserved", at))
        if alias in services or alias in tasks:
            findings.append(Finding("IPC-004", "error", f"import alias {alias!r} is also a "
                                                        f"{'service' if alias in services else 'task'} name: two DAG "
                                                        "nodes with one name", at, "rename the alias"))
        where = provider_path(imp, project_dir, store_dir)
        if where is None or not where.exists():
            registry = not imp.is_path() and SCOPED.match(imp.source) is not None
            severity = "warning" if imp.optional or registry else "error"
            what = "is not installed; `ato run` installs it from the registry" if registry else "is not found"
            findings.append(Finding("IPC-006", severity, f"provider {imp.source!r} {what}"
                                                         + (f" ({where})" if where is not None else ""), f"{at}.from",
                                    None if registry else f"Run: ato install {imp.source}" if not imp.is_path()
                                    else "check the path (relative paths are relative to this capsule)"))
    cycle = import_cycle(project_dir, store_dir)
    if cycle:
        findings.append(Finding("IPC-003", "error", "circular imports: " + " -> ".join(cycle), "ipc.imports",
                                "a provider cannot (even indirectly) import its consumer"))


def schema_problem(project_dir: Path, rel: str) -> str | None:
    """Why a method's schema file is unusable (None when it is a valid JSON Schema inside the capsule)."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    path = (project_dir / rel).resolve()
    root = project_dir.resolve()
    if root not in path.parents:
        return "must be a path inside the capsule"
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return "the file does not exist"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read ({exc})"
    except ValueError as exc:
        return f"is not JSON ({exc})"
    except RecursionError:
        return "is nested too deeply to read"
    if not isinstance(doc, dict | bool):
        return "is not a JSON Schema (an object or a boolean)"
    try:
        validator_for(doc).check_schema(doc)
    except SchemaError as exc:
        return f"is not a valid JSON Schema ({exc.message})"
    return None


def provider_path(imp: IpcImport, project_dir: Path, store_dir: Path | None) -> Path | None:
    """Where an import's provider is on disk: a path (relative to the capsule), or its store directory."""
    source = imp.source
    if imp.is_path():
        return (project_dir / Path(source).expanduser()).resolve() if not source.startswith("~") \
            else Path(source).expanduser().resolve()
    if store_dir is None:
        return None
    m = SCOPED.match(source)
    if m:
        return store_dir / m.group(1).lower() / m.group(2).lower()
    return store_dir / source


def _imports_of(manifest_dir: Path) -> dict[str, IpcImport]:
    try:
        doc = tomllib.loads((manifest_dir / "capsule.toml").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    return read_ipc(doc, []).imports


def import_cycle(project_dir: Path, store_dir: Path | None) -> list[str] | None:
    """A chain of imports that comes back to a capsule already on it (``a -> b -> a``), following the
    manifests of providers that are directories on disk."""
    start = project_dir.resolve()
    stack: list[tuple[Path, list[str], list[Path]]] = [(start, [start.name], [start])]
    while stack:
        here, chain, seen = stack.pop()
        if len(seen) > MAX_IMPORT_DEPTH:
            continue
        for _alias, imp in sorted(_imports_of(here).items()):
            where = provider_path(imp, here, store_dir)
            if where is None or not where.is_dir():
                continue
            where = where.resolve()
            if where in seen:
                return [*chain, where.name]
            stack.append((where, [*chain, where.name], [*seen, where]))
    return None
