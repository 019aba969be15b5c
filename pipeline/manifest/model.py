"""The typed manifest: what every stage reads instead of the raw TOML.

One model serves both capsule.toml forms (0.2 ``[targets.<label>]`` and 1.1
``[execution]``), so build, run and inspect never branch on the form except
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

    @property
    def form(self) -> str:
        """``"0.2"`` or ``"1.1"`` (a 1.0 file is read as the 1.1 form)."""
        return FORM_02 if self.schema_version == FORM_02 else FORM_11

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
        """The TOML as written into the artifact: keys sorted, ``[distribution]`` dropped, dates as text.

        ``[distribution]`` is the build's own output, so a manifest read back from an
        artifact normalizes to the same document as its source; dates become RFC 3339
        strings because the canonical JSON the build hashes has no date type.
        """
        return _normalize({k: v for k, v in self.raw.items() if k != "distribution"})


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalize(value[k]) for k in sorted(value) if value[k] is not None}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value if v is not None]
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    return value
