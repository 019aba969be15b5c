"""Targets: ``[targets.<label>]`` and ``[execution]`` tables -> :class:`Target`, with their rules.

The runtime/driver table is the one the seeds fix: runtime in source|web|oci|wasm;
web takes static|node|deno|python and always needs a driver and a port; source
takes node|deno|python|native; wasm takes wasmtime; oci takes none.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import E_ENTRYPOINT, E_MANIFEST_MISSING
from pipeline.manifest import relpath
from pipeline.manifest.keypath import describe, fail, key_path, quote
from pipeline.manifest.lifecycle import ENV_NAME, check_probe
from pipeline.manifest.model import Target

RUNTIMES = ("oci", "source", "wasm", "web")
DRIVERS = ("deno", "native", "node", "python", "static", "wasmtime")
RUNTIME_DRIVERS: dict[str, tuple[str, ...]] = {
    "web": ("static", "node", "deno", "python"),
    "source": ("deno", "native", "node", "python"),
    "wasm": ("wasmtime",),
    "oci": (),
}
LEGACY_REQUIRED_ENVS = "ATO_ORCH_REQUIRED_ENVS"
DEPRECATED_ENTRYPOINT = "ato-entry.ts"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RUNTIME_HINTS = {"native": ' (use runtime = "source" with driver = "native")',
                  "docker": ' (use runtime = "oci")', "youki": ' (use runtime = "oci")'}


def read_target(label: str, table: dict[str, Any], parts: list[str | int], file: str, *,
                default_runtime: str | None, fallback_digest: str | None, warnings: list[str]) -> Target:
    """Build a Target from its (structurally valid) table; the legacy env list is folded in here.

    Unknown keys are reported by :mod:`pipeline.manifest.strictness` from the schema.
    """
    if not LABEL.match(label):
        raise fail(file, parts, "expected a label of letters, digits, '.', '_' or '-' (starting with a letter "
                                "or digit, at most 64 characters)")
    env = dict(table.get("env") or {})
    required = list(table.get("required_env") or [])
    legacy = env.pop(LEGACY_REQUIRED_ENVS, None)
    if legacy is not None:
        for name in (n.strip() for n in legacy.split(",")):
            if not name:
                continue
            if not ENV_NAME.match(name):
                raise fail(file, parts + ["env", LEGACY_REQUIRED_ENVS],
                           f"expected comma-separated environment variable names, got {describe(name)}")
            required.append(name)
    public = table.get("public")
    if isinstance(public, str):
        public = [public]
    elif isinstance(public, bool):
        public = ["*"] if public else []
    return Target(
        label=label,
        runtime=_strip(table.get("runtime")) or default_runtime,
        driver=_strip(table.get("driver")),
        entrypoint=_strip(table.get("entrypoint")),
        cmd=tuple(table.get("cmd") or ()),
        port=table.get("port"),
        required_env=tuple(dict.fromkeys(required)),
        runtime_version=table.get("runtime_version"),
        runtime_tools=dict(table.get("runtime_tools") or {}),
        env=env,
        image=table.get("image"),
        source_digest=table.get("source_digest") or fallback_digest,
        public=tuple(public or ()),
        language=table.get("language"),
        working_dir=table.get("working_dir"),
        digest=table.get("digest"),
        readiness_probe=table.get("readiness_probe"),
        needs=tuple(dict.fromkeys(n.strip() for n in table.get("needs") or () if n.strip())),
        bind=table.get("bind"),
        secret_env=tuple(f["name"] for f in table.get("config_schema") or () if f.get("kind", "secret") == "secret"),
        optional_env=tuple(f["name"] for f in table.get("config_schema") or ()
                           if not f.get("required", True) and f["name"] not in required),
    )


def check_target(target: Target, parts: list[str | int], file: str, *, entrypoint_optional: bool,
                 route_alternative: bool, warnings: list[str]) -> None:
    """The semantic rules of one target, first failure raised.

    ``entrypoint_optional``: the services declare what runs (services mode).
    ``route_alternative``: a 1.1 ``[targets.oci]``/``[targets.wasm]`` beside ``[execution]``.
    """
    runtime, driver = target.runtime, target.driver
    if runtime is None and parts[0] != "execution":
        raise fail(file, parts + ["runtime"], f"required key is missing (expected one of {'|'.join(RUNTIMES)})",
                   code=E_MANIFEST_MISSING)
    if runtime is not None and runtime not in RUNTIMES:
        raise fail(file, parts + ["runtime"], f"expected one of {'|'.join(RUNTIMES)}, got {describe(runtime)}"
                                              + _RUNTIME_HINTS.get(runtime, ""))
    if runtime == "web" and not driver:
        raise fail(file, parts + ["driver"], 'runtime "web" requires driver (static|node|deno|python)')
    if driver is not None:
        if driver in ("browser_static", "browser-static"):
            raise fail(file, parts + ["driver"], f'driver "{driver}" has been removed; use "static"')
        if driver not in DRIVERS:
            raise fail(file, parts + ["driver"], f"expected one of {'|'.join(DRIVERS)}, got {describe(driver)}")
        if runtime is not None and driver not in RUNTIME_DRIVERS[runtime]:
            allowed = "|".join(RUNTIME_DRIVERS[runtime]) or "none"
            raise fail(file, parts + ["driver"], f'driver "{driver}" is not compatible with runtime "{runtime}" '
                                                 f"(allowed: {allowed})")
    if runtime == "web":
        if target.public:
            warnings.append(f"{file}: {key_path(parts + ['public'])}: deprecated for runtime=web and ignored")
        if target.port is None:
            raise fail(file, parts + ["port"], 'runtime "web" requires port (1-65535)')
    _check_entrypoint(target, parts, file, entrypoint_optional=entrypoint_optional,
                      route_alternative=route_alternative)
    if target.working_dir is not None:
        reason = relpath.escape_reason(target.working_dir)
        if reason:
            raise fail(file, parts + ["working_dir"], f"{quote(target.working_dir)} {reason}")
    if target.readiness_probe is not None:
        check_probe(target.readiness_probe, parts + ["readiness_probe"], file)


def _check_entrypoint(target: Target, parts: list[str | int], file: str, *, entrypoint_optional: bool,
                      route_alternative: bool) -> None:
    ep, runtime = target.entrypoint, target.runtime
    key = parts + ["entrypoint"]
    if ep:
        for word in ep.split():
            reason = relpath.escape_reason(word)
            if reason:
                raise fail(file, key, f"{quote(ep)} {reason}", code=E_ENTRYPOINT)
        if relpath.normalize(ep.split()[0]).rsplit("/", 1)[-1] == DEPRECATED_ENTRYPOINT:
            raise fail(file, key, f'"{DEPRECATED_ENTRYPOINT}" is deprecated and rejected; declare top-level '
                                  "[services] (with services.main) instead", code=E_ENTRYPOINT)
        if runtime == "web" and target.driver != "static" and any(c.isspace() for c in ep):
            raise fail(file, key, "expected a script file path (shell command strings are not allowed for "
                                  f"runtime=web), got {describe(ep)}", code=E_ENTRYPOINT)
        return
    if runtime == "oci":
        if not target.image:
            raise fail(file, parts + ["image"], 'runtime "oci" requires image (or entrypoint)')
    elif runtime == "wasm":
        if not target.digest and not route_alternative:
            raise fail(file, key, 'runtime "wasm" requires entrypoint (or digest)', code=E_MANIFEST_MISSING)
    elif not entrypoint_optional:
        raise fail(file, key, "required key is missing", code=E_MANIFEST_MISSING)


def _strip(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
