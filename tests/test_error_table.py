"""The one table of error codes: every code the program can raise is in it, and the README shows it."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
from pathlib import Path

import pytest

from pipeline import errors
from pipeline.errors import CODES, AtoError, exit_status, printable

ROOT = Path(__file__).resolve().parents[1]
CODE_LIKE = re.compile(r"^(E\d{3}|ATO_ERR_[A-Z_]+)$")


def _source_files() -> list[Path]:
    return [p for top in ("pipeline", "stages", "cas") for p in (ROOT / top).rglob("*.py")]


def test_every_code_string_in_the_source_is_in_the_table() -> None:
    known = set(CODES) | {row.diagnostic for row in CODES.values() if row.diagnostic}
    unknown = set()
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE_LIKE.match(node.value):
                if node.value not in known:
                    unknown.add(f"{path.relative_to(ROOT)}: {node.value}")
    assert not unknown, sorted(unknown)


def test_every_named_code_constant_is_in_the_table() -> None:
    names = {n: v for n, v in vars(errors).items() if n.startswith("E_") and isinstance(v, str)}
    assert names
    assert {n: v for n, v in names.items() if v not in CODES} == {}


def test_raise_sites_never_name_an_exit_status() -> None:
    offenders = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and any(k.arg == "exit_code" for k in node.keywords):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name.endswith("Error"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    with pytest.raises(TypeError):
        AtoError("E002", "x", exit_code=5)  # type: ignore[call-arg]


def test_exit_status_follows_the_code() -> None:
    assert AtoError("E900", "down").exit_code == 3
    assert AtoError("ATO_ERR_RUNTIME_LAUNCH_FAILED", "x").exit_code == 5
    assert AtoError("E999", "bug").exit_code == 2
    assert AtoError("E002", "bad").exit_code == 1
    assert exit_status("NOT_A_CODE") == 2  # an unknown code is a bug, never a silent user error


def test_readme_table_is_the_code_table() -> None:
    text = (ROOT / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in CODES:
            rows[cells[0]] = int(cells[1])
    assert rows == {code: row.exit for code, row in CODES.items()}


def test_control_characters_in_messages_are_escaped() -> None:
    line = AtoError("E002", "name 'a\x00b\x1b[31m' is invalid").human_line()
    assert "\x00" not in line and "\x1b" not in line
    assert "a\\x00b\\x1b[31m" in line
    assert printable("tab\tok") == "tab\tok"


def _module_constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def test_every_code_a_raise_site_names_is_in_the_table() -> None:
    """The code an AtoError (or a Problem line) carries is what users see: it must be a documented one,
    whether the site spells it as a literal, a module constant or one of errors.py's names."""
    named = {n: v for n, v in vars(errors).items() if isinstance(v, str)}
    unknown = []
    for path in _source_files():
        tree = ast.parse(path.read_text(), str(path))
        consts = {**named, **_module_constants(tree)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in ("AtoError", "Problem", "RegistryHttpError", "VersionConflict"):
                continue
            first = node.args[0]
            code = first.value if isinstance(first, ast.Constant) else \
                consts.get(first.id) if isinstance(first, ast.Name) else \
                named.get(first.attr) if isinstance(first, ast.Attribute) else None
            if isinstance(code, str) and code not in CODES:
                unknown.append(f"{path.relative_to(ROOT)}:{node.lineno}: {code}")
    assert unknown == []


def test_bidi_overrides_and_c1_controls_are_escaped_too() -> None:
    assert printable("evil\u202etxt.exe\x9b") == "evil\\u202etxt.exe\\x9b"
    text = errors.terminal_safe_json('{"m": "a\u202eb\x9bc"}')
    assert "\u202e" not in text and "\x9b" not in text and json.loads(text) == {"m": "a\u202eb\x9bc"}


@pytest.mark.parametrize("number,code", [(errno.ENOSPC, "E211"), (errno.EDQUOT, "E211"),
                                         (errno.ENAMETOOLONG, "E108")])
def test_os_failures_the_user_can_fix_have_their_own_codes(number: int, code: str) -> None:
    err = errors.from_os_error(OSError(number, os.strerror(number), "/x/" + "n" * 300))
    assert err is not None and err.code == code and err.exit_code == 1
    assert errors.from_os_error(OSError(errno.EIO, "io")) is None
    assert errors.from_os_error(ValueError("x")) is None


def test_network_failures_have_one_code() -> None:
    assert errors.network_error("http://h", ConnectionRefusedError("refused")).code == "E900"
    assert errors.http_error("http://h", 404).code == "E900" and errors.http_error("http://h", 503).code == "E901"
    assert "ATO_ERR_NETWORK" not in CODES
