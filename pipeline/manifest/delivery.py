"""Native delivery metadata: what ``ato.delivery.toml`` says and where it comes from.

capsule.toml is the source of truth. The contract is, in order of precedence:
inline ``[artifact]`` + ``[finalize]`` (both or neither), else defaults derived
from the native entrypoint (``.app`` -> tauri, darwin/arm64, codesign; ``.AppImage``
/ ``.deb`` -> linux/<host arch>, ato-sign; ``.exe`` -> windows/<host arch>, signtool).
An ``ato.delivery.toml`` sidecar is compatibility input: it must equal that
contract key for key, and only supplies the contract when capsule.toml has none
(command-mode targets). The same validation applies to the copy staged in an
artifact, so install and finalize read it through :meth:`DeliveryMeta.from_toml_dict`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import E_MANIFEST_MISSING
from pipeline.manifest import relpath
from pipeline.manifest.keypath import describe, fail, quote
from pipeline.manifest.tomlfile import parse_toml

SIDECAR_NAME = "ato.delivery.toml"  # at the payload root of a native artifact, and beside capsule.toml
SCHEMA_VERSION = "0.1"
ACCEPTED_SCHEMA_VERSIONS = ("0.1", "exp-0.1")  # exp-0.1 is the legacy spelling, still read
DEFAULT_FRAMEWORK = "tauri"
STAGE = "unsigned"
LINUX_TOOL = "ato-sign"
OSES = ("darwin", "linux", "windows")
ARCHES = ("arm64", "x86_64")
_OS_ALIASES = {"macos": "darwin", "osx": "darwin", "win": "windows"}
_ARCH_ALIASES = {"aarch64": "arm64", "amd64": "x86_64", "x64": "x86_64"}

# codesign: flags allowed bare, and flags that take the next argument (tool args are allowlisted, fail-closed).
_CODESIGN_FLAGS = frozenset({"--deep", "--force", "--strict", "--verbose"})
_CODESIGN_VALUE_FLAGS = frozenset({"--sign", "--options", "--entitlements", "--requirements", "--timestamp",
                                   "--prefix", "--identifier"})
_CODESIGN_NOT_INPUT = frozenset({"--sign", "--timestamp", "--options"})
_SIGNTOOL_FLAGS = frozenset("a as debug nph ph q sm uw v".split())
_SIGNTOOL_VALUE_FLAGS = frozenset("ac c csp d dg di ds du f fd i kc n p p7ce p7co pg r s sha1 t td tr u".split())


@dataclass(frozen=True)
class DeliveryMeta:
    """The resolved native delivery contract (the content of ``ato.delivery.toml``)."""

    schema_version: str
    framework: str
    stage: str
    target: str  # "<darwin|linux|windows>/<arm64|x86_64>", aliases normalized
    input: str  # relative path of the app inside the payload
    finalize_tool: str
    finalize_args: tuple[str, ...]
    origin: str = field(default="inline", compare=False)  # inline | derived | sidecar | artifact

    @property
    def os(self) -> str:
        return self.target.split("/", 1)[0]

    @property
    def arch(self) -> str:
        return self.target.split("/", 1)[1]

    def to_toml_dict(self) -> dict[str, Any]:
        """The normalized ``ato.delivery.toml`` document (stable key order, tomli_w-ready)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "artifact": {"framework": self.framework, "input": self.input, "stage": self.stage,
                         "target": self.target},
            "finalize": {"args": list(self.finalize_args), "tool": self.finalize_tool},
        }

    def fields(self) -> list[tuple[str, Any]]:
        """(key path, value) pairs, the unit in which two contracts are compared."""
        return [("artifact.framework", self.framework), ("artifact.stage", self.stage),
                ("artifact.target", self.target), ("artifact.input", self.input),
                ("finalize.tool", self.finalize_tool), ("finalize.args", list(self.finalize_args))]

    @classmethod
    def from_toml_dict(cls, doc: dict[str, Any], file: str = SIDECAR_NAME, *,
                       origin: str = "artifact") -> DeliveryMeta:
        """Validate a parsed ``ato.delivery.toml`` (sidecar or the copy staged in an artifact)."""
        version = doc.get("schema_version")
        if version is None:
            raise fail(file, ["schema_version"], "required key is missing", code=E_MANIFEST_MISSING)
        if not isinstance(version, str) or version.strip() not in ACCEPTED_SCHEMA_VERSIONS:
            raise fail(file, ["schema_version"], f'expected "0.1" (or legacy "exp-0.1"), got {describe(version)}')
        for table in ("artifact", "finalize"):
            if table not in doc:
                raise fail(file, [table], "required table is missing", code=E_MANIFEST_MISSING)
            if not isinstance(doc[table], dict):
                raise fail(file, [table], f"expected a table, got {describe(doc[table])}")
        artifact, finalize = doc["artifact"], doc["finalize"]
        for key in ("framework", "stage", "target", "input"):
            if key not in artifact:
                raise fail(file, ["artifact", key], "required key is missing", code=E_MANIFEST_MISSING)
        for key in ("tool", "args"):
            if key not in finalize:
                raise fail(file, ["finalize", key], "required key is missing", code=E_MANIFEST_MISSING)
        return build(artifact, finalize, file, origin=origin)


