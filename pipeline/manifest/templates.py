"""Templates: the ``{{ expr }}`` strings of dependency contracts.

The grammar is closed (the reference ato's ``TemplatedString``): ``host``, ``port``,
``socket``, ``state.dir``, ``params.K``, ``credentials.K``, ``env.K``,
``deps.D.runtime_exports.K`` and ``deps.D.identity_exports.K``. Anything else, an
empty ``{{}}``, an unterminated ``{{`` or a stray ``}}`` is an error: an expression
this ato cannot resolve must not reach a process as literal text. There is no
escape. Values are filled in when the provider starts (the IPC issue); here they
are only parsed and checked.
"""

from __future__ import annotations

from dataclasses import dataclass

_SIMPLE = ("host", "port", "socket", "state.dir")
_KEYED = ("params", "credentials", "env")


@dataclass(frozen=True)
class Expr:
    """One ``{{ ... }}``: ``kind`` is host|port|socket|state.dir|params|credentials|env|runtime_exports|
    identity_exports; ``key`` the K; ``dep`` the D of a ``deps.D...`` reference."""

    kind: str
    key: str | None = None
    dep: str | None = None

    def __str__(self) -> str:
        if self.dep is not None:
            return f"deps.{self.dep}.{self.kind}.{self.key}"
        return f"{self.kind}.{self.key}" if self.key is not None else self.kind


class TemplateError(ValueError):
    """A string that is not a valid template (the message says why)."""


def has_template(text: str) -> bool:
    return "{{" in text or "}}" in text


def parse(text: str) -> list[Expr]:
    """The expressions of ``text`` in order; :class:`TemplateError` when it is malformed."""
    out: list[Expr] = []
    rest = text
    while "{{" in rest:
        before, _, after = rest.partition("{{")
        if "}}" in before:
            raise TemplateError("unexpected '}}' without an opening '{{'")
        if "}}" not in after:
            raise TemplateError("unterminated '{{' (no closing '}}')")
        inner, _, rest = after.partition("}}")
        out.append(_expr(inner.strip()))
    if "}}" in rest:
        raise TemplateError("unexpected '}}' without an opening '{{'")
    return out


def _expr(raw: str) -> Expr:
    if not raw:
        raise TemplateError("empty template expression '{{}}'")
    if raw in _SIMPLE:
        return Expr(raw)
    head, _, key = raw.partition(".")
    if head in _KEYED:
        return Expr(head, _key(key, raw))
    if head == "deps":
        for kind in ("runtime_exports", "identity_exports"):
            dep, sep, name = key.partition(f".{kind}.")
            if sep:
                return Expr(kind, _key(name, raw), _key(dep, raw))
    raise TemplateError(f"unsupported template expression '{{{{{raw}}}}}' (allowed: host, port, socket, state.dir, "
                        "params.K, credentials.K, env.K, deps.D.runtime_exports.K, deps.D.identity_exports.K)")


def _key(value: str, raw: str) -> str:
    key = value.strip()
    if not key or any(c.isspace() for c in key) or "{" in key or "}" in key:
        raise TemplateError(f"template expression '{{{{{raw}}}}}' is missing a key")
    return key
