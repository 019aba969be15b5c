"""``ato config get|set|unset|list`` over ``$ATO_HOME/config.toml`` (see :mod:`pipeline.config`),
plus ``ato config engine ...`` (the sandbox engines, :mod:`pipeline.cli.engine`)."""

from __future__ import annotations

from typing import Any

import click

from pipeline import config, paths
from pipeline.cli.common import emit, json_option
from pipeline.cli.help import examples, group
from pipeline.errors import E_USAGE, AtoError

SCHEMA_VERSION = "1"


def _effective(key: str, doc: dict[str, Any] | None = None) -> config.Resolved:
    return config.registry() if key == "registry" else config.resolve(key, doc=doc)


def _row(r: config.Resolved) -> dict[str, Any]:
    s = config.SETTINGS.get(r.key)
    return {"key": r.key, "value": r.value, "origin": r.origin,
            "env": list(s.env) if s else [], "default": s.default if s else None}


def _doc(action: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "action": action, "path": str(paths.config_path()),
            "settings": rows, **extra}


def _flatten(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


@group("config", epilog=examples("ato config set registry http://127.0.0.1:18787",
                                 "ato config list --show-origin"))
def config_group() -> None:
    """Show and change settings (config.toml) and sandbox engines.

    Settings live in $ATO_HOME/config.toml: the default registry, the Store URLs, output options.

    Every setting follows one precedence: command-line flag > environment variable >
    config.toml > built-in default. `ato config list --show-origin` shows which one won.
    """


@config_group.command("get", epilog=examples("ato config get registry", "ato config get output.color --show-origin"))
@click.argument("key")
@click.option("--show-origin", is_flag=True, help="Also print where the value comes from.")
@json_option
def get_cmd(key: str, show_origin: bool) -> None:
    """Print the effective value of KEY (empty when it has none)."""
    config.setting(key)
    r = _effective(key)
    value = r.value or ""
    emit(_doc("get", [_row(r)]), "config", f"{r.origin}\t{value}" if show_origin else value)


@config_group.command("set", epilog=examples("ato config set registry http://127.0.0.1:18787",
                                             "ato config set output.progress never"))
@click.argument("key")
@click.argument("value")
@json_option
def set_cmd(key: str, value: str) -> None:
    """Write KEY = VALUE to config.toml (atomically)."""
    s = config.setting(key)
    if s.url:
        from pipeline.names import RegistryUrlError, normalize_registry_url

        try:
            value = normalize_registry_url(value)
        except RegistryUrlError as exc:
            raise AtoError(E_USAGE, f"{key}: {exc}") from None
    config.set_value(key, value)
    r = _effective(key)
    human = f"{key} = {value}"
    if r.origin != "config":  # a flag or an environment variable still overrides the file in this shell
        human += f"\n  note: {r.origin} overrides it here (effective value {r.value})"
    emit(_doc("set", [_row(r)], changed=True), "config", human)


@config_group.command("unset", epilog=examples("ato config unset registry"))
@click.argument("key")
@json_option
def unset_cmd(key: str) -> None:
    """Remove KEY from config.toml.

    The environment variable or the built-in default applies again.
    """
    removed = config.unset(key)
    r = _effective(key)
    human = f"removed {key}" if removed else f"{key} was not set in {paths.config_path()}"
    emit(_doc("unset", [_row(r)], changed=removed), "config", human)


@config_group.command("list", epilog=examples("ato config list", "ato config list --show-origin --json"))
@click.option("--show-origin", is_flag=True, help="Show where each value comes from (flag, env:NAME, config, "
                                                  "default).")
@json_option
def list_cmd(show_origin: bool) -> None:
    """Show every setting's effective value and the rest of config.toml."""
    doc = config.read()
    rows = [_row(_effective(key, doc)) for key in config.SETTINGS]
    others = [(k, v if isinstance(v, str | int | float | bool | list) else str(v))
              for k, v in _flatten(doc) if k not in config.SETTINGS]
    lines = []
    for row in rows:
        shown = "" if row["value"] is None else row["value"]
        lines.append(f"{row['origin']:<26} {row['key']} = {shown}" if show_origin else f"{row['key']} = {shown}")
    for k, v in others:
        lines.append(f"{'config':<26} {k} = {v}" if show_origin else f"{k} = {v}")
    emit(_doc("list", rows, other={k: v for k, v in others}), "config", "\n".join(lines))


def register(group_: click.Group) -> None:
    """Attach ``ato config`` (with ``ato config engine``) to the ato group."""
    from pipeline.cli.engine import config_engine

    config_group.add_command(config_engine)
    group_.add_command(config_group)