def build(artifact: dict[str, Any], finalize: dict[str, Any], file: str, *, origin: str) -> DeliveryMeta:
    """A checked contract from ``[artifact]``/``[finalize]`` tables (``stage`` defaults to unsigned;
    Linux targets default ``finalize`` to ``ato-sign <input>``)."""
    framework = _string(artifact, "framework", file, ["artifact", "framework"], required=True)
    stage = _string(artifact, "stage", file, ["artifact", "stage"]) or STAGE
    if stage != STAGE:
        raise fail(file, ["artifact", "stage"], f'expected "{STAGE}", got {describe(stage)}')
    target = normalize_target(_string(artifact, "target", file, ["artifact", "target"], required=True),
                              file, ["artifact", "target"])
    raw_input = _string(artifact, "input", file, ["artifact", "input"], required=True)
    reason = relpath.escape_reason(raw_input)
    if reason:
        raise fail(file, ["artifact", "input"], f"{quote(raw_input)} {reason}")
    input_ = relpath.normalize(raw_input)
    if not input_:
        raise fail(file, ["artifact", "input"], "expected a path inside the project, got the project root")
    linux = target.startswith("linux/")
    tool = _string(finalize, "tool", file, ["finalize", "tool"], required=not linux) or LINUX_TOOL
    args_value = finalize.get("args")
    if args_value is None:
        if not (linux and tool == LINUX_TOOL):
            raise fail(file, ["finalize", "args"], "required key is missing", code=E_MANIFEST_MISSING)
        args: tuple[str, ...] = (input_,)
    elif not isinstance(args_value, list) or not all(isinstance(a, str) for a in args_value):
        raise fail(file, ["finalize", "args"], f"expected an array of strings, got {describe(args_value)}")
    else:
        args = tuple(args_value)
    check_finalize(tool, args, input_, file)
    return DeliveryMeta(SCHEMA_VERSION, framework.strip(), stage, target, input_, tool.strip(), args, origin=origin)


def derive(entrypoint: str | None, cmd: tuple[str, ...]) -> DeliveryMeta | None:
    """The canonical contract implied by a native entrypoint, or None (command mode, plain programs)."""
    ep = relpath.normalize(entrypoint or "")
    if not ep or cmd or any(c.isspace() for c in ep):
        return None
    low = ep.lower()
    if low.endswith(".app"):
        return DeliveryMeta(SCHEMA_VERSION, DEFAULT_FRAMEWORK, STAGE, "darwin/arm64", ep, "codesign",
                            ("--deep", "--force", "--sign", "-", ep), origin="derived")
    if low.endswith((".appimage", ".deb")):
        return DeliveryMeta(SCHEMA_VERSION, DEFAULT_FRAMEWORK, STAGE, f"linux/{host_arch()}", ep, LINUX_TOOL,
                            (ep,), origin="derived")
    if low.endswith(".exe"):
        return DeliveryMeta(SCHEMA_VERSION, DEFAULT_FRAMEWORK, STAGE, f"windows/{host_arch()}", ep, "signtool",
                            ("sign", "/fd", "SHA256", ep), origin="derived")
    return None


def resolve(raw: dict[str, Any], native: bool, entrypoint: str | None, cmd: tuple[str, ...],
            label: str, file: str, sidecar_text: str | None) -> DeliveryMeta | None:
    """The delivery contract of a project manifest (None when it has none), sidecar checked."""
    artifact, finalize = raw.get("artifact"), raw.get("finalize")
    if (artifact is None) != (finalize is None):
        have, missing = ("artifact", "finalize") if finalize is None else ("finalize", "artifact")
        raise fail(file, [missing], f"[{have}] is declared without [{missing}]; native delivery metadata "
                                    "needs both tables or neither")
    contract: DeliveryMeta | None = None
    if artifact is not None:
        if not native:
            raise fail(file, ["artifact"], f'[artifact]/[finalize] describe native delivery; targets.{label}.driver '
                                           'must be "native"')
        contract = build(artifact, finalize, file, origin="inline")
    derived = derive(entrypoint, cmd) if native else None
    if contract is not None and derived is not None:
        _compare(contract, derived, file, f"the contract derived from entrypoint {quote(entrypoint)}")
    contract = contract or derived
    if sidecar_text is None:
        return contract
    side = DeliveryMeta.from_toml_dict(parse_toml(sidecar_text, SIDECAR_NAME), SIDECAR_NAME, origin="sidecar")
    if not native:
        raise fail(SIDECAR_NAME, [], f'native delivery metadata, but the {file} target "{label}" is not '
                                     'driver "native"; remove the sidecar')
    if contract is None:
        return side
    _compare(side, contract, SIDECAR_NAME, f"the {file} native target contract")
    return contract


