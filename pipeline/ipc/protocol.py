"""The wire: JSON-RPC 2.0, one message per line (``\\n``-terminated UTF-8 JSON), over Unix sockets.

A consumer calls a provider's method through the broker with ``capsule/invoke`` (upstream's
shape)::

    {"jsonrpc": "2.0", "id": 1, "method": "capsule/invoke",
     "params": {"token": "<CAPSULE_IPC_<ALIAS>_TOKEN>", "method": "greet", "args": {"name": "Ada"}}}

and gets the provider's ``result`` (or an ``error``) back with its own ``id``. A request without
``id`` is a notification: checked and forwarded the same way, never answered. A connection may
carry any number of requests; a client that half-closes after one line (upstream's framing)
works too. The broker forwards ``{"jsonrpc": "2.0", "id": <n>, "method": "greet", "params":
{"name": "Ada"}}`` to the provider on a new connection, half-closes it and reads one line back.

Error codes: JSON-RPC's own (-32700 parse error, -32600 invalid request, -32601 method not
found, -32602 invalid params, -32603 internal error) and upstream's (-32001 permission denied:
a missing, wrong, revoked or another consumer's token; -32002 service unavailable; -32003 schema
validation failed; -32004 message too large). Every error carries ``data.hint``.
"""

from __future__ import annotations

import json
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
PERMISSION_DENIED = -32001
SERVICE_UNAVAILABLE = -32002
SCHEMA_VALIDATION_FAILED = -32003
MESSAGE_TOO_LARGE = -32004

MAX_MESSAGE = 1024 * 1024  # one line, without its newline
INVOKE = "capsule/invoke"


class RpcError(Exception):
    """A JSON-RPC error to send back (never a Python traceback)."""

    def __init__(self, code: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint or message


def error_response(msg_id: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": err.code, "message": err.message,
                                                      "data": {"hint": err.hint}}}


def result_response(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def decode(line: bytes) -> dict[str, Any]:
    """One request line -> its object; RpcError for what JSON-RPC 2.0 refuses."""
    if len(line.rstrip(b"\n")) > MAX_MESSAGE:
        raise RpcError(MESSAGE_TOO_LARGE, f"message is larger than {MAX_MESSAGE} bytes")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RpcError(PARSE_ERROR, "parse error: not a JSON message", "send one JSON object per line") from None
    if not isinstance(doc, dict) or doc.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: expected a JSON-RPC 2.0 object ("jsonrpc": "2.0")')
    if not isinstance(doc.get("method"), str) or not doc["method"]:
        raise RpcError(INVALID_REQUEST, "invalid request: method must be a non-empty string")
    if "id" in doc and not (doc["id"] is None or isinstance(doc["id"], str | int) and not isinstance(doc["id"], bool)):
        raise RpcError(INVALID_REQUEST, "invalid request: id must be a string, a number or null")
    return doc
