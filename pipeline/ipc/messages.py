"""Message validation at the broker: each exported method's JSON Schemas, applied before forwarding.

A call whose ``args`` break the method's ``input_schema``, or whose result breaks its
``output_schema``, is refused with -32003 and never forwarded (the provider never sees bad
input; the consumer never sees a bad result). :func:`summary` describes a violation by where it
is and which rule it breaks — never by the offending value, which may be a secret and ends up in
the broker's log.
"""

from __future__ import annotations

from typing import Any

from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import validator_for

from pipeline.ipc.protocol import METHOD_NOT_FOUND, SCHEMA_VALIDATION_FAILED, RpcError


def summary(err: ValidationError) -> str:
    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
    rule = "/".join(str(p) for p in err.absolute_schema_path)
    return f"{where}: breaks '{err.validator}' (schema #/{rule})"


def _validator(schema: Any) -> Any:
    if schema is None:
        return None
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class MethodTable:
    """The methods a provider exports, each with its compiled input/output validators."""

    def __init__(self, methods: dict[str, dict[str, Any]]) -> None:
        self._methods: dict[str, tuple[Any, Any]] = {}
        for name, spec in methods.items():
            try:
                self._methods[name] = (_validator(spec.get("input_schema")), _validator(spec.get("output_schema")))
            except SchemaError as exc:
                raise ValueError(f"method {name}: not a valid JSON Schema: {exc.message}") from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def _get(self, method: str) -> tuple[Any, Any]:
        found = self._methods.get(method)
        if found is None:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {method!r} is not exported",
                           f"exported methods: {', '.join(self.names()) or 'none'}")
        return found

    def check_input(self, method: str, args: Any) -> None:
        validator = self._get(method)[0]
        if validator is not None:
            self._check(validator, args, f"args of {method}")

    def check_output(self, method: str, result: Any) -> None:
        validator = self._get(method)[1]
        if validator is not None:
            self._check(validator, result, f"result of {method}")

    @staticmethod
    def _check(validator: Any, value: Any, what: str) -> None:
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            details = "; ".join(summary(e) for e in errors[:5])
            raise RpcError(SCHEMA_VALIDATION_FAILED, f"schema validation failed: {what}: {details}",
                           f"the {what} must match the method's JSON Schema")
