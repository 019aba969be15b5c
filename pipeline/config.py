"""User configuration: ``$ATO_HOME/config.toml`` and the one precedence every setting follows.

    command-line flag  >  environment variable  >  config.toml  >  built-in default

:data:`SETTINGS` names every key ``ato config get|set|unset|list`` knows; :func:`resolve` gives a
setting's value together with where it came from (``ato config list --show-origin``). The file
also holds the sandbox engines (``[engines.<name>]``, ``default_engine``), which
``ato config engine ...`` writes; every write goes through :func:`update` (a lock, then temp
file + fsync + rename), so no reader sees half a file and concurrent writers do not lose keys.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import tomli_w

from cas.atomic import write_bytes_atomic
from cas.filelock import flocked
from pipeline import nesting, paths
from pipeline.errors import E_MANIFEST, E_USAGE, AtoError

DEFAULT_STORE_API = "https://api.ato.run"
DEFAULT_STORE_SITE = "https://store.ato.run"


@dataclass(frozen=True)
class Setting:
    """One key of config.toml: its environment variables, default and allowed values."""

    key: str  # dotted: "output.color" is [output] color
    env: tuple[str, ...]
    default: str | None
    help: str
    choices: tuple[str, ...] = ()
    url: bool = False


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("registry", ("ATO_REGISTRY",), None,
            "registry that search, install, run, fetch, inspect and publish use when --registry is not given "
            "(unset: store_url; publish: the manifest's [store] registry, else your Personal Dock)", url=True),
    Setting("store_url", ("ATO_STORE_API_URL",), DEFAULT_STORE_API,
            "the Store API: login, Personal Dock, sources, and the registry when `registry` is unset", url=True),
    Setting("store_site_url", ("ATO_STORE_SITE_URL",), DEFAULT_STORE_SITE, "the Store web site (Dock pages)",
            url=True),
    Setting("output.color", ("ATO_COLOR",), "auto",
            "colour and emoji: auto (a terminal only), always, never; NO_COLOR=1 always means never",
            choices=("auto", "always", "never")),
    Setting("output.progress", ("ATO_PROGRESS",), "auto",
            "progress bars for build, publish, install and downloads: auto (a terminal, without --json), never",
            choices=("auto", "never")),
    Setting("payload.max_bytes", ("ATO_MAX_PAYLOAD_BYTES",), str(200 * 1024 * 1024),
            "the largest decoded payload (bytes) verify, publish, install, fetch, finalize, project, run and "
            "`ato registry serve` accept without --force-large-payload"),
)}


@dataclass(frozen=True)
class Resolved:
    """A setting's effective value and its origin: ``flag``, ``env:<NAME>``, ``config`` or ``default``."""

    key: str
    value: str | None
    origin: str


def _unknown(key: str) -> AtoError:
    return AtoError(E_USAGE, f"unknown configuration key {key!r}",
                    hint=f"known keys: {', '.join(SETTINGS)} (see `ato config list`)")


def setting(key: str) -> Setting:
    try:
        return SETTINGS[key]
    except KeyError:
        raise _unknown(key) from None


def read() -> dict[str, Any]:
    """The parsed config.toml ({} when there is none); a file that is not TOML is an error, not ignored."""
    path = paths.config_path()
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise AtoError(E_MANIFEST, f"{path}: cannot be read: {exc}", details={"file": str(path)}) from None
    try:
        return nesting.check(tomllib.loads(text), str(path))
    except RecursionError:
        raise nesting.too_deep(str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise AtoError(E_MANIFEST, f"{path}: not valid TOML: {exc}", details={"file": str(path)},
                       hint="fix or remove the file; `ato config list` shows what it should hold") from None


def _lookup(doc: dict[str, Any], key: str) -> Any:
    node: Any = doc
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def from_file(key: str, doc: dict[str, Any] | None = None) -> str | None:
    value = _lookup(read() if doc is None else doc, key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a number written as a TOML integer (payload.max_bytes = 1073741824)
    return value if isinstance(value, str) and value.strip() else None


def resolve(key: str, flag: str | None = None, doc: dict[str, Any] | None = None) -> Resolved:
    """The effective value of ``key``: ``flag`` > its environment variables > config.toml > default."""
    s = setting(key)
    if flag:
        return Resolved(key, flag, "flag")
    if key == "output.color" and os.environ.get("NO_COLOR"):
        return Resolved(key, "never", "env:NO_COLOR")
    for name in s.env:
        value = (os.environ.get(name) or "").strip()
        if value:
            return Resolved(key, value, f"env:{name}")
    value = from_file(key, doc)
    if value is not None:
        return Resolved(key, value, "config")
    return Resolved(key, s.default, "default")


def registry(flag: str | None = None, *, fallback: bool = True) -> Resolved:
    """The registry a command talks to: ``--registry`` > ATO_REGISTRY > ``registry`` in config.toml >
    the Store (``store_url``). With ``fallback=False`` (publish) there is no Store default: value None."""
    chosen = resolve("registry", flag)
    if chosen.value or not fallback:
        return chosen
    store = resolve("store_url")
    return Resolved("registry", store.value, store.origin)


def store_api_url() -> str:
    return str(resolve("store_url").value).rstrip("/")


def store_site_url() -> str:
    return str(resolve("store_site_url").value).rstrip("/")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with flocked(paths.config_path().with_name("config.lock")):
        yield


def update(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to config.toml under the lock and write it atomically; returns the new document."""
    with _locked():
        doc = read()
        change(doc)
        write_bytes_atomic(paths.config_path(), tomli_w.dumps(doc).encode("utf-8"))
    return doc


def set_value(key: str, value: str) -> None:
    s = setting(key)
    if s.choices and value not in s.choices:
        raise AtoError(E_USAGE, f"{key} must be one of {', '.join(s.choices)}, got {value!r}")

    def change(doc: dict[str, Any]) -> None:
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    update(change)


def unset(key: str) -> bool:
    """Remove ``key`` from config.toml; True when it was there."""
    setting(key)
    removed = False

    def change(doc: dict[str, Any]) -> None:
        nonlocal removed
        parts = key.split(".")
        trail = [doc]
        for part in parts[:-1]:
            child = trail[-1].get(part)
            if not isinstance(child, dict):
                return
            trail.append(child)
        removed = trail[-1].pop(parts[-1], None) is not None
        for parent, part in zip(reversed(trail[:-1]), reversed(parts[:-1]), strict=True):
            if not parent[part]:
                del parent[part]  # drop the tables the key leaves empty
    update(change)
    return removed
