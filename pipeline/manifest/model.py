"""The typed manifest: what every stage reads instead of the raw TOML.

One model serves every capsule.toml generation: 0.2 ``[targets.<label>]``, 0.3
(flat or named targets), the v1 authoring form (``schema_version = "1"``) and
1.0/1.1 ``[execution]``. The 0.3 and v1 readers translate their documents into the
0.2 form first, so build, run and inspect never branch on the generation except
through :meth:`Manifest.primary_target`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.manifest.delivery import DeliveryMeta

FORM_02 = "0.2"
FORM_11 = "1.1"
DEFAULT_TYPE = "app"


@dataclass(frozen=True)
class Target:
    """One way to run the capsule: a ``[targets.<label>]`` table or the 1.1 ``[execution]``."""

    label: str
    runtime: str | None  # source | web | oci | wasm; None only for a 1.1 [execution] that lets the router pick
    driver: str | None = None
    entrypoint: str | None = None
    cmd: tuple[str, ...] = ()
    port: int | None = None
    required_env: tuple[str, ...] = ()  # required_env plus the legacy env.ATO_ORCH_REQUIRED_ENVS list
    runtime_version: str | None = None
    runtime_tools: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # without ATO_ORCH_REQUIRED_ENVS
    image: str | None = None
    source_digest: str | None = None
    public: tuple[str, ...] = ()  # deprecated for runtime=web; kept only to warn
    language: str | None = None
    working_dir: str | None = None
    digest: str | None = None  # wasm module digest
    readiness_probe: dict[str, Any] | None = None
    needs: tuple[str, ...] = ()  # dependency aliases (or sibling targets) that must be ready first
    bind: str | None = None  # v1 [web] bind: the address the app itself listens on
    secret_env: tuple[str, ...] = ()  # names declared secret (0.3 config_schema, v1 [config] kind = "secret")
    optional_env: tuple[str, ...] = ()  # declared settings that are not required (config_schema required = false)


@dataclass(frozen=True)
class Service:
    """A resident process of the services DAG."""

    name: str
    entrypoint: str | None = None
    cmd: tuple[str, ...] | str | None = None
    depends_on: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    readiness_probe: dict[str, Any] | None = None
    target: str | None = None  # orchestration mode: run this named target as the service


@dataclass(frozen=True)
class Task:
    """A terminating step of the DAG (1.1 ``[tasks]``), e.g. ``npm ci`` before a service starts."""

    name: str
    cmd: tuple[str, ...] | str
    depends_on: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildStep:
    """One command ``ato build`` runs in the project before packing (0.3 ``build``, v1 ``[[build.steps]]``).

    A string runs under ``/bin/sh -c`` (the 0.3 form is a command line); an array is argv.
    """

    command: str | tuple[str, ...]
    key: str  # where it was declared (key path in the source manifest), for messages
    working_dir: str | None = None  # relative to the project


@dataclass(frozen=True)
class PackRules:
    """``[pack]``: ``include`` is a strict allowlist when given; ``exclude`` adds to the defaults."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A validated capsule.toml."""

    path: Path
    project_dir: Path
    schema_version: str
    name: str
    version: str
    type: str
    default_target: str | None
    targets: dict[str, Target]
    execution: Target | None
    services: dict[str, Service]
    tasks: dict[str, Task]
    lifecycle_run: str | None
    pack: PackRules
    delivery: DeliveryMeta | None
    metadata: dict[str, Any]
    build: dict[str, Any]
    isolation: dict[str, Any]
    raw: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Generation-independent additions (all default to "none declared").
    generation: str = ""  # the source's generation: 0.2, 0.3, 1 (v1 authoring), 1.0 or 1.1
    build_steps: tuple[BuildStep, ...] = ()
    required_env: tuple[str, ...] = ()  # top-level required_env: the scope of {{env.X}} in [dependencies]
    dependencies: dict[str, Any] = field(default_factory=dict)  # alias -> contracts.Dependency
    contracts: dict[str, Any] = field(default_factory=dict)  # "name@major" -> contracts.Contract
    platforms: dict[str, Any] = field(default_factory=dict)  # type = "tool": "<os>-<arch>" -> {artifact, sha256}
    document: dict[str, Any] | None = None  # the 0.2-form document a 0.3/v1 source was translated into
    hints: dict[str, str] = field(default_factory=dict)  # warning -> "did you mean" suggestion

    @property
    def form(self) -> str:
        """``"0.2"`` (``[targets.<label>]``: 0.2, 0.3 and v1) or ``"1.1"`` (``[execution]``: 1.0 and 1.1)."""
        return FORM_11 if self.schema_version in ("1.0", "1.1") else FORM_02

    def target_table(self, label: str) -> dict[str, Any]:
        """A target's table as the 0.2/1.x document says it (also for 0.3 and v1 sources, translated);
        for keys a driver reads itself rather than through :class:`Target`."""
        doc = self.document if self.document is not None else self.raw
        if label == "execution" and self.execution is not None:
            return dict(doc.get("execution") or {})
        return dict((doc.get("targets") or {}).get(label) or {})

    def warning_lines(self) -> list[str]:
        """The warnings as shown to a person: each with its did-you-mean suggestion, if any."""
        return [f"{w} (did you mean {self.hints[w]}?)" if w in self.hints else w for w in self.warnings]

    def primary_target(self) -> Target:
        """The target a plain build/run uses: ``default_target`` (0.2) or ``[execution]`` (1.1)."""
        if self.execution is not None:
            return self.execution
        assert self.default_target is not None  # guaranteed by validation
        return self.targets[self.default_target]

    def is_native(self) -> bool:
        return self.primary_target().driver == "native"

    def all_targets(self) -> dict[str, Target]:
        """Named targets plus the 1.1 ``[execution]`` (as ``"execution"``), sorted by label."""
        out = dict(self.targets)
        if self.execution is not None:
            out.setdefault(self.execution.label, self.execution)
        return {k: out[k] for k in sorted(out)}

    def normalized(self) -> dict[str, Any]:
        """The normalized model: the TOML written into the artifact (and printed by ``ato validate``).

        Keys sorted, ``[distribution]`` dropped, dates as text, ``type`` filled in. A 0.3 or
        v1 source is stored in the 0.2 form it was translated into, so every generation
        installs and runs through the same reader, and a manifest moved between
        generations by ``ato manifest upgrade`` normalizes to the same document.
        ``[distribution]`` is the build's own output, so a manifest read back from an
        artifact normalizes to the same document as its source; dates become RFC 3339
        strings because the canonical JSON the build hashes has no date type.
        """
        source = self.document if self.document is not None else self.raw
        doc = {k: v for k, v in source.items() if k != "distribution"}
        doc.setdefault("type", DEFAULT_TYPE)
        return _normalize(doc)


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalize(value[k]) for k in sorted(value) if value[k] is not None}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value if v is not None]
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    return value
