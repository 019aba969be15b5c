"""``ato registry serve``: the local registry as a Starlette app under uvicorn.

Routes (CONTRACTS.md §5 plus the delta-transfer routes; errors are always
``{"error": "<code>", "message": "<text>"}``):

====== ================================================== ===== ===========================================
method path                                               auth  purpose
====== ================================================== ===== ===========================================
GET    /.well-known/capsule.json                          —     ``{url, name, version, write_auth_required}``
GET    /v1/capsules?q=&limit=&cursor=                     —     search ``{capsules[], total, next_cursor}``
GET    /v1/capsules/by/{p}/{s}                            —     detail: releases, manifest, readme, runtime_config
GET    /v1/capsules/by/{p}/{s}/distributions?version=     —     ``{version, artifact_url, sha256, blake3, ...}``
GET    /v1/capsules/by/{p}/{s}/download?version=          —     302 to the artifact URL
GET    /v1/artifacts/{p}/{s}/{v}/{file}                   —     artifact bytes (HTTP ranges supported)
PUT    /v1/local/capsules/{p}/{s}/{v}?file_name=&allow_existing=  W  whole-artifact upload (x-ato-sha256, x-ato-blake3[, x-ato-skeleton])
GET    /v1/local/capsules/by/{p}/{s}/runtime-config       —     per-target ``{port, env, permission_mode}``
PUT    /v1/local/capsules/by/{p}/{s}/runtime-config       W     save it (normalised; returned)
DELETE /v1/local/capsules/by/{p}/{s}?confirmed=true[&version=]  W  remove a release or the capsule
POST   /v1/local/capsules/by/{p}/{s}/yank                 W     ``{version, yanked}``: yank or restore a version
POST   /v1/sync/negotiate                                 W     which chunks the registry lacks (+ session_id)
POST   /v1/sync/chunks?session=                           W     many frames in one body, staged in the session
PUT    /v1/chunks/{hash}?session=                         W     one frame (``x-raw-size``)
GET    /v1/chunks/{hash}                                  —     one frame
POST   /v1/chunks/fetch                                   —     ``{"chunks": [...]}`` → those frames, concatenated
POST   /v1/sync/commit?session=                           W     skeleton + chunk order → artifact rebuilt, checked, committed
GET    /v1/releases/{p}/{s}/{v}/skeleton                  —     prefix/suffix bytes + ordered frames (delta install)
GET    /v1/releases/{p}/{s}/{v}/manifest                  —     the payload (v3) manifest
GET    /, /ui/*                                           —     the web UI (plain HTML/CSS/JS)
====== ================================================== ===== ===========================================

``/v1/manifest/capsules...`` are accepted as aliases of the read routes, as the
reference server does. The detail route's ``manifest``/``manifest_toml`` are the
*display* form of the latest release's capsule.toml: ``distribution.chunk_list``
(one entry per chunk, thousands for a large payload) is replaced by
``distribution.chunk_count``; the full manifest is in the artifact itself. Writes need ``Authorization: Bearer <token>`` when the
server has ``--auth-token``; tokens are compared in constant time (HMAC
compare of their SHA-256, so lengths leak nothing). Reads stay open.

Uploads are streamed to a file under ``tmp/`` (never held in memory), hashed on
the way, and refused unless both digest headers match; a body shorter than its
Content-Length is an ``incomplete_upload``. Everything is then checked and
committed by :class:`pipeline.registry.storage.RegistryStore`.

A whole-artifact ``PUT`` with ``x-ato-skeleton: <p>,<s>`` starts its body with the
artifact's first ``p`` and last ``s`` bytes (the small members around
``payload.tar.zst``, at most 64 MiB), then the artifact itself (Content-Length
counts both). The small members are judged first and the artifact passes through
the verifier's stream as it arrives, so its verdict is ready when its last byte is;
the stream also checks that the bytes around the payload are the skeleton's. Only a
complete, accepted verdict on exactly the bytes written is used (the commit's check
takes it, re-hashing the file); anything else (a refused or lying skeleton, a
refusal on the way) leaves the file to be judged whole once received, in the
verifier's usual words. ``POST /v1/sync/negotiate`` answers ``skeleton_upload:
true`` to say the route takes it.

Start-up: a non-loopback ``--host`` without ``--auth-token`` is refused (E301,
exit 1); a port in use or a host that is not this machine's is a one-line error
with exit 3. The listening URL is printed on stdout (``--port 0`` picks a free
port and prints it).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import blake3
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from cas.digest import DigestError, label, parse
from cas.stoppoints import stop_point
from pipeline.errors import E_DISK_FULL, E_NETWORK, E_POLICY, AtoError, Problem, from_os_error, printable
from pipeline.names import normalize_segment
from pipeline.nesting import MAX_DEPTH, loads_json
from pipeline.registry.readme import render_readme
from pipeline.registry.storage import (
    GC_GRACE_SECONDS,
    SEARCH_LIMIT_MAX,
    Piece,
    RegistryError,
    RegistryStore,
    Upload,
    bare_hex,
    check_file_name,
    check_scope,
    check_version,
)
from stages.capsule import ArtifactStream, Limits, placed, verify_skeleton, verify_stream
from stages.capsule.keys import did_fingerprint, short_fingerprint
from stages.capsule.payload import MAX_FRAME

log = logging.getLogger("ato.registry")

WEB_DIR = Path(__file__).parent / "web"
REGISTRY_NAME = "Ato Local Registry"
MAX_UPLOAD_BYTES = 1 << 30
MAX_JSON_BYTES = 64 << 20
MAX_FETCH_CHUNKS = 8192
WRITE_BUFFER = 4 << 20
MAX_SKELETON = 64 << 20  # the bytes around an artifact's payload an upload may send ahead of it
# The web page runs only its own script; README HTML (already sanitised) may show remote images and
# keep Markdown's table alignment (a style attribute nh3 limits to text-align).
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
          "img-src 'self' data: https: http:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
          "form-action 'self'")


class BigFileResponse(FileResponse):
    chunk_size = 1 << 20


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=status, headers=headers)


def error_response(err: RegistryError) -> JSONResponse:
    return json_response(err.body(), err.status)


def _os_refusal(exc: BaseException) -> RegistryError | None:
    """A full disk is 507 (the client may retry elsewhere or later), an over-long name 400: never a 500."""
    err = from_os_error(exc)
    if err is None:
        return None
    if err.code == E_DISK_FULL:
        return RegistryError(507, "insufficient_storage", f"the registry's disk is full: {err.message}")
    return RegistryError(400, "name_too_long", err.message)


# C0/C1 controls and DEL (a %00 in a path reaches the handler as a NUL), and U+FFFD, which is what
# percent-escaped bytes that are not UTF-8 (%ff) decode to: no name, version, digest or id holds one.
_UNFIT_IN_PATH = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


def _escaped(value: str) -> str:
    """``value`` with every control character (newline and tab too) written as an escape, cut to 200 characters."""
    return printable(value.replace("\n", "\\x0a").replace("\t", "\\x09"))[:200]


def check_path_params(request: Request) -> None:
    """Refuse (400, JSON) a path parameter with a control character or undecodable bytes, before any route
    looks at it: no handler, file name or database query ever sees one."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and _UNFIT_IN_PATH.search(value):
            raise RegistryError(400, "invalid_parameter",
                                f"path parameter {name} holds a control character or bytes that are not UTF-8: "
                                f"'{_escaped(value)}'")


