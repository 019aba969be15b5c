"""Dependency contracts: ``[dependencies.<alias>]``, ``[contracts."<name>@<major>"]``, ``needs`` and templates.

A consumer names a provider capsule and the contract it must offer
(``capsule = "capsule://ato/postgres@16"``, ``contract = "service@1"``), passes
parameters and credentials, and reads the provider's exports in its targets'
env (``{{deps.db.runtime_exports.DATABASE_URL}}``); ``needs`` orders start-up. A
provider declares what it offers: the target that runs, a ready probe, typed
parameters and credentials, identity and runtime exports.

Everything that can be checked without the provider in hand is checked here, each
failure naming its key: the capsule URL and contract grammar, credentials that
must be pure ``{{env.X}}`` references to a top-level ``required_env`` name
(a literal would be packed and published), template syntax and scope (unknown
aliases, undeclared parameters or credentials, credentials in identity exports),
``needs`` naming something undeclared, and ``needs`` cycles. When the provider's
manifest is at hand (``ato validate --provider``), :func:`check_provider` also
checks the contract is offered and every export the consumer reads exists.
Starting providers is the IPC and dependencies issue's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING
from pipeline.manifest.keypath import fail, key_path, quote
from pipeline.manifest.lifecycle import NAME, find_cycle
from pipeline.manifest.model import Service, Target
from pipeline.manifest.templates import Expr, TemplateError, has_template, parse

CONTRACT_ID = re.compile(r"^(?P<name>[a-z][a-z0-9_-]*)@(?P<major>0|[1-9][0-9]*)$")
CAPSULE_URL = re.compile(
    r"^capsule://(?P<authority>ato|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+)"
    r"/(?P<path>[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*)@(?P<ref>sha256:[0-9a-f]{64}|[A-Za-z0-9][A-Za-z0-9._-]*)$")
STATE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_READY_FIELDS = {"tcp": ("target",), "probe": ("run",), "postgres": ("host", "port"), "http": ("url",),
                 "unix_socket": ("path",)}
_READY_RESERVED = ("http", "unix_socket")
_ENV_ONLY = re.compile(r"^\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


@dataclass(frozen=True)
class Dependency:
    """``[dependencies.<alias>]``: a provider capsule and the contract it must offer."""

    alias: str
    capsule: str
    contract: str
    parameters: dict[str, str | int | bool] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)  # name -> "{{env.X}}"
    state: str | None = None  # the provider state this consumer owns (ownership = parent)

    def credential_env(self) -> list[str]:
        """The host variables the credentials read (``{{env.X}}`` -> ``X``)."""
        return [m.group(1) for v in self.credentials.values() if (m := _ENV_ONLY.match(v.strip()))]


@dataclass(frozen=True)
class Export:
    value: str
    secret: bool = False


@dataclass(frozen=True)
class Contract:
    """``[contracts."<name>@<major>"]``: what this capsule offers as a provider."""

    id: str
    target: str
    ready: dict[str, Any] | None = None
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    identity_exports: dict[str, str] = field(default_factory=dict)
    runtime_exports: dict[str, Export] = field(default_factory=dict)
    state: dict[str, Any] | None = None


def read_contracts(doc: dict[str, Any], targets: dict[str, Target], services: dict[str, Service], file: str,
                   warnings: list[str]) -> tuple[dict[str, Dependency], dict[str, Contract]]:
    """Read and check the dependency-contract tables and every template of ``doc``."""
    scope = set(doc.get("required_env") or ())
    deps = {alias: _dependency(alias, spec, scope, set(targets), set(services), file)
            for alias, spec in sorted((doc.get("dependencies") or {}).items())}
    contracts = {cid: _contract(cid, spec, targets, deps, file)
                 for cid, spec in sorted((doc.get("contracts") or {}).items())}
    providers = {c.target: c for c in contracts.values()}
    for label, target in targets.items():
        _check_target_templates(label, target, deps, providers.get(label), file, warnings)
    _check_needs(targets, deps, file)
    return deps, contracts


# ------------------------------------------------------------------ consumer side


def _dependency(alias: str, spec: dict[str, Any], scope: set[str], targets: set[str], services: set[str],
                file: str) -> Dependency:
    at = ["dependencies", alias]
    if not NAME.match(alias):
        raise fail(file, at, "expected an alias of letters, digits, '.', '_' or '-' (starting with a letter or "
                             "digit, at most 64 characters)")
    if alias in targets or alias in services:
        what = "target" if alias in targets else "service"
        raise fail(file, at, f"alias {quote(alias)} is also a {what} name; needs and templates name both, so "
                             "pick another alias")
    url = spec["capsule"].strip()
    if not CAPSULE_URL.match(url):
        raise fail(file, at + ["capsule"], "expected capsule://<authority>/<path>@<ref> (authority \"ato\" or a "
                                           "host name; ref a version such as 16 or sha256:<64 hex>), got "
                                           f"{quote(spec['capsule'])}")
    contract = spec["contract"].strip()
    if not CONTRACT_ID.match(contract):
        raise fail(file, at + ["contract"], f"expected <name>@<major> (e.g. \"service@1\"), got {quote(contract)}")
    for name, value in (spec.get("parameters") or {}).items():
        if isinstance(value, str) and has_template(value):
            for expr in _parse(value, at + ["parameters", name], file):
                if expr.kind != "env":
                    raise fail(file, at + ["parameters", name], f"{{{{{expr}}}}} cannot be used in a parameter "
                                                                "(only {{env.X}})")
                _in_scope(expr.key or "", scope, at + ["parameters", name], file)
    credentials = {}
    for name, value in (spec.get("credentials") or {}).items():
        where = at + ["credentials", name]
        match = _ENV_ONLY.match(value.strip())
        if match is None:
            _parse(value, where, file)  # a syntax error is reported as such
            raise fail(file, where, "expected a pure {{env.X}} reference (a literal credential would be packed and "
                                    f"published), got {quote(value)}")
        _in_scope(match.group(1), scope, where, file)
        credentials[name] = value.strip()
    state = spec.get("state")
    if state is not None and not STATE_NAME.match(state["name"]):
        raise fail(file, at + ["state", "name"], f"expected a kebab-case state name, got {quote(state['name'])}")
    return Dependency(alias, url, contract, dict(spec.get("parameters") or {}), credentials,
                      state["name"] if state else None)


def _in_scope(key: str, scope: set[str], where: list[str | int], file: str) -> None:
    if key not in scope:
        raise fail(file, where, f"{{{{env.{key}}}}} reads {key}, which is not in the top-level required_env (the "
                                "scope of {{env.X}} in [dependencies])")


# ------------------------------------------------------------------ provider side


def _contract(cid: str, spec: dict[str, Any], targets: dict[str, Target], deps: dict[str, Dependency],
              file: str) -> Contract:
    at = ["contracts", cid]
    if not CONTRACT_ID.match(cid):
        raise fail(file, at, f"expected a contract id <name>@<major> (e.g. \"service@1\"), got {quote(cid)}")
    if spec["target"] not in targets:
        raise fail(file, at + ["target"], f"unknown target {quote(spec['target'])} (declared: "
                                          f"{', '.join(sorted(targets)) or 'none'})")
    params = dict(spec.get("parameters") or {})
    creds = dict(spec.get("credentials") or {})
    for name, schema in creds.items():
        if "default" in schema:
            raise fail(file, at + ["credentials", name, "default"], "a credential cannot have a default (it would "
                                                                    "be packed and published)")
    for table, schemas in (("parameters", params), ("credentials", creds)):
        for name, schema in schemas.items():
            if "default" in schema and not _fits(schema["default"], schema["type"]):
                raise fail(file, at + [table, name, "default"], f"expected a {schema['type']} default")

    def check(value: str, where: list[str | int], *, identity: bool) -> None:
        for expr in _parse(value, where, file):
            if identity and expr.kind in ("credentials", "host", "port", "socket", "state.dir", "runtime_exports"):
                raise fail(file, where, f"{{{{{expr}}}}} cannot be an identity export (identity is fixed when the "
                                        "dependency is locked; credentials and run-time values are not)")
            _check_scope(expr, where, params, creds, deps, file)

    ready = spec.get("ready")
    if ready is not None:
        kind = ready["type"]
        if kind in _READY_RESERVED:
            raise fail(file, at + ["ready", "type"], f'ready type "{kind}" is reserved; use tcp, probe or postgres')
        for key in _READY_FIELDS[kind]:
            if key not in ready:
                raise fail(file, at + ["ready", key], f'required key is missing (ready type "{kind}")',
                           code=E_MANIFEST_MISSING)
        for key, value in ready.items():
            if key not in ("type", "timeout", "expect_status") and isinstance(value, str):
                check(value, at + ["ready", key], identity=False)
    identity = dict(spec.get("identity_exports") or {})
    runtime: dict[str, Export] = {}
    for name, value in identity.items():
        check(value, at + ["identity_exports", name], identity=True)
    for name, value in (spec.get("runtime_exports") or {}).items():
        export = Export(value, False) if isinstance(value, str) else Export(value["value"],
                                                                           bool(value.get("secret", False)))
        where = at + ["runtime_exports", name] + ([] if isinstance(value, str) else ["value"])
        check(export.value, where, identity=False)
        if name in identity:
            raise fail(file, at + ["runtime_exports", name], f"{quote(name)} is also an identity export; export "
                                                             "each name once")
        runtime[name] = export
    state = spec.get("state")
    if state is not None:
        if state.get("required") and not state.get("version"):
            raise fail(file, at + ["state", "version"], "required key is missing (a required state needs a "
                                                        "version, so data of another layout is never reused)",
                       code=E_MANIFEST_MISSING)
        mount = state.get("mount")
        if mount is not None and not (mount.startswith("/") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", mount)):
            raise fail(file, at + ["state", "mount"], "expected an absolute path or the name of the environment "
                                                      f"variable that receives the state directory, got {quote(mount)}")
    return Contract(cid, spec["target"], dict(ready) if ready else None, params, creds, identity, runtime,
                    dict(state) if state else None)


def _fits(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


# ------------------------------------------------------------------ templates and needs


def _parse(value: str, where: list[str | int], file: str) -> list[Expr]:
    try:
        return parse(value)
    except TemplateError as exc:
        raise fail(file, where, f"invalid template: {exc}") from None


def _check_scope(expr: Expr, where: list[str | int], params: dict[str, Any] | None, creds: dict[str, Any] | None,
                 deps: dict[str, Dependency], file: str) -> None:
    """``params.K``/``credentials.K`` must be declared by the contract in play; ``deps.D`` must be a dependency."""
    if expr.dep is not None and expr.dep not in deps:
        raise fail(file, where, f"{{{{{expr}}}}} names dependency {quote(expr.dep)}, which is not declared "
                                f"(declared: {', '.join(sorted(deps)) or 'none'})")
    for kind, declared in (("params", params), ("credentials", creds)):
        if expr.kind != kind:
            continue
        if declared is None:
            raise fail(file, where, f"{{{{{expr}}}}} is only available in a target that a [contracts] table "
                                    "offers (a provider)")
        if expr.key not in declared:
            table = "parameters" if kind == "params" else "credentials"
            raise fail(file, where, f"{{{{{expr}}}}} reads {table}.{expr.key}, which the contract does not declare "
                                    f"(declared: {', '.join(sorted(declared)) or 'none'})")


def _check_target_templates(label: str, target: Target, deps: dict[str, Dependency], provided: Contract | None,
                            file: str, warnings: list[str]) -> None:
    """Templates in a target's env and command: valid, in scope, and backed by ``needs``."""
    params = provided.parameters if provided else None
    creds = provided.credentials if provided else None
    places: list[tuple[list[str | int], str]] = [(["targets", label, "env", k], v) for k, v in target.env.items()]
    if target.entrypoint:
        places.append((["targets", label, "entrypoint"], target.entrypoint))
    places += [(["targets", label, "cmd", i], a) for i, a in enumerate(target.cmd)]
    for where, value in places:
        if not has_template(value):
            continue
        for expr in _parse(value, where, file):
            _check_scope(expr, where, params, creds, deps, file)
            if expr.dep is not None and expr.dep not in target.needs:
                warnings.append(f"{file}: {key_path(where)}: reads {{{{{expr}}}}} but targets.{label}.needs does not "
                                f"list {quote(expr.dep)}; the export exists only once the provider is ready")


