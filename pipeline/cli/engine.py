"""Sandbox engines: `ato config engine install|register|features`, `ato engine register|features`,
and the deprecated `ato setup --engine nacelle`."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, info, json_option, warn
from pipeline.errors import E_USAGE, AtoError


def _install(engine: str, version: str | None) -> None:
    from pipeline.runtime import engines

    info(f"⬇️  downloading {engine} {version or 'latest'} from {engines.release_base()} ...")
    doc = engines.install_engine(engine, version)
    emit({"schema_version": "1", "ok": True, **doc}, "engine-install",
         human=f"✅ Engine {engine} {doc['version']} installed at {doc['path']} (sha256 {doc['sha256']})")


def _register(name: str, path: str | None, make_default: bool) -> None:
    import os

    from pipeline.runtime import engines

    source = "--path"
    if not path:
        path = (os.environ.get("NACELLE_PATH") or "").strip() or None
        source = "NACELLE_PATH"
    if not path:
        bundled = engines.bundled_engine()
        if bundled is None:
            raise AtoError(E_USAGE, "missing --path, NACELLE_PATH is not set, and the bundled engine (ato-nacelle) "
                                    "is not installed")
        path, source = str(bundled), "bundled ato-nacelle"
    resolved = Path(path).expanduser().resolve()
    reason = engines._usable(resolved)
    if reason:
        raise engines.engine_error(f"engine {resolved} {reason}", path=str(resolved))
    features = engines.probe_features(resolved)
    backends = engines.sandbox_backends(features)
    if not backends:
        warn(f"engine {resolved} reports no working sandbox on this host; Tier 2 runs will fail closed")
    config = engines.register_engine(name, resolved, make_default=make_default)
    emit({"schema_version": "1", "ok": True, "name": name, "path": str(resolved), "source": source,
          "default": config.get("default_engine") == name, "sandbox": backends},
         "engine-register", human=f"✅ registered engine {name} -> {resolved}"
                                  f"{' (default)' if config.get('default_engine') == name else ''}")


def _features(path: str | None) -> None:
    import json

    from pipeline.runtime import engines

    engine = engines.discover(path)
    doc = {"schema_version": "1", "path": str(engine.path), "source": engine.source,
           "sandbox": engines.sandbox_backends(engine.features), "features": engine.features}
    emit(doc, "engine-features", human=json.dumps(engine.features, indent=2))


ENGINE_CHOICE = click.option("--engine", default="nacelle", show_default=True, help="Engine to install.")
VERSION = click.option("--version", "version", default=None, metavar="VER", help="Release version (default: latest).")


@click.group("config")
def config_group() -> None:
    """User configuration (engines)."""


@config_group.group("engine")
def config_engine() -> None:
    """Sandbox engines for Tier 2 targets."""


@config_engine.command("install")
@ENGINE_CHOICE
@VERSION
@json_option
def config_engine_install(engine: str, version: str | None) -> None:
    """Download and install an engine, verifying its SHA-256 (fails closed)."""
    _install(engine, version)


def _register_options(fn):
    fn = json_option(fn)
    fn = click.option("--default", "make_default", is_flag=True, help="Make it the default engine.")(fn)
    fn = click.option("--path", default=None, help="Engine executable (default: NACELLE_PATH, else the bundled "
                                                   "bubblewrap engine).")(fn)
    return click.option("--name", default="nacelle", show_default=True)(fn)


@config_engine.command("register")
@_register_options
def config_engine_register(name: str, path: str | None, make_default: bool) -> None:
    """Register an engine executable in config.toml."""
    _register(name, path, make_default)


@config_engine.command("features")
@click.option("--nacelle", default=None, help="Engine to probe (default: the configured one).")
@json_option
def config_engine_features(nacelle: str | None) -> None:
    """Ask the configured engine what it can enforce."""
    _features(nacelle)


@click.group("engine")
def engine_group() -> None:
    """Sandbox engines (short form of `ato config engine`)."""


@engine_group.command("register")
@_register_options
def engine_register(name: str, path: str | None, make_default: bool) -> None:
    """Register an engine executable in config.toml."""
    _register(name, path, make_default)


@engine_group.command("features")
@click.option("--nacelle", default=None, help="Engine to probe (default: the configured one).")
@json_option
def engine_features(nacelle: str | None) -> None:
    """Ask the configured engine what it can enforce."""
    _features(nacelle)


@engine_group.command("install")
@ENGINE_CHOICE
@VERSION
@json_option
def engine_install(engine: str, version: str | None) -> None:
    """Download and install an engine, verifying its SHA-256 (fails closed)."""
    _install(engine, version)


@click.command("setup")
@ENGINE_CHOICE
@VERSION
@json_option
def setup_cmd(engine: str, version: str | None) -> None:
    """Deprecated: use `ato config engine install`."""
    warn("'ato setup' is deprecated. Use 'ato config engine install' instead.")
    _install(engine, version)


def register(group: click.Group) -> None:
    """Attach this module's commands to the ato group."""
    existing = group.commands.get("config")
    if isinstance(existing, click.Group):  # another module owns `config`: add our subgroup to it
        existing.add_command(config_engine)
    else:
        group.add_command(config_group)
    group.add_command(engine_group)
    group.add_command(setup_cmd)
