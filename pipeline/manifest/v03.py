"""The 0.3 reader: a schema 0.3 (or CHML, no schema_version) document -> the 0.2 form.

Like the reference ato's "compat bridge", a 0.3 manifest is translated into the
``[targets.<label>]`` form and then checked by the same rules as 0.2, so one model
and one set of rules serve both. Three shapes:

- **flat**: top-level ``runtime = "source/node"``, ``run``, ``port``, ``build``... are
  folded into ``[targets.<default_target or "app">]`` (over a table of that name);
- **named**: ``[targets.<label>]`` with ``run`` instead of ``entrypoint``/``cmd``;
- **workspace**: ``[packages.<name>]`` become targets, ``[workspace.defaults]``
  shallow-merged under each.

``run`` becomes the entrypoint (a string is a command line, as in 0.3; an array
is argv: entrypoint plus ``cmd``), ``runtime = "a/b"`` becomes runtime + driver,
a string ``build`` becomes ``[build.lifecycle] build``, ``env.required`` joins
``required_env``. The legacy 0.2 ``entrypoint``/``cmd`` are refused by name.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING
from pipeline.manifest.keypath import describe, fail, key_path
from pipeline.manifest.origins import Origins, Parts
from pipeline.manifest.platforms import platform_targets

SCHEMA = "capsule-manifest-0.3"
DEFAULT_LABEL = "app"
DEFAULT_VERSION = "0.0.0"
# Top-level keys that select the flat shape, and the keys the fold moves into the target.
_FOLD_IF_STRING = ("runtime", "run", "build")
_FOLD_IF_PRESENT = ("runtime_version", "port", "readiness_probe", "outputs", "build_env")
_FOLD_KEYS = ("runtime", "run", "driver", "language", "port", "runtime_version", "runtime_tools", "readiness_probe",
              "outputs", "build_env", "working_dir", "needs", "config_schema", "startup_timeout")
_LEGACY = ("entrypoint", "cmd")
_PROBE_EXTRAS = ("initial_delay_seconds", "timeout_seconds", "interval_seconds")


def translate(raw: dict[str, Any], file: str, warnings: list[str]) -> tuple[dict[str, Any], Origins]:
    """The 0.2-form document of a (structurally valid) 0.3 ``raw``, and where each key came from."""
    origins = Origins()
    doc: dict[str, Any] = {k: copy.deepcopy(v) for k, v in raw.items()
                           if k not in _FOLD_KEYS + ("schema_version", "targets", "packages", "workspace", "build",
                                                      "env", "dependencies")}
    doc["schema_version"] = "0.2"
    workspace = "packages" in raw
    if "type" not in raw and not workspace:
        raise fail(file, ["type"], "required key is missing (app|tool|inference|job|library)",
                   code=E_MANIFEST_MISSING)
    doc["type"] = str(raw.get("type", DEFAULT_LABEL)).lower()
    if not raw.get("version"):
        doc["version"] = DEFAULT_VERSION
        warnings.append(f"{file}: version: not set; {DEFAULT_VERSION} is used (set version to publish)")
    _build_table(raw, doc, origins)
    _dependencies(raw, doc, file, warnings)

    targets: dict[str, Any] = {}
    for label, table in (raw.get("targets") or {}).items():
        targets[label] = _target(table, ("targets", label), {}, file, flat=False, origins=origins, warnings=warnings)
    default = raw.get("default_target")
    if workspace:
        found = _packages(raw, doc, targets, file, origins, warnings)
        default = found if default is None else default
    elif _is_flat(raw):
        default = default or DEFAULT_LABEL
        fold = {k: copy.deepcopy(raw[k]) for k in _FOLD_KEYS if k in raw}
        sources: dict[str, Parts] = {k: (k,) for k in fold}
        if isinstance(raw.get("env"), dict):
            fold["env"] = copy.deepcopy(raw["env"])
            sources["env"] = ("env",)
        if raw.get("required_env"):
            fold["required_env"] = list(raw["required_env"])
            sources["required_env"] = ("required_env",)
        base = copy.deepcopy((raw.get("targets") or {}).get(default) or {})
        explicit = {k: ("targets", default, k) for k in base}
        origins.add(("targets", default), ())
        targets[default] = _target({**base, **fold}, ("targets", default), {**explicit, **sources}, file, flat=True,
                                   origins=origins, warnings=warnings)
    elif isinstance(raw.get("env"), dict):
        doc["env"] = copy.deepcopy(raw["env"])  # top-level [env] outside the flat shape: kept, warned as unknown
    if doc["type"] == "tool" and raw.get("platforms") and not targets:
        targets = platform_targets(raw["platforms"])  # ato run picks the host's; the first is the default
        for key in targets:
            origins.add(("targets", key), ("platforms", key))
        default = default or next(iter(targets))
    if default is None and targets:
        default = next(iter(targets)) if len(targets) == 1 else None
    doc["targets"] = targets
    if default is not None:
        doc["default_target"] = default
    else:
        raise fail(file, ["default_target"], "required key is missing (name the target that runs, or use the flat "
                                             'form: runtime = "source/node", run = "...")', code=E_MANIFEST_MISSING)
    return doc, origins


def _is_flat(raw: dict[str, Any]) -> bool:
    return any(isinstance(raw.get(k), str) and raw[k].strip() for k in _FOLD_IF_STRING) or \
        any(k in raw for k in _FOLD_IF_PRESENT)


def _build_table(raw: dict[str, Any], doc: dict[str, Any], origins: Origins) -> None:
    build = raw.get("build")
    if isinstance(build, str):
        doc["build"] = {"lifecycle": {"build": build}}
        origins.add(("build", "lifecycle", "build"), ("build",))
    elif isinstance(build, dict):
        doc["build"] = copy.deepcopy(build)


def _dependencies(raw: dict[str, Any], doc: dict[str, Any], file: str, warnings: list[str]) -> None:
    deps = raw.get("dependencies")
    if deps is None:
        return
    if isinstance(deps, str):
        warnings.append(f"{file}: dependencies: unsupported: a requirements file ({describe(deps)}) is not "
                        "installed by this ato (lock your dependencies: uv.lock, package-lock.json); ignored")
        return
    contracts = {a: d for a, d in deps.items() if isinstance(d, dict) and ("capsule" in d or "contract" in d)}
    for alias in sorted(set(deps) - set(contracts)):
        warnings.append(f"{file}: {key_path(['dependencies', alias])}: unsupported: package dependencies are not "
                        "resolved by this ato (only [dependencies.<alias>] with capsule and contract); ignored")
    if contracts:
        doc["dependencies"] = copy.deepcopy(contracts)


def _packages(raw: dict[str, Any], doc: dict[str, Any], targets: dict[str, Any], file: str, origins: Origins,
              warnings: list[str]) -> str | None:
    """``[packages.<name>]`` -> targets; a library is build-only: its ``build`` becomes a build step."""
    defaults = (raw.get("workspace") or {}).get("defaults") or {}
    first_app = None
    for name, table in raw["packages"].items():
        merged = {**copy.deepcopy(defaults), **copy.deepcopy(table)}
        kind = merged.pop("type", "app")
        origins.add(("targets", name), ("packages", name))
        if kind == "library":
            for key in ("run", "run_command", "image") + _LEGACY:
                if merged.get(key):
                    raise fail(file, ["packages", name, key], "a library package is build-only; remove "
                                                              f'{key} or set type = "app"')
            if merged.get("build"):
                steps = doc.setdefault("build", {}).setdefault("steps", [])
                step: dict[str, Any] = {"command": merged["build"]}
                if merged.get("working_dir"):
                    step["working_dir"] = merged["working_dir"]
                origins.add(("build", "steps", len(steps)), ("packages", name))
                steps.append(step)
            continue
        sources = {k: ("packages", name, k) for k in table}
        sources.update({k: ("workspace", "defaults", k) for k in defaults if k not in table})
        targets[name] = _target(merged, ("targets", name), sources, file, flat=True, origins=origins,
                                warnings=warnings)
        first_app = first_app or name
    return first_app


def _target(table: dict[str, Any], at: Parts, sources: dict[str, Parts], file: str, *, flat: bool, origins: Origins,
            warnings: list[str]) -> dict[str, Any]:
    """One 0.3 target table -> a 0.2 target table (``sources``: where each key was written)."""
    def src(key: str) -> Parts:
        return sources.get(key, at + (key,))

    for key, where in sources.items():
        origins.add(at + (key,), where)
    out = copy.deepcopy(table)
    oci = out.get("runtime") == "oci"
    for key in _LEGACY:
        value = out.pop(key, None)
        if key == "cmd" and oci and isinstance(value, list) and value:
            out["cmd"] = value  # as upstream now reads it: an OCI target may give its container command as argv
            continue
        if value not in (None, "", []):
            raise fail(file, src(key), f'"{key}" is the 0.2 spelling; with schema_version "0.3" use run '
                                       '(a command line string, or an argv array)')
    run = out.pop("run", None)
    if run is None:
        run = out.pop("run_command", None)
        run_key = src("run_command")
    else:
        out.pop("run_command", None)
        run_key = src("run")
    runtime = out.get("runtime")
    if isinstance(runtime, str) and "/" in runtime:
        kind, driver = _split_runtime(runtime.strip(), flat)
        if out.get("driver") not in (None, driver):
            raise fail(file, src("driver"), f'driver {describe(out["driver"])} contradicts runtime '
                                            f'{describe(runtime)} (which means driver "{driver}")')
        out["runtime"], out["driver"] = kind, driver
        origins.add(at + ("driver",), src("runtime"))
    if run is not None:
        origins.add(at + ("entrypoint",), run_key)
        origins.add(at + ("cmd",), run_key)
        if isinstance(run, list):
            out["entrypoint"] = run[0]
            if run[1:]:
                if "cmd" in out:
                    raise fail(file, src("cmd"), "give the command once: run (an argv array) or cmd, not both")
                out["cmd"] = list(run[1:])
        elif out.get("runtime") == "web" and out.get("driver") == "static" and flat:
            out["entrypoint"] = _static_dir(run)
        elif run.strip():
            out["entrypoint"] = run.strip()
    env = out.get("env")
    if isinstance(env, dict) and "required" in env:
        required = env.pop("required")
        out["required_env"] = list(dict.fromkeys(list(out.get("required_env") or []) + list(required)))
        origins.add(at + ("required_env",), src("env") + ("required",))
    if "depends_on" in out:
        out["needs"] = list(dict.fromkeys(list(out.get("needs") or []) + list(out.pop("depends_on"))))
        origins.add(at + ("needs",), src("depends_on"))
    probe = out.get("readiness_probe")
    if probe is not None:
        out["readiness_probe"] = _probe(probe, src("readiness_probe"), file, warnings)
    return out


def _split_runtime(value: str, flat: bool) -> tuple[str, str]:
    """``source/node`` -> (source, node); ``web/static`` -> (web, static); flat ``web/node`` -> (source, node)."""
    kind, _, driver = value.partition("/")
    if driver in ("go", "native"):
        return "source", "native"
    if kind == "web" and driver != "static" and flat:
        return "source", driver
    return kind, driver


def _static_dir(run: str) -> str:
    """A web/static ``run`` names the directory to serve: a file path means its parent."""
    text = run.strip().rstrip("/")
    if not text:
        return "."
    last = text.rsplit("/", 1)[-1]
    if "." in last.strip("."):
        parent = text.rsplit("/", 1)[0] if "/" in text else "."
        return parent or "."
    return text


def _probe(probe: Any, at: Parts, file: str, warnings: list[str]) -> dict[str, Any]:
    """0.3 probe spellings -> ``{http_get|tcp_connect, port}`` (port defaults to the PORT variable)."""
    if isinstance(probe, str):
        return {"http_get": probe.strip(), "port": "PORT"}
    out = dict(probe)
    kind, target = out.pop("type", None), out.pop("target", None)
    if target is not None:
        if kind == "tcp":
            out.setdefault("tcp_connect", target)
        else:
            out.setdefault("http_get", target)
    for key in _PROBE_EXTRAS:
        if key in out:
            out.pop(key)
            warnings.append(f"{file}: {key_path(at + (key,))}: not applied by this ato (readiness waits up to the "
                            "run's ready timeout); ignored")
    out.setdefault("port", "PORT")
    return out
