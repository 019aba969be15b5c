"""Sandbox engines: `ato config engine install|register|features`, `ato engine register|features`,
and the deprecated `ato setup --engine nacelle`."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, info, json_mode, json_option, warn
from pipeline.cli.help import examples, group
from pipeline.cli.progress import reporter
from pipeline.errors import E_USAGE, AtoError


def _install(engine: str, version: str | None) -> None:
    from pipeline.runtime import engines

    info(f"⬇️  downloading {engine} {version or 'latest'} from {engines.release_base()} ...")
    with reporter(json=json_mode()) as progress:
        doc = engines.install_engine(engine, version, progress)
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


ENGINE_CHOICE = click.option("--engine", default="nacelle", show_default=True, metavar="NAME",
                             help="Engine to install.")
VERSION = click.option("--version", "version", default=None, metavar="VERSION",
                       help="Release version (default: the latest).")
NACELLE = click.option("--nacelle", default=None, metavar="PATH",
                       help="Engine executable to probe (default: the configured one).")


def _register_options(fn):
    fn = json_option(fn)
    fn = click.option("--default", "make_default", is_flag=True, help="Make it the default engine.")(fn)
    fn = click.option("--path", default=None, metavar="PATH",
                      help="Engine executable (default: NACELLE_PATH, else the bundled bubblewrap engine).")(fn)
    return click.option("--name", default="nacelle", show_default=True, metavar="NAME",
                        help="Name to register it under.")(fn)


def _engine_commands(prefix: str) -> click.Group:
    """The engine verbs, once for `ato config engine` and once for its short form `ato engine`."""

    @group("engine", epilog=examples(f"{prefix} register", f"{prefix} features --json"))
    def engine() -> None:
        """Install, register and probe the sandbox engines of Tier 2 targets."""

    @engine.command("install", epilog=examples(f"{prefix} install", f"{prefix} install --version 0.3.0"))
    @ENGINE_CHOICE
    @VERSION
    @json_option
    def install_cmd(engine: str, version: str | None) -> None:
        """Download and install an engine, verifying its SHA-256 (fails closed)."""
        _install(engine, version)

    @engine.command("register", epilog=examples(f"{prefix} register",
                                                f"{prefix} register --path /opt/nacelle --default"))
    @_register_options
    def register_cmd(name: str, path: str | None, make_default: bool) -> None:
        """Register an engine executable in config.toml."""
        _register(name, path, make_default)

    @engine.command("features", epilog=examples(f"{prefix} features", f"{prefix} features --json"))
    @NACELLE
    @json_option
    def features_cmd(nacelle: str | None) -> None:
        """Ask the configured engine what it can enforce."""
        _features(nacelle)

    return engine


config_engine = _engine_commands("ato config engine")
engine_group = _engine_commands("ato engine")
engine_group.help = "Sandbox engines (the short form of `ato config engine`)."


@click.command("setup", hidden=True, epilog=examples("ato config engine install"))
@ENGINE_CHOICE
@VERSION
@json_option
def setup_cmd(engine: str, version: str | None) -> None:
    """Deprecated: use `ato config engine install`."""
    warn("'ato setup' is deprecated. Use 'ato config engine install' instead.")
    _install(engine, version)


def register(group_: click.Group) -> None:
    """Attach `ato engine` and the deprecated `ato setup` (`ato config engine` is attached by cli.config)."""
    group_.add_command(engine_group)
    group_.add_command(setup_cmd)
