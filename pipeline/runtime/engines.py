"""Sandbox engines (nacelle): discovery, registration, download with SHA-256 checks, feature probes.

Tier 2 targets run only through an engine that implements the contract in
:mod:`pipeline.runtime.nacelle`. Discovery never searches PATH (a planted
``nacelle`` must not be picked up): ``--nacelle``, then ``NACELLE_PATH``, then the
manifest's ``[engine]``, then the default engine in ``$ATO_HOME/config.toml``.
Nothing found, or a configured engine that does not work, is fail-closed
(ATO_ERR_ENGINE_MISSING).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas.atomic import write_bytes_atomic
from pipeline import config as config_file
from pipeline import paths
from pipeline.errors import E_NETWORK, AtoError, Problem, http_error, network_error
from pipeline.progress import SILENT, Progress, counted

ENGINE_MISSING = "ATO_ERR_ENGINE_MISSING"
COMPAT_HARDWARE = "ATO_ERR_COMPAT_HARDWARE"
INTEGRITY_FAILURE = "ATO_ERR_INTEGRITY_FAILURE"
DEFAULT_RELEASE_BASE = "https://releases.capsule.dev/nacelle"
SUPPORTED_ENGINES = ("nacelle",)
BUNDLED_ENGINE = "ato-nacelle"
CHECKSUM_FILES = ("{binary}.sha256", "SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt")
_HEX64 = re.compile(r"\b([0-9a-fA-F]{64})\b")
_VERSION = re.compile(r"^v?[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")


def engine_error(message: str, **details: Any) -> AtoError:
    details.setdefault("engine", "nacelle")
    return AtoError(ENGINE_MISSING, message, details=details,
                    problems=[Problem(ENGINE_MISSING, message, dict(details))],
                    hint="configure one with `ato engine register`, `--nacelle <path>`, NACELLE_PATH, "
                         "or `ato config engine install --engine nacelle`")


# ------------------------------------------------------------------ config.toml


def read_config() -> dict[str, Any]:
    return config_file.read()


def register_engine(name: str, path: Path, *, make_default: bool) -> dict[str, Any]:
    """Record ``[engines.<name>] path`` (and ``default_engine``) in config.toml, atomically."""
    def change(config: dict[str, Any]) -> None:
        engines = config.setdefault("engines", {})
        engines[name] = {**engines.get(name, {}), "path": str(path)}
        if make_default or not config.get("default_engine"):
            config["default_engine"] = name
    return config_file.update(change)


# ------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class Engine:
    path: Path
    source: str  # flag | env | manifest | config | bundled
    features: dict[str, Any]


def bundled_engine() -> Path | None:
    """Our bubblewrap engine, installed next to the running interpreter as ``ato-nacelle``."""
    candidate = Path(sys.executable).parent / BUNDLED_ENGINE
    return candidate if candidate.is_file() else None


def _usable(path: Path) -> str | None:
    """Why ``path`` cannot be an engine (None when it can)."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


def candidates(flag: str | None, manifest_raw: dict[str, Any] | None, project_dir: Path | None,
               ) -> tuple[Path, str] | None:
    """The one engine the configuration names, by precedence; None when nothing is configured."""
    if flag:
        return Path(flag).expanduser(), "--nacelle"
    env = (os.environ.get("NACELLE_PATH") or "").strip()
    if env:
        return Path(env).expanduser(), "NACELLE_PATH"
    engine_table = (manifest_raw or {}).get("engine")
    config = None
    if isinstance(engine_table, dict):
        rel = engine_table.get("nacelle_path")
        if isinstance(rel, str) and rel.strip() and project_dir is not None:
            return (project_dir / rel).resolve(), "capsule.toml [engine] nacelle_path"
        alias = engine_table.get("source")
        if isinstance(alias, str) and alias.strip():
            config = read_config()
            entry = (config.get("engines") or {}).get(alias)
            if not isinstance(entry, dict) or not entry.get("path"):
                raise engine_error(f"engine alias '{alias}' is not registered; run: ato engine register "
                                   f"--name {alias} --path /abs/path/to/engine", alias=alias)
            return Path(entry["path"]), f"capsule.toml [engine] source={alias}"
    config = config if config is not None else read_config()
    default = config.get("default_engine")
    if isinstance(default, str) and default:
        entry = (config.get("engines") or {}).get(default)
        if isinstance(entry, dict) and entry.get("path"):
            return Path(entry["path"]), f"config default_engine={default}"
    return None