def _compare(candidate: DeliveryMeta, reference: DeliveryMeta, file: str, what: str) -> None:
    for (key, got), (_, want) in zip(candidate.fields(), reference.fields(), strict=True):
        if got != want:
            raise fail(file, key.split("."), f"{_show(got)} does not match {what} ({_show(want)})")


def _show(value: Any) -> str:
    return "[" + ", ".join(quote(v) for v in value) + "]" if isinstance(value, list) else quote(value)


def normalize_target(value: str, file: str, parts: list[str | int]) -> str:
    """``macos/aarch64`` -> ``darwin/arm64``; anything outside darwin|linux|windows x arm64|x86_64 fails."""
    pieces = value.strip().lower().split("/")
    if len(pieces) != 2 or not all(pieces):
        raise fail(file, parts, f'expected "<os>/<arch>" (e.g. "linux/x86_64"), got {describe(value)}')
    os_ = _OS_ALIASES.get(pieces[0], pieces[0])
    arch = _ARCH_ALIASES.get(pieces[1], pieces[1])
    if os_ not in OSES or arch not in ARCHES:
        raise fail(file, parts, f"expected darwin|linux|windows with arm64|x86_64, got {describe(value)}")
    return f"{os_}/{arch}"


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def check_finalize(tool: str, args: tuple[str, ...], input_: str, file: str) -> None:
    """Fail-closed checks on the finalize command (the tool runs on the user's machine)."""
    name = tool.strip()
    if not name:
        raise fail(file, ["finalize", "tool"], "expected a tool name, got an empty string")
    if any(ord(c) < 32 or ord(c) == 127 or c.isspace() for c in name) or "/" in name or "\\" in name:
        raise fail(file, ["finalize", "tool"], f"expected a bare tool name (no path, spaces or control "
                                               f"characters), got {describe(tool)}")
    for i, arg in enumerate(args):
        if not arg.strip():
            raise fail(file, ["finalize", "args", i], "expected a non-empty argument")
    lowered = name.lower()
    if lowered == "codesign":
        _check_codesign(args, input_, file)
    elif lowered == "signtool":
        _check_signtool(args, input_, file)
    elif lowered == LINUX_TOOL and input_ not in args:
        raise fail(file, ["finalize", "args"], f"expected the artifact input {quote(input_)} among the {LINUX_TOOL} "
                                               "arguments")


def _check_codesign(args: tuple[str, ...], input_: str, file: str) -> None:
    seen_input = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _CODESIGN_VALUE_FLAGS:
            if i + 1 >= len(args):
                raise fail(file, ["finalize", "args", i], f"expected a value after {quote(arg)}")
            if arg not in _CODESIGN_NOT_INPUT and args[i + 1] == input_:
                seen_input = True
            i += 2
            continue
        if arg == input_:
            seen_input = True
        elif arg not in _CODESIGN_FLAGS and not arg.startswith("--timestamp="):
            raise fail(file, ["finalize", "args", i], f"{quote(arg)} is not an allowed codesign argument "
                                                      f"(allowed: {', '.join(sorted(_CODESIGN_FLAGS | _CODESIGN_VALUE_FLAGS))}, "
                                                      "and the artifact input)")
        i += 1
    if not seen_input:
        raise fail(file, ["finalize", "args"], f"expected the artifact input {quote(input_)} among the codesign arguments")


def _check_signtool(args: tuple[str, ...], input_: str, file: str) -> None:
    if not args or args[0].lower() != "sign":
        raise fail(file, ["finalize", "args", 0], 'expected the signtool subcommand "sign"')
    seen_input = False
    i = 1
    while i < len(args):
        arg = args[i]
        switch = arg[1:].lower() if arg[:1] in ("/", "-") else None
        if switch in _SIGNTOOL_VALUE_FLAGS:
            if i + 1 >= len(args):
                raise fail(file, ["finalize", "args", i], f"expected a value after {quote(arg)}")
            seen_input = seen_input or args[i + 1] == input_
            i += 2
            continue
        if arg == input_:
            seen_input = True
        elif switch not in _SIGNTOOL_FLAGS:
            raise fail(file, ["finalize", "args", i], f"{quote(arg)} is not an allowed signtool argument")
        i += 1
    if not seen_input:
        raise fail(file, ["finalize", "args"], f"expected the artifact input {quote(input_)} among the signtool arguments")


def _string(table: dict[str, Any], key: str, file: str, parts: list[str | int], *,
            required: bool = False) -> str:
    value = table.get(key)
    if value is None:
        if required:
            raise fail(file, parts, "required key is missing", code=E_MANIFEST_MISSING)
        return ""
    if not isinstance(value, str):
        raise fail(file, parts, f"expected a string, got {describe(value)}")
    if required and not value.strip():
        raise fail(file, parts, "expected a non-empty string")
    return value

