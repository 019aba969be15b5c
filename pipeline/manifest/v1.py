"""The v1 authoring reader: ``schema_version = "1"`` -> the 0.2 form (one target, ``app``).

v1 says what runs as argv (``[run] command``), where it listens (``[web] port/bind``),
how to build (``[[build.steps]]``), what to serve (``[outputs.static_web]``) and what
to pack (``[source] root/ignore``). The translation:

- ``[run] command`` -> ``entrypoint`` = argv[0], ``cmd`` = the rest, runtime ``source``,
  driver from the program (node/npm/npx -> node, python/python3/uv -> python,
  deno -> deno, otherwise native); ``[tools]`` pins become ``runtime_version``
  (the driver's own tool) and ``runtime_tools``;
- ``[web]`` -> ``port`` + ``bind`` and an HTTP readiness probe on ``/``;
- ``[outputs.static_web]`` -> runtime ``web``, driver ``static`` serving ``root``
  (on ``[web] port``, else 8080); ``[run]`` is then not executed;
- ``[env]`` -> target env (a secret-looking name is refused: use ``[config]``);
  ``[config.<NAME>]`` -> ``config_schema`` and, when required, ``required_env``;
- ``[state.<name>]`` -> persistent filesystem state (mount/access/schema kept);
- ``[source] ignore`` (a gitignore subset) -> ``[pack] exclude``; a ``root`` other
  than ``.`` packs only that directory and runs there.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.manifest import relpath
from pipeline.manifest.keypath import fail, quote
from pipeline.manifest.origins import Origins

SCHEMA = "capsule-manifest-1"
LABEL = "app"
STATIC_DEFAULT_PORT = 8080
_DRIVERS = {"node": "node", "nodejs": "node", "npm": "node", "npx": "node", "python": "python",
            "python3": "python", "uv": "python", "uvx": "python", "deno": "deno"}
_TOOL_OF = {"node": ("node", "nodejs"), "python": ("python", "python3"), "deno": ("deno",)}
_MAX_PATTERNS, _MAX_PATTERN, _MAX_TOTAL = 256, 1024, 64 * 1024
_TRANSLATED = ("schema_version", "name", "version", "source", "metadata", "tools", "build", "run", "web", "env",
               "config", "state", "outputs")


def translate(raw: dict[str, Any], file: str, warnings: list[str], *,
              is_secret: Any) -> tuple[dict[str, Any], Origins]:
    """The 0.2-form document of a (structurally valid) v1 ``raw``, and where each key came from."""
    origins = Origins()
    at = ("targets", LABEL)
    for key in ("name", "version"):
        if not raw[key].strip():
            raise fail(file, [key], "expected a non-blank string")
    doc: dict[str, Any] = {"schema_version": "0.2", "name": raw["name"], "version": raw["version"], "type": "app",
                           "default_target": LABEL}
    target: dict[str, Any] = {}
    argv = list(raw["run"]["command"])
    if not argv[0].strip():
        raise fail(file, ["run", "command", 0], "expected a program name, got a blank string")
    for i, arg in enumerate(argv):
        if "\0" in arg:
            raise fail(file, ["run", "command", i], "must not contain a NUL character")
    root = _source_root(raw, file)
    static = (raw.get("outputs") or {}).get("static_web")
    web = raw.get("web")
    tools = dict(raw.get("tools") or {})
    if static is not None:
        target.update(runtime="web", driver="static", entrypoint=_join(root, _rel(static["root"], file,
                                                                                 ["outputs", "static_web", "root"])))
        origins.add(at + ("entrypoint",), ("outputs", "static_web", "root"))
        target["port"] = web["port"] if web else STATIC_DEFAULT_PORT
        extra = {k: static[k] for k in ("entry_path", "spa_fallback", "connect_src") if k in static}
        if "entry_path" in extra:
            _rel(extra["entry_path"], file, ["outputs", "static_web", "entry_path"])
        if extra:
            target["static_web"] = extra
            origins.add(at + ("static_web",), ("outputs", "static_web"))
    else:
        driver = _DRIVERS.get(argv[0].rsplit("/", 1)[-1]) or _driver_from_tools(tools)
        target.update(runtime="source", driver=driver, entrypoint=argv[0])
        if argv[1:]:
            target["cmd"] = argv[1:]
        origins.add(at + ("entrypoint",), ("run", "command", 0))
        origins.add(at + ("cmd",), ("run", "command"))
        origins.add(at + ("driver",), ("run", "command", 0))
        if web:
            target["port"] = web["port"]
            target["readiness_probe"] = {"http_get": "/", "port": "PORT"}
        if root != ".":
            target["working_dir"] = root
    if web:
        target["bind"] = web["bind"]
        origins.add(at + ("port",), ("web", "port"))
        origins.add(at + ("bind",), ("web", "bind"))
    _tools(tools, target, origins, at)
    _env_and_config(raw, target, file, origins, at, is_secret)
    doc["targets"] = {LABEL: target}
    _state(raw, doc)
    _pack(raw, root, doc, file)
    steps = (raw.get("build") or {}).get("steps") or []
    if steps:
        doc["build"] = {"steps": [{"command": list(s["command"]), **({"working_dir": root} if root != "." else {})}
                                  for s in steps]}
        for i in range(len(steps)):
            origins.add(("build", "steps", i), ("build", "steps", i))
    if raw.get("metadata"):
        doc["metadata"] = copy.deepcopy(raw["metadata"])
    for key in raw:
        if key not in _TRANSLATED:
            doc[key] = copy.deepcopy(raw[key])  # unknown or unsupported (e.g. [seal_at]): kept, as warned
    origins.add(at, ())
    return doc, origins


def _driver_from_tools(tools: dict[str, str]) -> str:
    for driver in ("node", "python", "deno"):
        if any(t in tools for t in _TOOL_OF[driver]):
            return driver
    return "native"


def _tools(tools: dict[str, str], target: dict[str, Any], origins: Origins, at: tuple) -> None:
    if not tools:
        return
    driver = target.get("driver")
    own = next((t for t in _TOOL_OF.get(driver or "", ()) if t in tools), None)
    if own is not None and target["runtime"] == "source":
        target["runtime_version"] = tools[own]
        origins.add(at + ("runtime_version",), ("tools", own))
    pins = {("python" if name == "python3" else name): version for name, version in tools.items()}
    target["runtime_tools"] = dict(sorted(pins.items()))
    origins.add(at + ("runtime_tools",), ("tools",))


def _env_and_config(raw: dict[str, Any], target: dict[str, Any], file: str, origins: Origins, at: tuple,
                    is_secret: Any) -> None:
    env = dict(raw.get("env") or {})
    config = raw.get("config") or {}
    for name in env:
        if name in config:
            raise fail(file, ["env", name], f"is also declared as [config.{name}]; declare it once")
        if is_secret(name):
            raise fail(file, ["env", name], f"a secret-looking name cannot have a value in the manifest; declare "
                                            f'[config.{name}] kind = "secret" and pass it at run time')
    if env:
        target["env"] = env
        origins.add(at + ("env",), ("env",))
    fields, required = [], []
    for name in sorted(config):
        spec = config[name]
        field: dict[str, Any] = {"name": name, "kind": spec["kind"], "required": spec["required"]}
        if spec.get("description"):
            field["description"] = spec["description"]
        fields.append(field)
        if spec["required"]:
            required.append(name)
    if fields:
        target["config_schema"] = fields
        origins.add(at + ("config_schema",), ("config",))
    if required:
        target["required_env"] = required
        origins.add(at + ("required_env",), ("config",))


def _state(raw: dict[str, Any], doc: dict[str, Any]) -> None:
    state = raw.get("state") or {}
    if not state:
        return
    out = {}
    for name, spec in state.items():
        item = {"kind": "filesystem", "durability": "persistent", "attach": "auto", "schema_id": spec["schema"],
                "mount": spec["mount"], "access": spec["access"]}
        if spec.get("snapshot"):
            item["snapshot"] = copy.deepcopy(spec["snapshot"])
        out[name] = item
    doc["state"] = out


def _source_root(raw: dict[str, Any], file: str) -> str:
    root = (raw.get("source") or {}).get("root", ".")
    if root in (".", ""):
        return "."
    bad = any(c in root for c in ("\\", "\0", "%")) or root.startswith("/") or root.endswith("/") or \
        any(seg in ("", ".", "..") for seg in root.split("/"))
    if bad:
        raise fail(file, ["source", "root"], f"expected a relative directory without '.', '..' or empty segments, "
                                             f"'\\\\', '%' or a leading/trailing '/', got {quote(root)}")
    return root


def _rel(value: str, file: str, parts: list[str]) -> str:
    reason = relpath.escape_reason(value)
    if reason:
        raise fail(file, parts, f"{quote(value)} {reason}")
    return relpath.normalize(value) or "."


def _join(root: str, path: str) -> str:
    return path if root == "." else (root if path == "." else f"{root}/{path}")


def _pack(raw: dict[str, Any], root: str, doc: dict[str, Any], file: str) -> None:
    """``[source]`` -> ``[pack]``: ignore patterns (gitignore subset) become exclude globs."""
    patterns = list((raw.get("source") or {}).get("ignore") or [])
    if len(patterns) > _MAX_PATTERNS or sum(len(p) for p in patterns) > _MAX_TOTAL:
        raise fail(file, ["source", "ignore"], f"expected at most {_MAX_PATTERNS} patterns and {_MAX_TOTAL} bytes "
                                               "in all")
    exclude: list[str] = []
    for i, pattern in enumerate(patterns):
        where = ["source", "ignore", i]
        text = pattern.strip()
        if not text or len(pattern) > _MAX_PATTERN:
            raise fail(file, where, f"expected a non-empty pattern of at most {_MAX_PATTERN} bytes")
        if text.startswith("!"):
            raise fail(file, where, f"negated patterns are not supported by this ato, got {quote(pattern)}")
        if "\\" in text or "\0" in text or text.startswith("//") or ".." in text.split("/"):
            raise fail(file, where, f"expected a gitignore pattern without '..', '\\\\' or a leading '//', "
                                    f"got {quote(pattern)}")
        exclude.extend(_gitignore_globs(text, root))
    pack: dict[str, Any] = {}
    if root != ".":
        pack["include"] = [f"{root}/**"]
    if exclude:
        pack["exclude"] = list(dict.fromkeys(exclude))
    if pack:
        doc["pack"] = pack


def _gitignore_globs(pattern: str, root: str) -> list[str]:
    """One gitignore pattern as [pack] globs: unanchored names match at any depth, dirs match their contents."""
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    body = pattern.strip("/")
    base = body if anchored else f"**/{body}"
    if root != ".":
        base = f"{root}/{base}"
    return [base, f"{base}/**"]