def probe_features(path: Path, timeout: float = 15) -> dict[str, Any]:
    """Run ``<engine> internal --input - features``; raise when it does not answer the contract."""
    try:
        proc = subprocess.run([str(path), "internal", "--input", "-", "features"],
                              input=json.dumps({"spec_version": "0.1.0"}), capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise engine_error(f"engine {path} could not be started: {exc}", path=str(path)) from None
    line = next((x for x in proc.stdout.splitlines() if x.strip()), "")
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if proc.returncode != 0 or not isinstance(doc, dict) or doc.get("ok") is not True:
        raise engine_error(f"engine {path} did not answer the features probe (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[:300]}", path=str(path))
    return doc


def sandbox_backends(doc: dict[str, Any]) -> list[str]:
    caps = doc.get("capabilities") or (doc.get("data") or {}).get("capabilities") or {}
    backends = caps.get("sandbox") if isinstance(caps, dict) else None
    return [str(b) for b in backends] if isinstance(backends, list) else []


def discover(flag: str | None = None, manifest_raw: dict[str, Any] | None = None,
             project_dir: Path | None = None) -> Engine:
    """The configured engine, checked to exist and to offer a working sandbox; fail-closed otherwise."""
    found = candidates(flag, manifest_raw, project_dir)
    if found is None:
        raise engine_error("Tier 2 execution requires the nacelle engine, and none is configured (PATH is "
                           "never searched)", looked_for=["--nacelle", "NACELLE_PATH", "capsule.toml [engine]",
                                                          f"{paths.config_path()} default_engine"])
    path, source = found
    reason = _usable(path)
    if reason:
        raise engine_error(f"Tier 2 execution requires nacelle, but the configured engine is not usable: "
                           f"{path} ({source}) {reason}", path=str(path), source=source)
    doc = probe_features(path)
    if not sandbox_backends(doc):
        message = (f"No compatible native sandbox backend is available (engine {path} reports no sandbox; "
                   "is bubblewrap installed and allowed to create namespaces?)")
        raise AtoError(COMPAT_HARDWARE, message, details={"engine": str(path), "backend": "sandbox"},
                       problems=[Problem(COMPAT_HARDWARE, message, {"engine": str(path), "backend": "sandbox"})])
    return Engine(path=path, source=source, features=doc)


# ------------------------------------------------------------------ install from a release server


def release_base() -> str:
    return (os.environ.get("ATO_NACELLE_RELEASE_BASE_URL") or DEFAULT_RELEASE_BASE).rstrip("/")


def host_platform() -> tuple[str, str]:
    system = sys.platform
    os_name = {"linux": "linux", "darwin": "darwin"}.get(system)
    if os_name is None:
        raise AtoError("E999", f"unsupported OS for nacelle: {system}")
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if arch is None:
        raise AtoError("E999", f"unsupported architecture for nacelle: {machine}")
    return os_name, arch


def parse_checksum(body: str, binary: str, *, single_file: bool) -> str | None:
    """The expected SHA-256 of ``binary`` from a checksum file (GNU or BSD lines)."""
    for line in body.splitlines():
        line = line.strip()
        bsd = re.match(r"^(?:SHA256|sha256)\s*\((.+)\)\s*=\s*([0-9a-fA-F]{64})$", line)
        if bsd and bsd.group(1).strip() == binary:
            return bsd.group(2).lower()
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]) and parts[1].lstrip("*") == binary:
            return parts[0].lower()
    if single_file:
        match = _HEX64.search(body)
        if match:
            return match.group(1).lower()
    return None


def _integrity(message: str, **details: Any) -> AtoError:
    return AtoError(INTEGRITY_FAILURE, message, details=details,
                    problems=[Problem(INTEGRITY_FAILURE, message, dict(details))])


def install_engine(engine: str = "nacelle", version: str | None = None, reporter: Progress = SILENT) -> dict[str, Any]:
    """Download ``nacelle-<ver>-<os>-<arch>``, verify its SHA-256, install and register it.

    Every failure to obtain or match the checksum stops before anything is written.
    """
    import httpx

    if engine not in SUPPORTED_ENGINES:
        raise AtoError("E100", f"unknown engine: {engine}; currently only 'nacelle' is supported")
    base = release_base()
    os_name, arch = host_platform()

    def get(client: httpx.Client, url: str) -> httpx.Response:
        try:
            return client.get(url)
        except httpx.HTTPError as exc:
            raise network_error(url, exc) from None

    with httpx.Client(timeout=60, follow_redirects=True) as client:
        if not version or version == "latest":
            resp = get(client, f"{base}/latest.txt")
            if resp.status_code != 200:
                raise http_error(f"{base}/latest.txt", resp.status_code, "the latest engine version request")
            version = resp.text.strip()
            if not version:
                raise AtoError(E_NETWORK, f"{base}/latest.txt answered an empty engine version",
                               details={"url": f"{base}/latest.txt"})
        if not _VERSION.match(version):
            raise AtoError("E100", f"invalid engine version {version!r}")
        binary = f"nacelle-{version}-{os_name}-{arch}"
        target = paths.engines_dir() / f"nacelle-{version}"
        expected = None
        checked = []
        for pattern in CHECKSUM_FILES:
            name = pattern.format(binary=binary)
            url = f"{base}/{version}/{name}"
            checked.append(url)
            try:
                resp = client.get(url)
            except httpx.HTTPError:
                continue
            if resp.status_code != 200:
                continue
            expected = parse_checksum(resp.text, binary, single_file=pattern.startswith("{binary}"))
            if expected:
                break
        if not expected:
            raise _integrity(f"failed to resolve SHA256 for {binary} (checked release checksum endpoints); "
                             "refusing to install an unverified engine", binary=binary, checked=checked)
        url = f"{base}/{version}/{binary}"
        try:
            with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise http_error(url, resp.status_code, "the engine download")
                length = resp.headers.get("content-length", "")
                with reporter.task("Downloading", total=int(length) if length.isdigit() else None) as task:
                    data = b"".join(counted(resp.iter_bytes(), task))
        except httpx.HTTPError as exc:
            raise network_error(url, exc) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise _integrity(f"SHA256 mismatch for {binary}: expected {expected}, got {actual}; the engine was not "
                         "installed", binary=binary, expected=expected, actual=actual)
    write_bytes_atomic(target, data, mode=0o755)
    register_engine(engine, target, make_default=False)
    return {"engine": engine, "version": version, "path": str(target), "sha256": actual, "source_url": url,
            "registered": True}
