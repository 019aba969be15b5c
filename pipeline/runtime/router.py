"""The runtime router: which runtime, driver and tier run a manifest (seed 003's table).

An explicit choice wins: ``--target <label>``, a target's ``runtime``, or the 1.1
``execution.runtime``. Otherwise the default order is oci -> wasm -> source:
``targets.oci.image`` present -> oci; ``targets.wasm`` present or a ``.wasm``
entrypoint -> wasm; else source. Drivers not written down are inferred from the
entrypoint; the tier follows seed 000's list.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from pipeline.errors import E_MANIFEST, AtoError
from pipeline.manifest import Manifest, Target

TIER1 = {("web", "static"), ("web", "node"), ("web", "deno"), ("source", "node"), ("source", "deno"),
         ("wasm", "wasmtime")}
TIER2 = {("web", "python"), ("source", "python"), ("source", "native")}
WASM_SUFFIXES = (".wasm", ".wat")


@dataclass(frozen=True)
class Route:
    runtime: str  # oci | wasm | source | web
    driver: str  # static | node | deno | python | native | wasmtime ("" for oci)
    tier: int | None  # 1 or 2; None for oci (isolated by the container engine)
    target: Target
    label: str
    reason: str

    @property
    def pair(self) -> str:
        return f"{self.runtime}/{self.driver}" if self.driver else self.runtime


def _first_word(target: Target) -> str:
    if target.cmd:
        return target.cmd[0]
    if target.entrypoint:
        try:
            words = shlex.split(target.entrypoint)
        except ValueError:
            words = target.entrypoint.split()
        return words[0] if words else ""
    return ""


def infer_driver(runtime: str, target: Target, services_cmds: list[str] | None = None) -> str:
    if runtime == "wasm":
        return "wasmtime"
    if runtime == "oci":
        return ""
    language = (target.language or "").lower()
    word = _first_word(target)
    base = word.rsplit("/", 1)[-1].lower()
    if base in ("node", "nodejs") or base.endswith((".js", ".mjs", ".cjs")):
        return "node"
    if base == "deno" or base.endswith((".ts", ".tsx")):
        return "deno"
    if base in ("python", "python3", "py", "uv") or base.endswith(".py"):
        return "python"
    if language in ("node", "nodejs", "javascript", "js"):
        return "node"
    if language in ("deno", "typescript", "ts"):
        return "deno"
    if language in ("python", "python3", "py"):
        return "python"
    for cmd in services_cmds or ():
        head = cmd.split()[0].rsplit("/", 1)[-1] if cmd.split() else ""
        if head in ("node", "deno", "python", "python3", "uv"):
            return {"python3": "python", "uv": "python"}.get(head, head)
    return "native"


def tier_of(runtime: str, driver: str) -> int | None:
    if runtime == "oci":
        return None
    if (runtime, driver) in TIER1:
        return 1
    if (runtime, driver) in TIER2:
        return 2
    raise AtoError("ATO_ERR_POLICY_VIOLATION", f"unable to derive a tier for runtime={runtime} driver={driver}")


def _merge(base: Target, over: Target | None) -> Target:
    """A route alternative (``[targets.oci]``) filled in from ``[execution]`` where it is silent."""
    if over is None:
        return base
    fields = {}
    for f in dataclasses.fields(Target):
        value = getattr(over, f.name)
        fields[f.name] = value if value not in (None, (), {}, "") else getattr(base, f.name)
    return Target(**fields)


def route(manifest: Manifest, explicit_target: str | None = None) -> Route:
    """Pick the target and runtime; raise E002 naming the declared labels when the choice is unknown."""
    services_cmds = [s.entrypoint or (s.cmd if isinstance(s.cmd, str) else " ".join(s.cmd or ()))
                     for s in manifest.services.values()]
    all_targets = manifest.all_targets()
    if explicit_target:
        target = all_targets.get(explicit_target)
        if target is None:
            raise AtoError(E_MANIFEST, f"target '{explicit_target}' not found under [targets] (declared: "
                                       f"{', '.join(all_targets) or 'none'})", details={"target": explicit_target})
        if target.label == "execution" and target.runtime is None:
            # naming [execution] itself skips the oci/wasm alternatives beside it
            wasm = (target.entrypoint or "").split(" ")[0].endswith(WASM_SUFFIXES)
            return _finish("wasm" if wasm else "source", target, services_cmds, "--target execution")
        runtime = target.runtime or explicit_target
        if manifest.execution is not None and target.label in ("oci", "wasm", "source"):
            target = _merge(manifest.execution, target)
        return _finish(runtime, target, services_cmds, f"--target {explicit_target}")
    if manifest.execution is None and manifest.platforms:
        return _tool_platform(manifest, services_cmds)
    if manifest.execution is None:
        target = manifest.primary_target()
        assert target.runtime is not None
        return _finish(target.runtime, target, services_cmds,
                       f"default_target={target.label} (targets.{target.label}.runtime={target.runtime})")
    execution = manifest.execution
    if execution.runtime:
        if execution.runtime in ("oci", "wasm"):
            target = _merge(execution, manifest.targets.get(execution.runtime))
        else:
            target = execution
        return _finish(execution.runtime, target, services_cmds, f"execution.runtime={execution.runtime}")
    return _default_order(manifest, services_cmds, "router default order oci -> wasm -> source")


def _tool_platform(manifest: Manifest, services_cmds: list[str]) -> Route:
    """A tool with ``[platforms]``: the target of this host's platform, never another's binary."""
    from pipeline.manifest.platforms import host_platform

    host = host_platform()
    target = manifest.targets.get(host)
    if target is None:
        raise AtoError("ATO_ERR_COMPAT_HARDWARE", f"{manifest.name} has no program for this platform ({host}); it "
                                                  f"ships: {', '.join(sorted(manifest.platforms)) or 'none'}",
                       details={"platform": host, "platforms": sorted(manifest.platforms)})
    return _finish(target.runtime or "source", target, services_cmds, f"type=tool: platforms.{host}")


def _default_order(manifest: Manifest, services_cmds: list[str], why: str) -> Route:
    execution = manifest.execution
    assert execution is not None
    oci = manifest.targets.get("oci")
    if oci is not None and oci.image:
        return _finish("oci", _merge(execution, oci), services_cmds, f"{why}: targets.oci.image present")
    wasm = manifest.targets.get("wasm")
    if wasm is not None:
        return _finish("wasm", _merge(execution, wasm), services_cmds, f"{why}: targets.wasm present")
    if (execution.entrypoint or "").split(" ")[0].endswith(WASM_SUFFIXES):
        return _finish("wasm", execution, services_cmds, f"{why}: entrypoint is a wasm module")
    return _finish("source", execution, services_cmds, f"{why}: source")


def _finish(runtime: str, target: Target, services_cmds: list[str], reason: str) -> Route:
    driver = target.driver or infer_driver(runtime, target, services_cmds)
    if runtime == "source" and driver == "wasmtime":
        runtime = "wasm"
    return Route(runtime=runtime, driver=driver, tier=tier_of(runtime, driver), target=target,
                 label=target.label, reason=reason)
