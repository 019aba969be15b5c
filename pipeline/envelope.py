"""Envelopes: validate every JSON document against its schema before it leaves.

This is the only place JSON meant for other programs is rendered. A document that
does not match its schema is a bug in ato, reported as an internal error (E999),
never printed half-right.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from pipeline.errors import E_INTERNAL, AtoError, terminal_safe_json

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from referencing import Registry

SCHEMA_BASE = "https://ato.run/schemas/"


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    """All schemas shipped in the ``schemas`` package, keyed by file stem."""
    out: dict[str, dict[str, Any]] = {}
    for entry in resources.files("schemas").iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = json.loads(entry.read_text("utf-8"))
    return out


@functools.cache
def _registry() -> Registry:
    from referencing import Registry, Resource  # imported on first validation: it costs start-up time

    resources_ = [(s["$id"], Resource.from_contents(s)) for s in _schemas().values()]
    return Registry().with_resources(resources_)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    try:
        schema = _schemas()[name]
    except KeyError:
        raise AtoError(E_INTERNAL, f"no schema named {name!r} in schemas/") from None
    return Draft202012Validator(schema, registry=_registry())


def schema_resolver(name: str) -> tuple[dict[str, Any], Any]:
    """Schema ``name`` and a resolver for the ``$ref``s in it (for walks other than validation)."""
    schema = validator(name).schema
    return schema, _registry().resolver(base_uri=schema["$id"])


def schema_names() -> list[str]:
    return sorted(_schemas())


def validation_errors(doc: Any, name: str) -> list[str]:
    """Human-readable problems of ``doc`` against schema ``name`` (empty when valid)."""
    errors = sorted(validator(name).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


def validate(doc: Any, name: str) -> Any:
    """Return ``doc`` when it matches schema ``name``; raise E999 otherwise."""
    problems = validation_errors(doc, name)
    if problems:
        raise AtoError(
            E_INTERNAL,
            f"internal error: {name} document failed its schema: {problems[0]}",
            details={"schema": name, "problems": problems[:20]},
        )
    return doc


def dumps(doc: Any) -> str:
    """Pretty JSON, 2-space indent, trailing newline (the house style)."""
    return terminal_safe_json(json.dumps(doc, indent=2, ensure_ascii=False)) + "\n"


def render(doc: Any, name: str) -> str:
    """Validate then render: the one path by which an envelope becomes text."""
    return dumps(validate(doc, name))