def api(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every route: RegistryError → its JSON body; anything else → 500 JSON, never a traceback page."""
    async def wrapper(request: Request) -> Response:
        try:
            check_path_params(request)
            return await fn(request)
        except RegistryError as err:
            return error_response(err)
        except ClientDisconnect:
            return Response(status_code=400)
        except RecursionError:
            return error_response(RegistryError(400, "too_deep", f"request nested more than {MAX_DEPTH} levels deep"))
        except Exception as exc:  # noqa: BLE001 - the server must answer, and log
            refusal = _os_refusal(exc)
            if refusal is not None:
                log.warning("%s %s: %s", request.method, printable(request.url.path), refusal.message)
                return error_response(refusal)
            log.exception("internal error on %s %s", request.method, printable(request.url.path))
            return json_response({"error": "internal_error", "message": printable(f"{type(exc).__name__}: {exc}")},
                                 500)
    wrapper.__name__ = fn.__name__
    return wrapper


class _FileWriter:
    """Blocking half of a streamed upload: write and hash (run in the thread pool), and pass the bytes
    through the verifier's stream when there is one (a refusal only ends the stream: the file is then
    judged whole after it is received, as any upload is)."""

    def __init__(self, path: Path, stream: ArtifactStream | None = None) -> None:
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.b3 = blake3.blake3()
        self.size = 0
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.b3.update(data)
        self.size += len(data)
        if self.stream is not None:
            try:
                self.stream.update(data)
            except AtoError:
                self.stream.close()
                self.stream = None

    def close(self, sync: bool) -> None:
        if sync:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        self.fh.close()


async def receive_to_file(request: Request, path: Path, limit: int, *, pieces: AsyncIterator[bytes] | None = None,
                          expected: int | None = None, stream: ArtifactStream | None = None
                          ) -> tuple[str, str, int, ArtifactStream | None]:
    """Stream the request body (or ``pieces``, the rest of it, ``expected`` bytes) into ``path``;
    returns (sha256 hex, blake3 hex, size, ``stream`` when it took every byte without a refusal)."""
    if expected is None:
        declared = request.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
    if expected is not None and expected > limit:
        raise RegistryError(413, "payload_too_large", f"upload of {expected} bytes exceeds the {limit}-byte limit")
    writer = await run_in_threadpool(_FileWriter, path, stream)
    ok = False
    try:
        buf = bytearray()
        received = 0
        try:
            async for piece in (pieces if pieces is not None else request.stream()):
                buf += piece
                received += len(piece)
                if received > limit:
                    raise RegistryError(413, "payload_too_large", f"upload exceeds the {limit}-byte limit")
                if len(buf) >= WRITE_BUFFER:
                    data, buf = bytes(buf), bytearray()
                    await run_in_threadpool(writer.write, data)
        except ClientDisconnect:
            raise RegistryError(400, "incomplete_upload", "the upload ended before its body was complete") from None
        if buf:
            await run_in_threadpool(writer.write, bytes(buf))
        if expected is not None and writer.size != expected:
            raise RegistryError(400, "incomplete_upload",
                                f"received {writer.size} of {expected} bytes (truncated upload)")
        ok = True
    finally:
        await run_in_threadpool(writer.close, ok)
        if not ok:
            if writer.stream is not None:
                writer.stream.close()
            path.unlink(missing_ok=True)
    return writer.sha.hexdigest(), writer.b3.hexdigest(), writer.size, writer.stream


async def split_head(pieces: AsyncIterator[bytes], n: int) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first ``n`` bytes of ``pieces``, and an iterator over the rest."""
    head = bytearray()
    rest = b""
    try:
        while len(head) < n:
            piece = await pieces.__anext__()
            take = n - len(head)
            head += piece[:take]
            rest = piece[take:]
    except StopAsyncIteration:
        raise RegistryError(400, "incomplete_upload", "the upload ended inside its skeleton") from None
    except ClientDisconnect:
        raise RegistryError(400, "incomplete_upload", "the upload ended before its body was complete") from None

    async def tail() -> AsyncIterator[bytes]:
        if rest:
            yield rest
        async for piece in pieces:
            yield piece
    return bytes(head), tail()


def skeleton_lengths(value: str, total: int) -> tuple[int, int]:
    """``x-ato-skeleton: <prefix bytes>,<suffix bytes>`` (both within the body and MAX_SKELETON)."""
    parts = value.split(",")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 12 for p in parts):
        raise RegistryError(400, "invalid_request", "x-ato-skeleton must be '<prefix bytes>,<suffix bytes>'")
    a, b = int(parts[0]), int(parts[1])
    if a + b > MAX_SKELETON or a + b > total:
        raise RegistryError(400, "invalid_request", f"x-ato-skeleton names {a + b} bytes: at most {MAX_SKELETON}, "
                                                    "and within the body")
    return a, b


def signature_fields(rel: Any) -> dict[str, Any]:
    """How a release was signed, as its upload check found it: ``signature_status`` is ``verified`` (an
    Ed25519 signature that verified at upload; trust in the key is the installer's decision) or
    ``unsigned``; ``signer`` names the key and its fingerprint."""
    if not rel["signed"] or not rel["signer_key_id"]:
        return {"signature_status": "unsigned", "signer": None}
    fp = did_fingerprint(rel["signer_key_id"])
    return {"signature_status": "verified", "signer": {"key_id": rel["signer_key_id"], "fingerprint": fp,
                                                       "short_fingerprint": short_fingerprint(fp),
                                                       "signed_at": rel["signed_at"]}}


def release_metadata(rel: Any) -> dict[str, Any]:
    """The ``[metadata]`` table of a release (from its summary row), or {}."""
    raw = rel["metadata_json"] if rel is not None and "metadata_json" in rel.keys() else None
    with contextlib.suppress(ValueError, TypeError):
        doc = json.loads(raw) if raw else {}
        return doc if isinstance(doc, dict) else {}
    return {}


