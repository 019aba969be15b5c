"""Generations: which capsule.toml form a document is written in, decided before anything else.

The schema version is the headline of every manifest problem: when it is
unsupported (or missing where the form cannot be told apart), that is the one
error the user sees, naming the versions this ato reads, instead of a complaint
about some table that only looks wrong because another generation was meant.

A document without ``schema_version`` is read the way the reference ato reads it
(as 0.3) when it uses a 0.3-only spelling: a string ``run``/``runtime``/``build``,
a ``[packages]`` workspace, or any key of the "CHML" list. A document that could
be either 0.2 or 0.3 (``[targets.<label>]`` with 0.2 keys) is refused: guessing
the form would guess what runs.
"""

from __future__ import annotations

from typing import Any

from pipeline.envelope import validator
from pipeline.errors import E_MANIFEST, E_MANIFEST_MISSING, AtoError
from pipeline.manifest.keypath import describe, fail, quote

V02 = "0.2"
V03 = "0.3"
V1 = "1"  # the v1 authoring form
V10 = "1.0"
V11 = "1.1"
READABLE = (V02, V03, V1, V10, V11)
EXECUTION_FORM = (V10, V11)
EXPECTED = ('"0.2" ([targets.<label>] form), "0.3" (flat or [targets.<label>] form), "1" (v1 authoring form) '
            'or "1.1" ([execution] form; "1.0" is also read)')

# Keys whose presence marks a document without schema_version as 0.3 ("CHML" in the reference ato).
_CHML_KEYS = ("packages", "workspace", "outputs", "build_env", "required_env", "runtime_version", "runtime_tools",
              "readiness_probe", "external_injection", "dependencies", "capsule_path")
_CHML_STRINGS = ("build", "run", "runtime")


def detect(raw: dict[str, Any], file: str) -> str:
    """The generation of ``raw`` (one of :data:`READABLE`), or the headline schema_version error."""
    if "schema_version" not in raw:
        return _without_version(raw, file)
    version = raw["schema_version"]
    if not isinstance(version, str):
        raise fail(file, ["schema_version"], f"expected a string: {EXPECTED}, got {describe(version)}")
    if version.strip() == V1:  # the reference ato trims "1"; "1.0"/"1.1" are the [execution] form
        return V1
    if version not in READABLE:
        raise AtoError(E_MANIFEST, f"{file}: schema_version: expected {EXPECTED}, got {describe(version)}",
                       details={"file": file, "key": "schema_version", "readable": list(READABLE)})
    return version


def _without_version(raw: dict[str, Any], file: str) -> str:
    if "execution" in raw:
        raise _missing(file, 'add schema_version = "1.1" (the [execution] form)')
    if any(k in raw for k in _CHML_KEYS) or any(isinstance(raw.get(k), str) for k in _CHML_STRINGS):
        return V03
    targets = raw.get("targets")
    if isinstance(targets, dict) and any(isinstance(t, dict) and ("run" in t or "run_command" in t)
                                         for t in targets.values()):
        return V03
    raise _missing(file, 'add schema_version = "0.2" for this [targets.<label>] form (this ato reads '
                         '"0.2", "0.3", "1", "1.0" and "1.1")')


def _missing(file: str, hint: str) -> AtoError:
    err = fail(file, ["schema_version"], "required key is missing", code=E_MANIFEST_MISSING)
    err.hint = hint
    err.details["readable"] = list(READABLE)
    return err


# The schema each generation's source document is checked against (0.2 and 1.x share one).
SCHEMAS = {V03: "capsule-manifest-0.3", V1: "capsule-manifest-1", V02: "capsule-manifest", V10: "capsule-manifest",
           V11: "capsule-manifest"}
_EXECUTION_KEYS = ("execution", "lifecycle", "tasks")


def _fits(schema: str, key: str, value: Any) -> bool:
    """Whether ``key = value`` is a known top-level key of ``schema`` with a valid value."""
    check = validator(schema)
    if key not in check.schema.get("properties", {}):
        return False
    return not any(list(e.absolute_path)[:1] == [key] for e in check.iter_errors({key: value}))


def _misshapen(schema: str, key: str, value: Any) -> bool:
    """Whether ``key`` is unknown to ``schema`` or its value has the wrong shape there (a wrong type, not a
    wrong value: a name that breaks the naming rule is a problem of the name, not of the generation)."""
    check = validator(schema)
    if key not in check.schema.get("properties", {}):
        return True
    return any(list(e.absolute_path) == [key] and e.validator in ("type", "oneOf", "anyOf")
               for e in check.iter_errors({key: value}))


def other_form(raw: dict[str, Any], generation: str, err: AtoError, file: str) -> AtoError | None:
    """``err`` (the structure check of ``raw`` as ``generation`` failed) re-headed by the schema version when
    top-level keys of ``raw`` are written in another generation's form (0.3's ``build = "pnpm build"`` in a
    0.2 file): the version is what is wrong, not the table. None when no other form explains them."""
    own = SCHEMAS[generation]
    best: tuple[str, list[str]] | None = None
    for other in (V03, V1, V02):
        if SCHEMAS[other] == own:
            continue
        keys = [k for k, v in raw.items() if k != "schema_version" and _misshapen(own, k, v) and _fits(SCHEMAS[other], k, v)]
        if keys and (best is None or len(keys) > len(best[1])):
            best = (other, keys)
    if best is None:
        return None
    other, keys = best
    if other == V02 and any(k in _EXECUTION_KEYS for k in keys):
        other = V11
    declared = raw.get("schema_version")
    said = f"schema_version {quote(declared)}" if isinstance(declared, str) else \
        f"a capsule.toml without schema_version (read as {quote(generation)})"
    problem = err.message.removeprefix(f"{file}: ")
    names = ", ".join(keys)
    out = AtoError(err.code, f"{file}: {said}: {names} {'is' if len(keys) == 1 else 'are'} written in the "
                             f"{quote(other)} form ({problem})",
                   details={**err.details, "key": "schema_version", "schema_version": declared,
                            "form_of": other, "keys": keys, "problem": problem},
                   hint=f"set schema_version = {quote(other)} if the file is written in that form, or rewrite "
                        f"{names} in the {quote(generation)} form")
    return out
