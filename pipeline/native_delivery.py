"""Native delivery chains: fetch, and install's fetch -> finalize -> project, as doit steps.

The stages (:mod:`stages.fetch`, :mod:`stages.finalize`, :mod:`stages.project`) do the
work; this module names each step's inputs by digest and lets :func:`pipeline.graph.run_chain`
skip a step whose inputs did not change and whose outputs still check out:

- fetch: inputs = the artifact's BLAKE3 + its labels; up to date while ``fetch.json``
  matches and the tree digest of ``artifact/`` is still ``parent_digest``. A registry
  fetch learns the BLAKE3 from the distribution record, so an up-to-date fetch downloads
  nothing.
- finalize (install only; ``ato finalize`` always makes a fresh dir): inputs = the
  artifact + labels + this host; up to date while the derived app still matches its
  provenance (digest and local signature).
- project (install ``--project``): up to date while the projection record exists and is ok.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas.canonical import jcs_digest
from cas.digest import blake3_file, label, parse
from cas.tempfiles import temp_name
from pipeline import paths
from pipeline.errors import E_POLICY, E_USAGE, AtoError, Problem
from pipeline.manifest import SIDECAR_NAME
from pipeline.progress import SILENT, Progress, counted
from stages import fetch as fetch_stage
from stages import finalize as finalize_stage
from stages import project as project_stage
from stages.capsule import Limits, Verdict, verify
from stages.native import SCHEMA_VERSION, host_os, host_target
from stages.trust_port import GatedPort, TrustPort

if TYPE_CHECKING:
    from pipeline.graph import Step

INSTALL_KIND = "NativeRequiresLocalDerivation"


def _run_chain(steps: list[Step], state_dir: Path) -> None:
    from pipeline.graph import run_chain  # imported when a chain runs: a standard install never loads doit

    run_chain(steps, state_dir)


def _state(*parts: str) -> Path:
    return paths.state_dir().joinpath("native-delivery", *parts)


# ---------------------------------------------------------------- fetch


def _fetch_step(scoped_id: str, version: str, registry: str, artifact_blake3: str,
                materialize: Callable[[], fetch_stage.FetchResult], ctx: dict[str, Any],
                recheck: Callable[[Path], object] | None = None) -> Step:
    digest = fetch_stage.inputs_digest(scoped_id, version, registry, artifact_blake3)

    def action() -> dict[str, Any]:
        result = materialize()
        ctx["fetch"] = result.envelope
        return {"envelope": result.envelope}

    def outputs_ok(values: dict[str, Any]) -> bool:
        env = values.get("envelope") or {}
        cache = Path(env.get("cache_dir", ""))
        record = fetch_stage._try_read(cache / fetch_stage.FETCH_RECORD) if env else None
        if record is None or record.get("artifact_blake3") != label(parse(artifact_blake3)) or \
                not fetch_stage.cached_ok(cache, record) or \
                (record["scoped_id"], record["version"], record["registry"]) != (scoped_id, version, registry):
            return False
        if recheck is not None:
            recheck(cache / fetch_stage.ARTIFACT_FILE)  # refused (a key revoked since): fetch again, and refuse
        ctx["fetch"] = env
        return True

    from pipeline.graph import Step  # the task engine (doit, the build stage): loaded only for a step

    return Step(f"fetch-{parse(artifact_blake3)[:16]}", action, digest, outputs_ok)


def fetch_local(path: Path, *, trust: TrustPort, scoped_id: str | None = None, version: str | None = None,
                registry: str | None = None) -> dict[str, Any]:
    """``ato fetch <file.capsule>``: labels default to ``local/<name>``, its version, its ``file://`` URI.

    The file is accepted (``trust``) before anything else, every time: an up-to-date fetch of a file
    whose signer was revoked since is refused too. A bare file's signer is checked against
    ``capsule:<name>``, as ``ato verify`` and ``ato run`` of a file do.
    """
    path = Path(path).absolute()
    trust.check(path, None)
    if scoped_id is None or version is None or registry is None:
        sid, ver, reg = fetch_stage.local_labels(path)
        scoped_id, version, registry = scoped_id or sid, version or ver, registry or reg
    artifact_hex = parse(str(verify(path, trust.limits).artifact_blake3))
    ctx: dict[str, Any] = {}
    step = _fetch_step(scoped_id, version, registry, artifact_hex,
                       lambda: fetch_stage.fetch_capsule(path, scoped_id=scoped_id, version=version,
                                                         registry=registry, expected_blake3=artifact_hex,
                                                         trust=trust), ctx)
    _run_chain([step], _state("fetch"))
    return ctx["fetch"]


def fetch_registry(ref: fetch_stage.FetchRef, client: Any, *, trust: TrustPort,
                   reporter: Progress = SILENT) -> dict[str, Any]:
    """``ato fetch <publisher>/<slug>[@version] --registry URL`` through a registry client
    (``detail``/``distribution``/``download``, :class:`stages.registry_port.RegistryPort`).

    The download is accepted (``trust``, checked against the publisher) before it is unpacked; an
    up-to-date fetch re-checks the cached artifact, so a key revoked since is refused too."""
    from stages.registry_port import RegistryHttpError

    assert ref.publisher and ref.slug
    scoped = ref.scoped_id
    try:
        if ref.version is None:
            detail = client.detail(ref.publisher, ref.slug)
            version = str(detail.get("latest_version") or detail.get("latestVersion") or "")
            if not version:
                raise AtoError(E_USAGE, f"No fetchable version available for '{scoped}'. This capsule has no "
                                        "published release version.")
        else:
            version = ref.version
        dist = client.distribution(ref.publisher, ref.slug, version)
    except RegistryHttpError as exc:
        if exc.status == 404:
            what = f"Version {version} of {scoped}" if ref.version else scoped
            raise AtoError(E_USAGE, f"{what} not found in registry {client.base}") from None
        raise
    if dist.get("version") != version:
        raise fetch_stage.integrity(f"registry answered version {dist.get('version')!r} for {version!r}")
    expected = parse(str(dist.get("blake3", "")))
    registry = client.base

    def materialize() -> fetch_stage.FetchResult:
        root = paths.fetches_dir()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / temp_name(f"{ref.slug}-{version}.capsule")  # errors name the artifact
        try:
            with open(tmp, "wb") as fh, reporter.task("Downloading", total=int(dist.get("size_bytes") or 0) or None) \
                    as task:
                for piece in counted(client.download(str(dist["artifact_url"])), task):
                    fh.write(piece)
                fh.flush()
                os.fsync(fh.fileno())
            return fetch_stage.fetch_capsule(tmp, scoped_id=scoped, version=version, registry=registry,
                                             expected_blake3=expected, expected_name=ref.slug, trust=trust,
                                             trust_scope=scoped)
        finally:
            tmp.unlink(missing_ok=True)

    ctx: dict[str, Any] = {}
    _run_chain([_fetch_step(scoped, version, registry, expected, materialize, ctx,
                           recheck=lambda p: trust.check(p, scoped))], _state("fetch"))
    return ctx["fetch"]


# ---------------------------------------------------------------- install


def payload_delivery(path: Path, limits: Limits | None = None) -> bytes | None:
    """The bytes of the payload-root ``ato.delivery.toml`` of a ``.capsule``, or None (a standard artifact).

    Read from the format's verifying pass over the payload (:func:`stages.capsule.verify`), which
    the trust check of the same file has usually made already.
    """
    return verdict_delivery(verify(path, limits).require())


def verdict_delivery(verdict: Verdict) -> bytes | None:
    """:func:`payload_delivery` from the complete verdict of a file a caller has just verified."""
    scan = verdict.require().scan
    assert scan is not None
    return scan.sidecars.get(SIDECAR_NAME)


def consent_gate(*, yes: bool, interactive: bool, ask: Callable[[str], bool] | None) -> None:
    """A native install runs a local finalize: it needs ``--yes`` unless a person can be asked."""
    if yes:
        return
    if interactive and ask is not None:
        if ask("This app requires local setup to run on this machine.\nRun local finalize now?"):
            return
        raise AtoError(E_POLICY, "local finalize was declined; the app was not installed (re-run with --yes to "
                                 "approve it)",
                       problems=[Problem("ATO_ERR_CONSENT_REQUIRED", "local finalize declined", {})])
    message = "This app requires local finalize, but no interactive consent is available. Re-run with --yes."
    raise AtoError(E_POLICY, message, hint="pass --yes to approve the local finalize step",
                   problems=[Problem("ATO_ERR_CONSENT_REQUIRED", message, {"flag": "--yes"})])


def _skipped(state: str) -> dict[str, Any]:
    return {"performed": False, "projection_id": None, "projected_path": None, "state": state,
            "schema_version": SCHEMA_VERSION, "metadata_path": None}


def install_native(path: Path, *, scoped_id: str, version: str, registry: str, project: bool, trust: TrustPort,
                   launcher_dir: Path | None = None, notify: Callable[[str], None] = lambda _m: None,
                   ) -> dict[str, Any]:
    """fetch -> finalize -> (project) for an installed native ``.capsule``; returns the install fields
    ``install_kind``, ``launchable``, ``local_derivation`` and ``projection``. Each step accepts the
    artifact through ``trust`` exactly as ``ato fetch``/``finalize``/``project`` do."""
    path = Path(path).absolute()
    artifact_hex = blake3_file(path)
    publisher, slug = scoped_id.split("/", 1)
    host = host_target()
    labels = {"scoped_id": scoped_id, "version": version, "registry": registry, "artifact_blake3": label(artifact_hex)}
    ctx: dict[str, Any] = {}
    fetch = _fetch_step(scoped_id, version, registry, artifact_hex,
                        lambda: fetch_stage.fetch_capsule(path, scoped_id=scoped_id, version=version,
                                                          registry=registry, expected_blake3=artifact_hex,
                                                          trust=trust, trust_scope=scoped_id), ctx)

    def finalize_action() -> dict[str, Any]:
        cache = Path(ctx["fetch"]["cache_dir"])
        out = paths.apps_dir() / publisher / slug / parse(ctx["fetch"]["parent_digest"])
        notify("Running local finalize...")
        result = finalize_stage.finalize(cache, out, trust=trust)
        ctx["finalize"] = result.envelope
        return {"envelope": result.envelope}

    def finalize_ok(values: dict[str, Any]) -> bool:
        env = values.get("envelope") or {}
        app = Path(env.get("derived_app_path", ""))
        if not env or not app.parent.is_dir():
            return False
        try:
            provenance, _p = finalize_stage.load_provenance(app)
        except AtoError:
            return False
        if provenance.get("parent_digest") != ctx.get("fetch", {}).get("parent_digest") or \
                finalize_stage.check_derivation(app, provenance):
            return False
        ctx["finalize"] = env
        return True

    from pipeline.graph import Step

    steps = [fetch, Step("finalize", finalize_action, jcs_digest({"stage": "finalize", "host": host, **labels}),
                         finalize_ok, depends_on=[fetch.name])]
    if project:
        launcher = str(launcher_dir.absolute()) if launcher_dir else None

        def project_action() -> dict[str, Any]:
            try:
                app = Path(ctx["finalize"]["derived_app_path"])
                _retire_projections(scoped_id, app, notify)
                env = project_stage.project(app, Path(launcher) if launcher else None, trust=trust)
            except AtoError as exc:
                notify(f"Launcher projection failed: {exc.message}")
                ctx["projection"] = {**_skipped("failed"), "error": exc.message}
                return {"failed": exc.message}
            ctx["projection"] = {"performed": True, "projection_id": env["projection_id"],
                                 "projected_path": env["projected_path"], "state": env["state"],
                                 "schema_version": SCHEMA_VERSION, "metadata_path": env["metadata_path"]}
            return {"projection": ctx["projection"]}

        def project_ok(values: dict[str, Any]) -> bool:
            proj = values.get("projection")
            if not proj or proj.get("state") != "ok":
                return False
            meta = Path(proj["metadata_path"])
            with contextlib.suppress(AtoError):
                records = dict(project_stage.load_records())
                record = records.get(meta)
                if record is not None and record.get("derived_app_path") == \
                        str(Path(ctx["finalize"]["derived_app_path"]).resolve()) and not project_stage.inspect(record):
                    ctx["projection"] = proj
                    return True
            return False

        steps.append(Step("project", project_action,
                          jcs_digest({"stage": "project", "host": host, "launcher_dir": launcher, **labels}),
                          project_ok, depends_on=["finalize"]))
    _run_chain(steps, _state("install", scoped_id.replace("/", "__")))
    fin = ctx["finalize"]
    projection = ctx.get("projection") or _skipped("skipped")
    projection = {k: projection[k] for k in ("performed", "projection_id", "projected_path", "state",
                                              "schema_version", "metadata_path")}
    return {
        "install_kind": INSTALL_KIND,
        "launchable": {"DerivedApp": {"path": fin["derived_app_path"]}},
        "local_derivation": {"schema_version": SCHEMA_VERSION, "performed": True, "fetched_dir": fin["fetched_dir"],
                             "derived_app_path": fin["derived_app_path"], "provenance_path": fin["provenance_path"],
                             "parent_digest": fin["parent_digest"], "derived_digest": fin["derived_digest"]},
        "projection": projection,
    }


def _retire_projections(scoped_id: str, app: Path, notify: Callable[[str], None]) -> None:
    """An install moves the launcher to its derived app: projections of this capsule's older derived
    apps are unprojected first (unproject still refuses anything that is not what project created)."""
    current = str(app.resolve())
    for _path, record in project_stage.load_records():
        if record.get("scoped_id") == scoped_id and record.get("derived_app_path") != current:
            project_stage.unproject(record["projection_id"])
            notify(f"Moved the launcher from {record.get('derived_app_path')} (projection {record['projection_id']})")


def host_supports_finalize() -> bool:
    return host_os() in finalize_stage.ALLOWED_TOOLS


class NativeInstall:
    """The native path of ``ato install``: a gate in the trust port (before the artifact is stored),
    then fetch -> finalize -> project once the standard install is done. A native install that fails
    after the artifact was stored takes the artifact back out: a refused install leaves nothing in the
    store, so ``ato run publisher/slug`` never finds it installed."""

    def __init__(self, *, yes: bool, project: bool | None, interactive: bool,
                 ask: Callable[[str], bool] | None, notify: Callable[[str], None] = lambda _m: None,
                 launcher_dir: Path | None = None) -> None:
        tty = sys.stdin.isatty() and sys.stderr.isatty()
        self.yes, self.project, self.interactive = yes, project, interactive and tty
        self.ask, self.notify, self.launcher_dir = ask, notify, launcher_dir
        self.native: bool | None = None
        self.trust: TrustPort | None = None

    def wrap(self, trust: TrustPort) -> TrustPort:
        """``trust`` plus the native gate (consent to a local finalize) after the complete check."""
        self.trust = trust
        return GatedPort(trust, self.gate)

    def gate(self, verdict: Verdict) -> None:
        self.native = verdict_delivery(verdict) is not None
        if not self.native:
            return
        if not host_supports_finalize():
            raise AtoError(E_POLICY, f"This app requires local finalize, but this host ({host_target()}) does "
                                     "not support native finalize")
        consent_gate(yes=self.yes, interactive=self.interactive, ask=self.ask)

    def _want_projection(self) -> bool:
        if self.project is not None:
            return self.project
        if self.yes:
            return True
        if self.interactive and self.ask is not None:
            return self.ask("This app can also be added to your Applications launcher.\n"
                            "Create a launcher projection?")
        return False

    def complete(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` (the standard install envelope) with the native fields, when the artifact is native."""
        assert self.trust is not None, "wrap() the trust port first"
        stored = Path(doc["path"])
        try:
            if self.native is None:
                self.gate(verify(stored, self.trust.limits))
            if not self.native:
                return doc
            project = self._want_projection()
            fields = install_native(stored, scoped_id=doc["scoped_id"], version=doc["version"],
                                    registry=str(doc.get("registry") or ""), project=project, trust=self.trust,
                                    launcher_dir=self.launcher_dir, notify=self.notify)
        except BaseException:
            if not doc.get("up_to_date"):
                _unstore(stored)
            raise
        if not project:
            self.notify("Launcher projection skipped.")
        return {**doc, **fields}


def _unstore(path: Path) -> None:
    """Remove an artifact this install stored, and the version/slug/publisher dirs it leaves empty."""
    path.unlink(missing_ok=True)
    store = paths.store_dir()
    for parent in path.parents:
        if parent == store or store not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
