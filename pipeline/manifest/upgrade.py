"""Moving a manifest between generations: ``ato manifest upgrade`` (0.2 -> 0.3, 1.1, and back).

Every conversion goes through the normalized model: the manifest is read, its
0.2-form document is rewritten into the wanted spelling, and the result is read
back and compared with the original. Only a rewrite that gives the same model is
returned; anything the other form cannot say (a 1.1 router choice between
``[targets.oci]`` and ``[execution]``, a second named target in 1.1...) is refused
by name, never approximated. Comments are not carried over (TOML parsers drop
them); the CLI says so and shows a diff before anything is written.
"""

from __future__ import annotations

import copy
from typing import Any

import tomli_w

from pipeline.errors import E_MANIFEST, AtoError
from pipeline.manifest import generations
from pipeline.manifest.model import Manifest
from pipeline.manifest.reader import parse_manifest

TARGETS = ("0.2", "0.3", "1.1")
_HEAD = ("schema_version", "name", "version", "type", "default_target")
_ROUTES_11 = ("oci", "wasm", "source")


def upgrade(manifest: Manifest, to: str) -> str:
    """The text of ``manifest`` written in generation ``to``; it reads back to the same model."""
    if to not in TARGETS:
        raise AtoError("E100", f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to in ("0.2", "0.3"):
        doc = _from_execution(manifest) if manifest.form == "1.1" else copy.deepcopy(manifest.normalized())
        doc["schema_version"] = "0.2"
        if to == "0.3":
            doc = _to_03(doc)
    else:
        doc = _to_11(manifest)
    text = render(doc)
    try:
        again = parse_manifest(text, manifest.path, strict=False)
    except AtoError as err:
        raise AtoError(E_MANIFEST, f"{manifest.path.name}: cannot be written as schema_version {to!r}: the result "
                                   f"would not be valid there ({err.message})",
                       details={"file": manifest.path.name, "to": to, "reason": err.message}) from None
    if view(again) != view(manifest):
        raise AtoError(E_MANIFEST, f"{manifest.path.name}: cannot be written as schema_version {to!r} without "
                                   f"changing what it means ({_first_difference(view(manifest), view(again))})",
                       details={"file": manifest.path.name, "to": to})
    return text


def view(manifest: Manifest) -> dict[str, Any]:
    """What must survive a conversion: the normalized model with the runnable target under one name."""
    if manifest.form == "1.1":
        doc = copy.deepcopy(manifest.normalized())
        primary = doc.pop("execution")
        alternatives = doc.pop("targets", {})
        if not alternatives:
            primary.setdefault("runtime", _router_runtime(primary))
    else:
        doc = copy.deepcopy(manifest.normalized())
        alternatives = doc.pop("targets")
        primary = alternatives.pop(doc.pop("default_target"))
    doc.pop("schema_version")
    doc["primary"] = {k: v for k, v in primary.items()}
    doc["alternatives"] = alternatives
    return doc


def render(doc: dict[str, Any]) -> str:
    """TOML with the identifying keys first, in a stable order."""
    ordered = {k: doc[k] for k in _HEAD if k in doc}
    ordered.update({k: doc[k] for k in sorted(doc) if k not in ordered})
    return tomli_w.dumps(ordered)


def _to_03(doc: dict[str, Any]) -> dict[str, Any]:
    """0.2-form document -> 0.3 named targets: entrypoint (+ cmd) become ``run``."""
    out = copy.deepcopy(doc)
    out["schema_version"] = generations.V03
    for table in out.get("targets", {}).values():
        entrypoint = table.pop("entrypoint", None)
        cmd = table.pop("cmd", None)
        if entrypoint is not None:
            table["run"] = [entrypoint, *cmd] if cmd else entrypoint
        elif cmd:
            table["run"] = list(cmd)
    return out


def _to_11(manifest: Manifest) -> dict[str, Any]:
    if manifest.form == "1.1":
        doc = copy.deepcopy(manifest.normalized())
        doc["schema_version"] = generations.V11
        return doc
    doc = copy.deepcopy(manifest.normalized())
    targets = doc.pop("targets")
    default = doc.pop("default_target")
    others = sorted(label for label in targets if label != default)
    for label in others:
        if label not in _ROUTES_11:
            raise AtoError(E_MANIFEST, f"{manifest.path.name}: targets.{label}: the 1.1 form has one [execution] "
                                       "and only [targets.oci|wasm|source] beside it; this target has no place there",
                           details={"file": manifest.path.name, "key": f"targets.{label}", "to": "1.1"})
    doc["schema_version"] = generations.V11
    doc["execution"] = targets[default]
    if others:
        doc["targets"] = {label: targets[label] for label in others}
    return doc


def _from_execution(manifest: Manifest) -> dict[str, Any]:
    """1.x -> 0.2 form: possible when ``[execution]`` stands alone (0.2 has no router order between targets)."""
    doc = copy.deepcopy(manifest.normalized())
    alternatives = doc.pop("targets", {})
    if alternatives:
        label = sorted(alternatives)[0]
        raise AtoError(E_MANIFEST, f"{manifest.path.name}: targets.{label}: the router chooses between [execution] "
                                   "and its [targets.oci|wasm|source] alternatives at run time; the 0.2 and 0.3 forms "
                                   "run one named target, so this cannot be written there",
                       details={"file": manifest.path.name, "key": f"targets.{label}"})
    execution = doc.pop("execution")
    execution.setdefault("runtime", _router_runtime(execution))
    doc["targets"] = {"app": execution}
    doc["default_target"] = "app"
    return doc


def _router_runtime(execution: dict[str, Any]) -> str:
    """What the 1.1 router picks for a lone ``[execution]`` without runtime: wasm for a module, else source."""
    entry = str(execution.get("entrypoint", "")).split(" ")[0]
    return "wasm" if entry.endswith((".wasm", ".wat")) else "source"


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{(path + '.' if path else '') + key} is {'added' if key not in a else 'lost'}"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], (path + "." if path else "") + key)
    return f"{path or 'the document'} differs"