LINK_KEYS = ("homepage", "repository", "documentation", "source", "issues", "website")


def metadata_doc(meta: dict[str, Any]) -> dict[str, Any]:
    """``[metadata]`` for the page: author, tags, and the http(s) links it names (nothing else is a link)."""
    links = {k: v for k in LINK_KEYS if isinstance(v := meta.get(k), str) and v.startswith(("https://", "http://"))}
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    return {"display_name": meta.get("display_name") if isinstance(meta.get("display_name"), str) else None,
            "author": meta.get("author") if isinstance(meta.get("author"), str) else None,
            "tags": [t for t in tags if isinstance(t, str)], "links": links}


def tokens_equal(expected: str, presented: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(expected.encode()).digest(), hashlib.sha256(presented.encode()).digest())


def _bool(value: str | None, name: str = "flag") -> bool:
    """A boolean query parameter; anything but the usual spellings is a 400, not a silent false."""
    text = (value or "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise RegistryError(400, "invalid_parameter", f"{name} must be true or false, got {value!r}")


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def blob_response(store: RegistryStore, key: str, size: int, range_header: str | None,
                  headers: dict[str, str]) -> Response:
    """Stream a blob from a remote store, honouring one ``Range: bytes=a-b`` (206) as a file response
    does; several ranges are answered with the whole object (200), which RFC 9110 allows."""
    start, end = 0, size - 1
    status = 200
    m = _RANGE.match((range_header or "").strip())
    if m and (m.group(1) or m.group(2)):
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start = max(size - int(m.group(2)), 0)
        if start > end or start >= size:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        status = 206
        headers = {**headers, "content-range": f"bytes {start}-{end}/{size}"}
    length = end - start + 1 if size else 0
    pieces = store.read_pieces([Piece(key, start, length)]) if length else iter(())
    return StreamingResponse(iterate_in_threadpool(pieces), status_code=status, media_type="application/octet-stream",
                             headers={**headers, "content-length": str(length), "accept-ranges": "bytes"})


class RegistryApp:
    """The routes, bound to one store and one optional token."""

    def __init__(self, store: RegistryStore, token: str | None, listen_url: str,
                 store_users: dict[str, str] | None = None, oidc_tokens: dict[str, str] | None = None,
                 redirect_downloads: bool = False) -> None:
        self.store = store
        # artifact downloads answered with a presigned URL of the bucket (when the blob store has them)
        self.redirect_downloads = redirect_downloads
        # trusted CI identity tokens, token -> owner/repo (stands in for GitHub's OIDC issuer)
        self.oidc_tokens = dict(oidc_tokens or {})
        self._sources: Any = None
        self.token = token
        self.listen_url = listen_url
        # Store API subset (issue 8): session tokens of Store users, token -> handle
        self.store_users = dict(store_users or {})

    @property
    def sources(self) -> Any:
        if self._sources is None:
            from pipeline.registry.sources import SourceService

            self._sources = SourceService(self.store)
        return self._sources

    @staticmethod
    def presented_token(request: Request) -> str:
        header = request.headers.get("authorization", "").strip()
        return header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""

    def require_user(self, request: Request) -> str:
        handle = self.user_for(request)
        if handle is None:
            raise RegistryError(401, "unauthorized", "Source operation requires authentication "
                                "(ATO_ERR_AUTH_REQUIRED: run `ato login` or set ATO_TOKEN)")
        return handle

    def user_for(self, request: Request) -> str | None:
        """The Store handle whose session token the request presents (None when none matches)."""
        presented = self.presented_token(request) or request.cookies.get("better-auth.session_token", "")
        if not presented:
            return None
        for tok, handle in self.store_users.items():
            if tokens_equal(tok, presented):
                return handle
        return None

    # ---------------------------------------------------------------- helpers

    def require_write(self, request: Request, publisher: str | None = None, any_user: bool = False) -> None:
        """The registry token, or (Dock uploads) a Store user's token when ``publisher`` is theirs;
        ``any_user`` admits any Store user (chunk staging before the commit names the publisher)."""
        if publisher is not None or any_user:
            handle = self.user_for(request)
            if handle is not None:
                if publisher is not None and handle != publisher:  # a Dock upload: a user writes only under their own handle
                    raise RegistryError(403, "forbidden", f"token of '{handle}' cannot publish as '{publisher}'")
                return
        if not self.token:
            return
        presented = self.presented_token(request)
        if not presented:
            raise RegistryError(401, "unauthorized", "Bearer token is required for this write API "
                                "(ATO_ERR_AUTH_REQUIRED: set ATO_TOKEN)")
        if not tokens_equal(self.token, presented):
            raise RegistryError(401, "unauthorized", "the Bearer token was rejected: it is not this registry's "
                                "write token (ATO_ERR_AUTH_REQUIRED: check ATO_TOKEN)")

    def base_url(self, request: Request) -> str:
        proto = request.headers.get("x-forwarded-proto", "").strip().lower()
        scheme = proto if proto in ("http", "https") else "http"
        host = (request.headers.get("x-forwarded-host") or request.headers.get("host") or "").split(",")[0].strip()
        return f"{scheme}://{host}" if host else self.listen_url

    def artifact_url(self, request: Request, scoped: str, version: str, file_name: str) -> str:
        p, s = scoped.split("/")
        return (f"{self.base_url(request)}/v1/artifacts/{quote(p)}/{quote(s)}/{quote(version)}/"
                f"{quote(file_name)}")

    @staticmethod
    async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> Any:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise RegistryError(413, "payload_too_large", "JSON body is too large")
        try:
            return loads_json(body or b"null", "body")
        except ValueError as exc:
            raise RegistryError(400, "invalid_json", f"body is not JSON: {exc}") from None
        except AtoError as exc:  # nested too deeply
            raise RegistryError(400, "too_deep", exc.message) from None

    def scope(self, request: Request) -> tuple[str, str, str]:
        p, s = request.path_params["publisher"], request.path_params["slug"]
        return p, s, check_scope(p, s)

    def publisher_doc(self, handle: str) -> dict[str, Any]:
        return {"handle": handle, "authorDid": f"did:key:local:{handle}", "verified": True}

    def release_row(self, request: Request, rel: Any) -> dict[str, Any]:
        spliceable = bool(rel["spliceable"]) if "spliceable" in rel.keys() else rel["layout"] is not None
        return {
            "version": rel["version"], "file_name": rel["file_name"], "content_hash": label(rel["blake3"]),
            "blake3": label(rel["blake3"]), "sha256": "sha256:" + rel["sha256"], "size_bytes": rel["size_bytes"],
            "manifest_hash": rel["manifest_hash"], "payload_hash": label(rel["payload_hash"]),
            "chunks": rel["chunk_count"], "spliceable": spliceable,
            "created_at": rel["created_at"],
            "artifact_url": self.artifact_url(request, rel["scoped_id"], rel["version"], rel["file_name"]),
            **signature_fields(rel), "yanked": rel["yanked_at"] is not None, "yanked_at": rel["yanked_at"],
        }

    def search_row(self, pkg: Any, latest: Any) -> dict[str, Any]:
        """One capsule as search and detail list it: snake_case keys, plus the camelCase aliases the
        reference server's rows carry (``scopedId``, ``latestVersion``, ``latestSizeBytes``, ``createdAt``,
        ``updatedAt``), kept for its clients."""
        size = latest["size_bytes"] if latest is not None else 0
        meta = release_metadata(latest)
        return {
            "id": f"local-{pkg['publisher']}-{pkg['slug']}", "slug": pkg["slug"], "scoped_id": pkg["scoped_id"],
            "name": pkg["name"], "description": pkg["description"],
            "category": "tools", "type": "app", "price": 0, "currency": "usd",
            "publisher": self.publisher_doc(pkg["publisher"]), "latest_version": pkg["latest_version"],
            "latest_size_bytes": size, "downloads": 0, "created_at": pkg["created_at"],
            "updated_at": pkg["updated_at"],
            "author": meta.get("author") if isinstance(meta.get("author"), str) else None,
            "tags": [t for t in meta.get("tags") or [] if isinstance(t, str)] if isinstance(meta.get("tags"), list)
            else [],
            **(signature_fields(latest) if latest is not None else {"signature_status": "unknown", "signer": None}),
            "scopedId": pkg["scoped_id"], "latestVersion": pkg["latest_version"], "latestSizeBytes": size,
            "createdAt": pkg["created_at"], "updatedAt": pkg["updated_at"],
        }

    # ---------------------------------------------------------------- read routes

    async def well_known(self, request: Request) -> Response:
        return json_response({"url": self.base_url(request), "name": REGISTRY_NAME, "version": "1",
                              "write_auth_required": bool(self.token),
                              "features": {"chunk_sync": True, "skeleton": True, "batch_fetch": True}})

    async def search(self, request: Request) -> Response:
        q = request.query_params.get("q", "")
        try:
            limit = int(request.query_params.get("limit") or 20)
        except ValueError:
            raise RegistryError(400, "invalid_parameter", "limit must be a whole number") from None
        limit = max(1, min(limit, SEARCH_LIMIT_MAX))
        cursor = request.query_params.get("cursor") or None

        def run() -> dict[str, Any]:
            page = self.store.search(q, limit, cursor)
            out = [self.search_row(r, self.store.release(r["scoped_id"], r["latest_version"], summary=True))
                   for r in page.rows]
            return {"capsules": out, "total": page.total, "next_cursor": page.next_cursor}
        return json_response(await run_in_threadpool(run))

    async def detail(self, request: Request) -> Response:
        _p, _s, scoped = self.scope(request)

        def run() -> dict[str, Any]:
            pkg = self.store.package(scoped)
            if pkg is None:
                raise RegistryError(404, "not_found", "Capsule not found")
            releases = self.store.releases(scoped)
            latest = next((r for r in releases if r["version"] == pkg["latest_version"]), None)
            doc = self.search_row(pkg, latest)
            doc["latest_version"] = pkg["latest_version"]
            doc["releases"] = [self.release_row(request, r) for r in releases]
            if latest is not None:
                latest = self.store.release(scoped, latest["version"])  # the full row: manifest and README
            if latest is not None:
                doc["manifest"] = json.loads(latest["manifest_json"])
                doc["manifest_toml"] = latest["manifest_toml"]
                doc["readme_markdown"] = latest["readme"]
                doc["readme_html"] = render_readme(latest["readme"]) if latest["readme"] is not None else None
                doc["readme_source"] = "artifact" if latest["readme"] is not None else "none"
                meta = doc["manifest"].get("metadata")
                doc["metadata"] = metadata_doc(meta if isinstance(meta, dict) else {})
                doc["targets"] = sorted((doc["manifest"].get("targets") or {}).keys()) \
                    if isinstance(doc["manifest"].get("targets"), dict) else []
            doc["runtime_config"] = self.store.runtime_config(scoped) or {"targets": {}}
            return doc
        return json_response(await run_in_threadpool(run))

    async def distributions(self, request: Request) -> Response:
        p, s, scoped = self.scope(request)
        rel = await run_in_threadpool(self.store.resolve_release, p, s, request.query_params.get("version"))
        base = self.base_url(request)
        doc = {
            "version": rel["version"], "artifact_url": self.artifact_url(request, scoped, rel["version"],
                                                                         rel["file_name"]),
            "sha256": "sha256:" + rel["sha256"], "blake3": label(rel["blake3"]), "file_name": rel["file_name"],
            "size_bytes": rel["size_bytes"], "manifest_hash": rel["manifest_hash"],
            "spliceable": rel["layout"] is not None, **signature_fields(rel),
            "yanked": rel["yanked_at"] is not None,
            "skeleton_url": (f"{base}/v1/releases/{quote(p)}/{quote(s)}/{quote(rel['version'])}/skeleton"
                             if rel["layout"] is not None else None),
        }
        return json_response(doc)

    async def download(self, request: Request) -> Response:
        p, s, scoped = self.scope(request)
        rel = await run_in_threadpool(self.store.resolve_release, p, s, request.query_params.get("version"))
        return RedirectResponse(self.artifact_url(request, scoped, rel["version"], rel["file_name"]), status_code=302)

    async def artifact(self, request: Request) -> Response:
        _p, _s, scoped = self.scope(request)
        version, file_name = request.path_params["version"], request.path_params["file_name"]
        check_version(version)
        check_file_name(file_name)
        rel = await run_in_threadpool(self.store.release, scoped, version)
        if rel is None or rel["file_name"] != file_name:
            raise RegistryError(404, "not_found", "Artifact not found")
        headers = {"x-ato-sha256": "sha256:" + rel["sha256"], "x-ato-blake3": label(rel["blake3"])}
        key = self.store.release_key(rel)
        local = self.store.blobs.local_path(key)
        if local is not None:
            return BigFileResponse(local, media_type="application/octet-stream", headers=headers)
        if self.redirect_downloads:
            url = await run_in_threadpool(self.store.blobs.presign, key)
            if url:
                return RedirectResponse(url, status_code=307, headers=headers)
        return blob_response(self.store, key, int(rel["size_bytes"]), request.headers.get("range"), headers)

    async def skeleton(self, request: Request) -> Response:
        p, s, _scoped = self.scope(request)
        version = request.path_params["version"]

        def run() -> dict[str, Any]:
            return self.store.skeleton(self.store.resolve_release(p, s, version))
        return json_response(await run_in_threadpool(run))

    async def release_manifest(self, request: Request) -> Response:
        p, s, _scoped = self.scope(request)
        rel = await run_in_threadpool(self.store.resolve_release, p, s, request.path_params["version"])
        data = await run_in_threadpool(self.store.payload_manifest_bytes, rel["payload_hash"])
        if data is None:
            raise RegistryError(404, "not_found", "payload v3 manifest not found")
        return Response(data, media_type="application/json")

    async def get_chunk(self, request: Request) -> Response:
        try:
            raw = parse(request.path_params["raw_hash"])
        except DigestError:
            raise RegistryError(400, "invalid_chunk_hash", "not a blake3 chunk hash") from None
        frame = await run_in_threadpool(self.store.chunk_frame, raw)
        if frame is None:
            raise RegistryError(404, "not_found", "Chunk not found")
        return Response(frame, media_type="application/zstd",
                        headers={"cache-control": "public, max-age=31536000, immutable"})

    async def fetch_chunks(self, request: Request) -> Response:
        body = await self.read_json(request, 2 << 20)
        wanted = body.get("chunks") if isinstance(body, dict) else None
        if not isinstance(wanted, list) or len(wanted) > MAX_FETCH_CHUNKS:
            raise RegistryError(400, "invalid_request", f"chunks must be a list of at most {MAX_FETCH_CHUNKS} hashes")
        try:
            hexes = [parse(str(h)) for h in wanted]
        except DigestError as exc:
            raise RegistryError(400, "invalid_chunk_hash", str(exc)) from None
        total, runs = await run_in_threadpool(self.store.frame_runs, hexes)
        return StreamingResponse(iterate_in_threadpool(self.store.read_pieces(runs)),
                                 media_type="application/octet-stream", headers={"content-length": str(total)})

    async def runtime_config(self, request: Request) -> Response:
        _p, _s, scoped = self.scope(request)
        if request.method == "PUT":
            self.require_write(request)
            body = await self.read_json(request, 1 << 20)
            return json_response(await run_in_threadpool(self.store.put_runtime_config, scoped, body))
        pkg = await run_in_threadpool(self.store.package, scoped)
        if pkg is None:
            raise RegistryError(404, "not_found", "Capsule not found")
        return json_response(await run_in_threadpool(self.store.runtime_config, scoped) or {"targets": {}})

    # ---------------------------------------------------------------- write routes

    async def upload(self, request: Request) -> Response:
        p, s, scoped = self.scope(request)
        self.require_write(request, publisher=p)
        return await self._upload(request, p, s, scoped, request.path_params["version"])

    async def publish_ci(self, request: Request) -> Response:
        """``POST /v1/publish/ci``: a CI upload authorised by an OIDC token bound to one repository;
        the publisher is the repository owner."""
        presented = self.presented_token(request)
        repo = next((r for tok, r in self.oidc_tokens.items() if presented and tokens_equal(tok, presented)), None)
        if repo is None:
            raise RegistryError(401, "unauthorized", "OIDC token is missing or not trusted by this Store")
        claimed = request.headers.get("x-ato-repository", "")
        if claimed.lower() != repo.lower():
            raise RegistryError(403, "forbidden", f"OIDC token is for repository '{repo}', not '{claimed}'")
        p = normalize_segment(repo.split("/")[0])
        s = request.query_params.get("slug", "")
        scoped = check_scope(p, s)
        return await self._upload(request, p, s, scoped, request.query_params.get("version", ""))

    async def _upload(self, request: Request, p: str, s: str, scoped: str, version: str) -> Response:
        check_version(version)
        file_name = request.query_params.get("file_name") or f"{s}-{version}.capsule"
        check_file_name(file_name)
        headers = {}
        for name in ("x-ato-sha256", "x-ato-blake3"):
            if not request.headers.get(name):
                raise RegistryError(400, "missing_header", f"required header '{name}' is missing")
            headers[name] = request.headers[name]
        want_sha = bare_hex(headers["x-ato-sha256"], "x-ato-sha256", "sha256")
        want_b3 = bare_hex(headers["x-ato-blake3"], "x-ato-blake3", "blake3")
        allow = _bool(request.query_params.get("allow_existing"), "allow_existing")
        tmp = self.store.new_temp(name=file_name)
        stream: ArtifactStream | None = None
        try:
            pieces, expected = None, None
            if request.headers.get("x-ato-skeleton"):
                pieces, expected, stream = await self._skeleton_ahead(request, tmp)
            started_ns = time.time_ns()
            sha, b3, size, stream = await receive_to_file(request, tmp, MAX_UPLOAD_BYTES, pieces=pieces,
                                                          expected=expected, stream=stream)
            stop_point("registry.upload-received")  # crash tests: the uploaded artifact in a temp file
            if sha != want_sha:
                raise RegistryError(422, "hash_mismatch", "sha256 mismatch")
            if b3 != want_b3:
                raise RegistryError(422, "hash_mismatch", "blake3 mismatch")
            if stream is not None:
                verdict = await run_in_threadpool(stream.finish)
                stream = None
                if verdict.ok:  # judged while it arrived: the check below takes this verdict (re-hashed)
                    await run_in_threadpool(placed, verdict, tmp, started_ns)
            upload = Upload(tmp, p, s, version, file_name, allow, sha, b3, size)
            status, doc = await run_in_threadpool(self.store.publish, upload)
        finally:
            if stream is not None:
                stream.close()
            tmp.unlink(missing_ok=True)
        doc["artifact_url"] = self.artifact_url(request, scoped, doc["version"], doc["file_name"])
        return json_response(doc, status)

    async def _skeleton_ahead(self, request: Request, tmp: Path
                              ) -> tuple[AsyncIterator[bytes], int, ArtifactStream | None]:
        """An upload whose body starts with the artifact's prefix and suffix (the bytes around its payload,
        ``x-ato-skeleton: <prefix>,<suffix>``), then the artifact: the small members are judged first
        (:func:`verify_skeleton`) and the artifact's bytes pass through the verifier's stream as they
        arrive. Returns the rest of the body, its length, and the stream (None when the skeleton is
        refused: the artifact is then judged whole once received, in the verifier's usual words)."""
        declared = request.headers.get("content-length") or ""
        if not declared.isdigit():
            raise RegistryError(411, "length_required", "an upload with x-ato-skeleton needs a content-length")
        total = int(declared)
        if total > MAX_UPLOAD_BYTES + MAX_SKELETON:
            raise RegistryError(413, "payload_too_large", f"upload of {total} bytes exceeds the "
                                                          f"{MAX_UPLOAD_BYTES}-byte limit")
        a, b = skeleton_lengths(request.headers["x-ato-skeleton"], total)
        head, rest = await split_head(request.stream(), a + b)
        size = total - a - b
        if size < a + b:
            return rest, size, None  # not an artifact with that skeleton: the whole-file check says why
        skeleton = await run_in_threadpool(lambda: verify_skeleton(head[:a], size - a - b, head[a:],
                                                                   limits=self.store.limits))
        return rest, size, verify_stream(skeleton, tmp) if skeleton.ok else None

    async def negotiate(self, request: Request) -> Response:
        self.require_write(request, any_user=True)
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise RegistryError(400, "invalid_request", "body must be a JSON object")
        return json_response(await run_in_threadpool(self.store.negotiate, body))

    async def put_chunk(self, request: Request) -> Response:
        self.require_write(request, any_user=True)
        try:
            raw = parse(request.path_params["raw_hash"])
        except DigestError:
            raise RegistryError(400, "invalid_chunk_hash", "not a blake3 chunk hash") from None
        raw_size_text = request.headers.get("x-raw-size", "")
        if not raw_size_text.isdigit():
            raise RegistryError(400, "missing_header", "required header 'x-raw-size' is missing or invalid")
        raw_size = int(raw_size_text)
        if raw_size <= 0:
            raise RegistryError(400, "invalid_chunk_size", "x-raw-size must be positive")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_FRAME:
                raise RegistryError(413, "payload_too_large", f"a chunk frame is at most {MAX_FRAME} bytes")
        session = request.query_params.get("session")
        doc = await run_in_threadpool(self.store.stage_chunk, session, raw, raw_size, bytes(body))
        return json_response(doc, 201 if doc["inserted"] else 200)

    async def sync_chunks(self, request: Request) -> Response:
        self.require_write(request, any_user=True)
        session = request.query_params.get("session", "")
        self.store.check_session(session)
        tmp = self.store.new_temp(".frames")
        try:
            await receive_to_file(request, tmp, MAX_UPLOAD_BYTES)
            stop_point("registry.upload-received")  # crash tests: the frames in a temp file, none staged
            staged = await run_in_threadpool(self.store.stage_frames, session, tmp)
        except RegistryError:
            await run_in_threadpool(self.store.drop_session, session)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return json_response({"session_id": session, "chunks": staged,
                              "inserted": sum(1 for c in staged if c["inserted"])})

    async def commit(self, request: Request) -> Response:
        self.require_write(request, any_user=True)
        session = request.query_params.get("session") or None
        try:
            return await self._commit(request, session)
        finally:
            if session:
                await run_in_threadpool(self.store.drop_session, session)

    async def _commit(self, request: Request, session: str | None) -> Response:
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise RegistryError(400, "invalid_request", "body must be a JSON object")
        if session is None and body.get("session_id"):
            session = str(body["session_id"])
        if session:
            self.store.check_session(session)
        p, s = str(body.get("publisher", "")), str(body.get("slug", ""))
        scoped = check_scope(p, s)
        self.require_write(request, publisher=p)
        version = str(body.get("version", ""))
        check_version(version)
        file_name = str(body.get("file_name") or f"{s}-{version}.capsule")
        check_file_name(file_name)
        want_sha = bare_hex(str(body.get("sha256") or request.headers.get("x-ato-sha256", "")), "sha256", "sha256")
        want_b3 = bare_hex(str(body.get("blake3") or request.headers.get("x-ato-blake3", "")), "blake3")
        allow = bool(body.get("allow_existing"))
        rel = await run_in_threadpool(self.store.release, scoped, version)
        if rel is not None:
            probe = Upload(Path("/nonexistent"), p, s, version, file_name, allow, want_sha, want_b3, 0)
            doc = self.store.existing_outcome(rel, probe)
            doc["artifact_url"] = self.artifact_url(request, scoped, doc["version"], doc["file_name"])
            return json_response(doc, 200)
        try:
            prefix = base64.b64decode(str(body.get("prefix", "")), validate=True)
            suffix = base64.b64decode(str(body.get("suffix", "")), validate=True)
            chunks = [(parse(str(c["raw_hash"])), int(c["raw_size"])) for c in body.get("chunks") or []]
        except (binascii.Error, ValueError, KeyError, TypeError, OverflowError, DigestError) as exc:
            raise RegistryError(400, "invalid_request", f"malformed commit body: {exc}") from None
        tmp, sha, b3, size = await run_in_threadpool(self.store.reconstruct, session, prefix, suffix, chunks,
                                                     file_name)
        try:
            if sha != want_sha:
                raise RegistryError(422, "hash_mismatch", "sha256 mismatch")
            if b3 != want_b3:
                raise RegistryError(422, "hash_mismatch", "blake3 mismatch")
            upload = Upload(tmp, p, s, version, file_name, allow, sha, b3, size, session)
            status, doc = await run_in_threadpool(self.store.publish, upload)
        finally:
            tmp.unlink(missing_ok=True)
        doc["artifact_url"] = self.artifact_url(request, scoped, doc["version"], doc["file_name"])
        return json_response(doc, status)

    async def yank(self, request: Request) -> Response:
        """``POST .../yank {"version", "yanked": true|false}``: yank a version, or restore it."""
        self.require_write(request)
        p, s, _scoped = self.scope(request)
        body = await self.read_json(request, 1 << 16)
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise RegistryError(400, "invalid_request", 'body must be {"version": "<version>", "yanked": true|false}')
        yanked = body.get("yanked", True)
        if not isinstance(yanked, bool):
            raise RegistryError(400, "invalid_request", "yanked must be true or false")
        return json_response(await run_in_threadpool(self.store.yank, p, s, body["version"], yanked))

    async def delete(self, request: Request) -> Response:
        self.require_write(request)
        p, s, _scoped = self.scope(request)
        if not _bool(request.query_params.get("confirmed"), "confirmed"):
            raise RegistryError(400, "confirmation_required", "confirmed=true is required")
        version = request.query_params.get("version") or None
        return json_response(await run_in_threadpool(self.store.delete, p, s, version))

    # ---------------------------------------------------------------- web UI

    async def ui(self, request: Request) -> Response:
        rel = request.path_params.get("path", "") or "index.html"
        if ".." in rel or "\\" in rel or rel.startswith("/"):
            raise RegistryError(404, "not_found", "Not found")
        path = WEB_DIR / rel
        if not path.is_file():
            path = WEB_DIR / "index.html"
        if not path.is_file():
            return Response("Web UI assets are missing from this installation of ato", 503,
                            media_type="text/plain")
        cache = "no-cache" if path.name == "index.html" else "public, max-age=300"
        return FileResponse(path, headers={"cache-control": cache, "content-security-policy": UI_CSP,
                                           "x-content-type-options": "nosniff"})

    # ---------------------------------------------------------------- Store API subset (issue 8)

    async def whoami(self, request: Request) -> Response:
        handle = self.user_for(request)
        if handle is None:
            raise RegistryError(401, "unauthorized", "session token is missing or not valid for this Store")
        return json_response({"handle": handle, "publisher": self.publisher_doc(handle),
                              "dock_url": f"{self.base_url(request)}/d/{quote(handle)}"})

    async def source_register(self, request: Request) -> Response:
        handle = self.require_user(request)
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise RegistryError(400, "invalid_json", "body must be a JSON object")
        return json_response(await run_in_threadpool(self.sources.register, handle, body), 201)

    async def source_detail(self, request: Request) -> Response:
        handle = self.require_user(request)
        return json_response(self.sources.owned(request.path_params["source_id"], handle))

    async def source_preflight(self, request: Request) -> Response:
        handle = self.require_user(request)
        self.sources.owned(request.path_params["source_id"], handle)
        body = await self.read_json(request)
        op = body.get("operation") if isinstance(body, dict) else None
        if op not in ("rebuild", "sync"):
            raise RegistryError(400, "invalid_operation", f"unknown source operation {op!r}")
        return json_response({"ok": True, "operation": op})

    async def source_rebuild(self, request: Request) -> Response:
        handle = self.require_user(request)
        src = self.sources.owned(request.path_params["source_id"], handle)
        body = await self.read_json(request)
        ref = body.get("ref") if isinstance(body, dict) else None
        if ref is not None and (not isinstance(ref, str) or not ref.strip() or ref.startswith("-")):
            raise RegistryError(400, "invalid_ref", "ref must be a branch, tag or commit")
        run = await run_in_threadpool(self.sources.rebuild, src, ref)
        return json_response(run, 202)

    async def source_sync_run(self, request: Request) -> Response:
        handle = self.require_user(request)
        sid = request.path_params["source_id"]
        self.sources.owned(sid, handle)
        return json_response(self.sources.run(sid, request.path_params["run_id"]))

    async def dock(self, request: Request) -> Response:
        handle = request.path_params["handle"]

        def run() -> dict[str, Any]:
            rows = [self.search_row(r, self.store.release(r["scoped_id"], r["latest_version"], summary=True))
                    for r in self.store.search_all() if r["publisher"] == handle]
            return {"handle": handle, "capsules": rows}
        return json_response(await run_in_threadpool(run))

    async def fallback(self, request: Request) -> Response:
        if request.url.path == "/v1" or request.url.path.startswith("/v1/"):
            raise RegistryError(404, "not_found", "API route not found")
        if request.method not in ("GET", "HEAD"):
            raise RegistryError(405, "method_not_allowed", "Method not allowed")
        return await self.ui(request)


def create_app(store: RegistryStore, token: str | None, listen_url: str,
               store_users: dict[str, str] | None = None, oidc_tokens: dict[str, str] | None = None,
               redirect_downloads: bool = False) -> Starlette:
    h = RegistryApp(store, token, listen_url, store_users, oidc_tokens, redirect_downloads)
    cap = "/v1/capsules/by/{publisher}/{slug}"
    man = "/v1/manifest/capsules/by/{publisher}/{slug}"
    routes = [
        Route("/.well-known/capsule.json", api(h.well_known), methods=["GET"]),
        Route("/v1/capsules", api(h.search), methods=["GET"]),
        Route("/v1/manifest/capsules", api(h.search), methods=["GET"]),
        Route(cap, api(h.detail), methods=["GET"]),
        Route(man, api(h.detail), methods=["GET"]),
        Route(cap + "/distributions", api(h.distributions), methods=["GET"]),
        Route(man + "/distributions", api(h.distributions), methods=["GET"]),
        Route(cap + "/download", api(h.download), methods=["GET"]),
        Route(man + "/download", api(h.download), methods=["GET"]),
        Route("/v1/artifacts/{publisher}/{slug}/{version}/{file_name}", api(h.artifact), methods=["GET"]),
        Route("/v1/local/capsules/{publisher}/{slug}/{version}", api(h.upload), methods=["PUT"]),
        Route("/v1/local/capsules/by/{publisher}/{slug}/runtime-config", api(h.runtime_config),
              methods=["GET", "PUT"]),
        Route("/v1/local/capsules/by/{publisher}/{slug}", api(h.delete), methods=["DELETE"]),
        Route("/v1/local/capsules/by/{publisher}/{slug}/yank", api(h.yank), methods=["POST"]),
        Route("/v1/sync/negotiate", api(h.negotiate), methods=["POST"]),
        Route("/v1/sync/chunks", api(h.sync_chunks), methods=["POST"]),
        Route("/v1/sync/commit", api(h.commit), methods=["POST"]),
        Route("/v1/chunks/fetch", api(h.fetch_chunks), methods=["POST"]),
        Route("/v1/chunks/{raw_hash}", api(h.get_chunk), methods=["GET"]),
        Route("/v1/chunks/{raw_hash}", api(h.put_chunk), methods=["PUT"]),
        Route("/v1/releases/{publisher}/{slug}/{version}/skeleton", api(h.skeleton), methods=["GET"]),
        Route("/v1/releases/{publisher}/{slug}/{version}/manifest", api(h.release_manifest), methods=["GET"]),
        Route("/v1/auth/whoami", api(h.whoami), methods=["GET"]),
        Route("/v1/publish/ci", api(h.publish_ci), methods=["POST"]),
        Route("/v1/sources", api(h.source_register), methods=["POST"]),
        Route("/v1/sources/{source_id}", api(h.source_detail), methods=["GET"]),
        Route("/v1/sources/{source_id}/preflight", api(h.source_preflight), methods=["POST"]),
        Route("/v1/sources/{source_id}/rebuild", api(h.source_rebuild), methods=["POST"]),
        Route("/v1/sources/{source_id}/sync-runs/{run_id}", api(h.source_sync_run), methods=["GET"]),
        Route("/d/{handle}", api(h.dock), methods=["GET"]),
        Route("/", api(h.ui), methods=["GET"]),
        Route("/ui/{path:path}", api(h.ui), methods=["GET"]),
        Route("/{rest:path}", api(h.fallback)),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.scope["path"]  # not request.url.path: URL parsing drops newlines and tabs
        if exc.status_code == 404 and _UNFIT_IN_PATH.search(path):  # a newline matches no ``{x:path}`` route
            return error_response(RegistryError(400, "invalid_parameter", "the path holds a control character or "
                                                f"bytes that are not UTF-8: '{_escaped(path)}'"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response({"error": code, "message": str(exc.detail)}, exc.status_code)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# -------------------------------------------------------------------- start-up


def is_loopback(host: str) -> bool:
    text = host.strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    text = host.strip("[]")
    return f"[{text}]" if ":" in text else text


def access_host(host: str) -> str:
    text = host.strip("[]")
    if text in ("0.0.0.0", ""):
        return "127.0.0.1"
    if text == "::":
        return "[::1]"
    return url_host(text)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen; any failure is a one-line AtoError with exit code 3."""
    target = host.strip("[]")
    if not 0 <= port <= 65535:
        raise AtoError("E100", f"--port must be between 0 and 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(target, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise AtoError(E_NETWORK, f"Invalid listen address {host}:{port}: cannot resolve host {host!r} "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
    family, stype, proto, _canon, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"{url_host(target)}:{port}"
        message = f"Failed to bind {where}: {exc.strerror or exc}"
        if exc.errno == errno.EADDRINUSE:
            message += (". Another process is already listening on that port. Try a different `--port` or inspect "
                        f"listeners with `lsof -nP -iTCP:{port} -sTCP:LISTEN`.")
        elif exc.errno == errno.EADDRNOTAVAIL:
            message += ". The requested host is not available on this machine."
        elif exc.errno == errno.EACCES:
            message += ". Permission was denied while opening the socket."
        raise AtoError(E_NETWORK, message) from None
    sock.setblocking(False)
    return sock


def check_exposure(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise AtoError(E_POLICY, "--auth-token is required when binding the local registry to a non-loopback "
                       f"host ({host})", hint="pass --auth-token <token> (clients then publish with ATO_TOKEN)",
                       problems=[Problem("ATO_ERR_POLICY_VIOLATION", "non-loopback registry without write auth",
                                         {"host": host})])


GC_INTERVAL_SECONDS = 60.0
WORKER_SETTINGS_ENV = "ATO_REGISTRY_WORKER_SETTINGS"  # what a spawned worker builds its app from


def start_gc(store: RegistryStore, interval: float, grace: float) -> threading.Event:
    """Sweep expired upload sessions and unreferenced files every ``interval`` seconds in a daemon
    thread (every worker does; the index makes concurrent sweeps safe). Set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                store.gc(grace)
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick
                log.exception("registry gc sweep failed")
    threading.Thread(target=loop, name="registry-gc", daemon=True).start()
    return stop


def worker_app() -> Starlette:
    """The app of one ``--workers`` process (uvicorn's factory): everything from the parent's settings."""
    settings = json.loads(os.environ[WORKER_SETTINGS_ENV])
    store = RegistryStore(Path(settings["data_dir"]), settings["database"], Limits(settings["max_payload"]),
                          settings["blob_store"])
    start_gc(store, settings["gc_interval"], settings["gc_grace"])
    return create_app(store, settings["token"], settings["listen_url"], settings["store_users"],
                      settings["oidc_tokens"], settings["redirect_downloads"])


def announce_when_serving(url: str, ready: dict[str, Any], on_ready: Callable[[dict[str, Any]], None]) -> None:
    """With ``--workers``: say "serving" once a worker answers on the socket."""
    import urllib.request

    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/.well-known/capsule.json", timeout=5) as resp:
                if resp.status == 200:
                    on_ready(ready)
                    return
        time.sleep(0.1)


def serve(host: str, port: int, data_dir: Path, token: str | None, *,
          on_ready: Callable[[dict[str, Any]], None], log_level: str = "warning",
          store_users: dict[str, str] | None = None, oidc_tokens: dict[str, str] | None = None,
          limits: Limits | None = None, database: str | None = None, workers: int = 1,
          gc_interval: float = GC_INTERVAL_SECONDS, gc_grace: float = GC_GRACE_SECONDS,
          blob_store: str | None = None, redirect_downloads: bool = False) -> None:
    """Check, bind, migrate the index, report, then serve until SIGINT/SIGTERM.

    With ``workers`` > 1 the socket is bound here and handed to that many uvicorn worker
    processes (restarted when one dies); each opens the index and data dir itself."""
    import uvicorn

    token = (token or "").strip() or None
    check_exposure(host, token)
    if workers < 1:
        raise AtoError("E100", f"--workers must be at least 1 (got {workers})")
    sock = bind_socket(host, port)
    try:
        store = RegistryStore(data_dir, database, limits, blob_store)
        store.initialize()
        actual_port = sock.getsockname()[1]
        listen_url = f"http://{url_host(host)}:{actual_port}"
        access = f"http://{access_host(host)}:{actual_port}"
        ready = {"url": access, "listen_url": listen_url, "host": host, "port": actual_port,
                 "data_dir": str(store.root), "api": f"{access}/v1/", "web_ui": f"{access}/",
                 "write_auth_required": bool(token), "database": store.index.describe(), "workers": workers,
                 "blob_store": store.blobs.url}
        # a Ctrl-C before the event loop runs leaves uvicorn's coroutine unawaited: nothing to warn about
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        if workers == 1:
            app = create_app(store, token, listen_url, store_users, oidc_tokens, redirect_downloads)
            config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                    timeout_keep_alive=30, server_header=False)

            class Announced(uvicorn.Server):
                """Says "serving" once it is, with its signal handlers in place (a Ctrl-C then stops it quietly)."""

                async def startup(self, sockets: list[Any] | None = None) -> None:
                    await super().startup(sockets=sockets)
                    if self.started:
                        on_ready(ready)

            stop_gc = start_gc(store, gc_interval, gc_grace)
            try:
                Announced(config).run(sockets=[sock])
            finally:
                stop_gc.set()
                store.close()
            return
        store.close()
        from uvicorn.supervisors import Multiprocess

        os.environ[WORKER_SETTINGS_ENV] = json.dumps({
            "data_dir": str(store.root), "database": database, "token": token, "listen_url": listen_url,
            "store_users": store_users or {}, "oidc_tokens": oidc_tokens or {}, "gc_interval": gc_interval,
            "gc_grace": gc_grace, "max_payload": store.limits.max_payload, "blob_store": blob_store,
            "redirect_downloads": redirect_downloads})
        config = uvicorn.Config("pipeline.registry.server:worker_app", factory=True, workers=workers,
                                log_level=log_level, access_log=False, lifespan="off", timeout_keep_alive=30,
                                server_header=False)
        threading.Thread(target=announce_when_serving, args=(access, ready, on_ready), daemon=True).start()
        Multiprocess(config, sockets=[sock]).run()
    finally:
        with contextlib.suppress(OSError):
            sock.close()