def _check_needs(targets: dict[str, Target], deps: dict[str, Dependency], file: str) -> None:
    for label, target in targets.items():
        for i, need in enumerate(target.needs):
            if need not in deps and need not in targets:
                raise fail(file, ["targets", label, "needs", i],
                           f"unknown dependency or target {quote(need)} (dependencies: "
                           f"{', '.join(sorted(deps)) or 'none'}; targets: {', '.join(sorted(targets))})")
    graph = {label: tuple(n for n in t.needs if n in targets) for label, t in targets.items()}
    cycle = find_cycle(graph)
    if cycle:
        raise fail(file, ["targets", cycle[0], "needs"], f"dependency cycle: {' -> '.join(cycle)}")


# ------------------------------------------------------------------ with the provider in hand


def check_provider(alias: str, dependency: Dependency, provider_contracts: dict[str, Contract],
                   targets: dict[str, Target], file: str, provider_file: str) -> None:
    """The provider offers the contract, takes the parameters/credentials given, and exports what is read."""
    at = ["dependencies", alias]
    contract = provider_contracts.get(dependency.contract)
    if contract is None:
        raise fail(file, at + ["contract"], f"the provider ({provider_file}) does not offer {quote(dependency.contract)} "
                                            f"(offers: {', '.join(sorted(provider_contracts)) or 'nothing'})")
    for name in dependency.parameters:
        if name not in contract.parameters:
            raise fail(file, at + ["parameters", name], f"unknown parameter (the provider's {dependency.contract} "
                                                        f"takes: {', '.join(sorted(contract.parameters)) or 'none'})")
    for name, schema in contract.parameters.items():
        value = dependency.parameters.get(name)
        if value is None and schema.get("required") and "default" not in schema:
            raise fail(file, at + ["parameters", name], "required key is missing (the provider requires it)",
                       code=E_MANIFEST_MISSING)
        if value is not None and not (isinstance(value, str) and has_template(value)) \
                and not _fits(value, schema["type"]):
            raise fail(file, at + ["parameters", name], f"expected a {schema['type']} (the provider's type)")
    for name in dependency.credentials:
        if name not in contract.credentials:
            raise fail(file, at + ["credentials", name], f"unknown credential (the provider's {dependency.contract} "
                                                         f"takes: {', '.join(sorted(contract.credentials)) or 'none'})")
    for name, schema in contract.credentials.items():
        if schema.get("required") and name not in dependency.credentials:
            raise fail(file, at + ["credentials", name], "required key is missing (the provider requires it)",
                       code=E_MANIFEST_MISSING)
    if contract.state and contract.state.get("required") and dependency.state is None:
        raise fail(file, at + ["state"], "required key is missing (the provider's state is required: name it)",
                   code=E_MANIFEST_MISSING)
    for label, target in targets.items():
        for where, value in [(["targets", label, "env", k], v) for k, v in target.env.items()]:
            if not has_template(value):
                continue
            for expr in parse(value):
                if expr.dep != alias:
                    continue
                exports = contract.runtime_exports if expr.kind == "runtime_exports" else contract.identity_exports
                if expr.key not in exports:
                    raise fail(file, where, f"{{{{{expr}}}}}: the provider's {dependency.contract} does not export "
                                            f"{quote(expr.key or '')} as {expr.kind} (exports: "
                                            f"{', '.join(sorted(exports)) or 'none'})")


def unmet_at_run(target: Target, dependencies: dict[str, Dependency]) -> str | None:
    """Why ``target`` cannot start without a dependency orchestrator (None when it can).

    A target that needs a provider, or whose command or env still holds a ``{{...}}``
    template, would start with literal template text or without its database: refused.
    """
    for need in target.needs:
        dep = dependencies.get(need)
        what = f"dependency '{need}' ({dep.capsule}, {dep.contract})" if dep else f"target '{need}'"
        return (f"target '{target.label}' needs {what} to be running first, and this ato does not start "
                "dependencies yet")
    places = [("env." + k, v) for k, v in target.env.items()] + [("entrypoint", target.entrypoint or "")] + \
        [(f"cmd[{i}]", a) for i, a in enumerate(target.cmd)]
    for where, value in places:
        if has_template(value):
            return (f"targets.{target.label}.{where} holds a template ({value}) that only the dependency "
                    "orchestrator fills in, and this ato does not run it yet")
    return None
