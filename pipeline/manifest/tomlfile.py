"""TOML files: read and parse with errors that say where the syntax broke.

tomllib (3.11) reports the position only inside its message text, so it is
pulled out here and put both in the one-line message and in the details.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pipeline import nesting
from pipeline.errors import E_TOML_PARSE, AtoError

_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


def parse_toml(text: str, file: str) -> dict[str, Any]:
    """Parse ``text``; a syntax error is E001 naming the file, line and column; deep nesting is E004."""
    try:
        return nesting.check(tomllib.loads(text), file)
    except RecursionError:
        raise nesting.too_deep(file) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _POSITION.search(message)
        reason = message[: match.start()] if match else message
        details: dict[str, Any] = {"file": file}
        if match and match.group(1):
            line, column = int(match.group(1)), int(match.group(2))
            where = f"line {line}, column {column}"
            details.update(line=line, column=column)
        else:
            where = "end of document"
        raise AtoError(E_TOML_PARSE, f"{file}: {where}: invalid TOML: {reason}", details=details) from None


def read_text(path: Path) -> str:
    """The file's text; unreadable or non-UTF-8 content is E001, never a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AtoError(E_TOML_PARSE, f"{path.name}: cannot read {path}: {exc.strerror or exc}",
                       details={"file": path.name, "path": str(path)}) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AtoError(E_TOML_PARSE, f"{path.name}: invalid TOML: not UTF-8 (byte {exc.start})",
                       details={"file": path.name, "path": str(path)}) from None
