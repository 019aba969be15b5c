"""HTTP client for registries (httpx): the calls publish, install and search make.

Failure mapping (what the CLI shows):

- a transport failure (refused, reset, timeout, DNS) → ``E900`` with exit code 3
  and a one-line message naming the registry;
- 401 → E201 with an ``ATO_ERR_AUTH_REQUIRED`` line: "requires a token" when none was sent
  (set ``ATO_TOKEN``), "rejected the token" when one was;
- 409 ``version_exists`` → :class:`VersionConflict` (the publish stage turns it
  into E202 with its next actions);
- 413 → E212; 422 integrity refusals → E208 with ``ATO_ERR_INTEGRITY_FAILURE``;
- 404 → E100 (the thing asked for is not in that registry);
- anything else → E999 naming the HTTP status and the server's message.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import (
    E_AUTH_REQUIRED,
    E_INTEGRITY,
    E_PAYLOAD_TOO_LARGE,
    E_SERVER,
    E_USAGE,
    AtoError,
    Problem,
    network_error,
)
from pipeline.names import parse_registry
from stages.registry_port import RegistryHttpError, VersionConflict


def _import_httpx() -> Any:
    """httpx, without trio. httpcore imports trio when it is installed (only to run under trio's event
    loop, which ato never does); where something else installed it (selenium, in a test environment)
    that import cost more than httpx itself on every install. trio is hidden for the duration of the
    import only: httpcore then treats it as absent, and a later ``import trio`` works as usual."""
    if "httpcore" in sys.modules or "trio" in sys.modules:
        import httpx
        return httpx
    sys.modules["trio"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        import httpcore  # noqa: F401 - httpx imports it only when its first client is made
        import httpx
    finally:
        del sys.modules["trio"]
    return httpx


httpx = _import_httpx()

USER_AGENT = "ato-cli (python)"
COPY = 1 << 20


class RegistryClient:
    """The HTTP registry behind :class:`stages.registry_port.RegistryPort`."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 300.0) -> None:
        self.base = parse_registry(base_url)
        self.token = (token or "").strip() or None
        # the system trust store via OpenSSL (honours SSL_CERT_FILE); ~4x cheaper to set up than httpx's default
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=15.0), follow_redirects=False,
                                 headers={"user-agent": USER_AGENT}, verify=ssl.create_default_context())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def _auth(self, write: bool) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if (write and self.token) else {}

    def request(self, method: str, path: str, *, write: bool = False, ok: tuple[int, ...] = (200, 201),
                **kwargs: Any) -> httpx.Response:
        headers = {**self._auth(write), **kwargs.pop("headers", {})}
        try:
            resp = self.http.request(method, self.url(path), headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code not in ok:
            raise self.error_for(resp, sent_token="authorization" in {k.lower() for k in headers})
        return resp

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, self.url(path), **kwargs) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise self.error_for(resp)
                yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> AtoError:
        err = network_error(f"registry {self.base}", exc, registry=self.base)
        err.hint = "is the registry running and the URL right?"
        return err

    def error_for(self, resp: httpx.Response, *, sent_token: bool = False) -> RegistryHttpError:
        try:
            body = resp.json()
            if not isinstance(body, dict):
                body = {}
        except ValueError:
            body = {}
        error = str(body.get("error") or "")
        message = str(body.get("message") or resp.text[:300] or resp.reason_phrase)
        status = resp.status_code
        common = {"status": status, "error": error, "body": body,
                  "details": {"registry": self.base, "status": status, "error": error}}
        if status == 401 and sent_token:
            return RegistryHttpError(
                E_AUTH_REQUIRED, f"registry {self.base} rejected the token (ATO_TOKEN): {message}",
                hint="ATO_TOKEN must be the token the registry was started with (--auth-token)",
                problems=[Problem("ATO_ERR_AUTH_REQUIRED", "registry rejected the Bearer token",
                                  {"registry": self.base, "token": "rejected"})], **common)
        if status == 401:
            return RegistryHttpError(
                E_AUTH_REQUIRED, f"registry {self.base} requires a token for this operation: {message}",
                hint="set ATO_TOKEN=<token> (the token the registry was started with)",
                problems=[Problem("ATO_ERR_AUTH_REQUIRED", "registry write requires a Bearer token",
                                  {"registry": self.base, "token": "missing"})], **common)
        if status == 409 and (error == "version_exists" or "already published" in message):
            return VersionConflict("E202", message, **common)
        if status == 413:
            return RegistryHttpError(E_PAYLOAD_TOO_LARGE, f"registry refused the upload as too large: {message}",
                                     **common)
        if status == 422:
            return RegistryHttpError(E_INTEGRITY, f"ATO_ERR_INTEGRITY_FAILURE: registry refused the artifact "
                                     f"({error}): {message}",
                                     problems=[Problem("ATO_ERR_INTEGRITY_FAILURE", message, {"error": error})],
                                     **common)
        if status == 404:
            return RegistryHttpError(E_USAGE, f"not found in registry {self.base}: {message}", **common)
        if status == 400:
            return RegistryHttpError(E_USAGE, f"registry refused the request ({error}): {message}", **common)
        return RegistryHttpError(E_SERVER, f"registry error ({status} {error}): {message}", **common)

    # ---------------------------------------------------------------- reads

    def well_known(self) -> dict[str, Any]:
        return response_json(self.request("GET", "/.well-known/capsule.json"))

    def search(self, q: str = "", limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"q": q, "limit": limit}
        if cursor:
            params["cursor"] = cursor
        return response_json(self.request("GET", "/v1/capsules", params=params))

    def detail(self, publisher: str, slug: str) -> dict[str, Any]:
        return response_json(self.request("GET", f"/v1/capsules/by/{quote(publisher)}/{quote(slug)}"))

    def distribution(self, publisher: str, slug: str, version: str | None) -> dict[str, Any]:
        params = {"version": version} if version else None
        return response_json(self.request("GET", f"/v1/capsules/by/{quote(publisher)}/{quote(slug)}/distributions",
                            params=params))

    def skeleton(self, url: str) -> dict[str, Any] | None:
        """The release skeleton, or None when the registry cannot serve one (older server, not spliceable)."""
        try:
            return response_json(self.request("GET", url))
        except RegistryHttpError as exc:
            if exc.status in (404, 405, 409, 501):
                return None
            raise

    def fetch_chunks(self, hexes: list[str]) -> Iterator[bytes]:
        """The frames of ``hexes``, concatenated, as a stream of byte pieces."""
        with self.stream("POST", "/v1/chunks/fetch", json={"chunks": ["blake3:" + h for h in hexes]}) as resp:
            yield from resp.iter_bytes()  # pieces as they arrive: re-chunking would copy every byte again

    def download(self, url: str) -> Iterator[bytes]:
        """An artifact's bytes; a registry run with ``--redirect-downloads`` answers with a redirect to
        a presigned URL of its bucket, which is followed (the bytes are checked against their digests
        either way, and no credentials are sent there)."""
        with self.stream("GET", url, follow_redirects=True) as resp:
            yield from resp.iter_bytes()

    # ---------------------------------------------------------------- writes

    def negotiate(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Chunk negotiation; None when the registry has no chunk protocol."""
        try:
            return response_json(self.request("POST", "/v1/sync/negotiate", write=True, json=body))
        except RegistryHttpError as exc:
            if exc.status in (404, 405, 501) and exc.error in ("", "not_found", "method_not_allowed"):
                return None
            raise

    def upload_frames(self, session: str, pieces: Iterable[bytes], size: int) -> dict[str, Any]:
        return response_json(self.request("POST", "/v1/sync/chunks", write=True, params={"session": session},
                            content=pieces, headers={"content-type": "application/zstd",
                                                     "content-length": str(size)}))

    def commit(self, session: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        params = {"session": session} if session else None
        resp = self.request("POST", "/v1/sync/commit", write=True, params=params, json=body)
        return resp.status_code, response_json(resp)

    def upload_artifact(self, publisher: str, slug: str, version: str, path: Path, *, file_name: str,
                        sha256: str, blake3_hex: str, allow_existing: bool,
                        sent: Callable[[int], None] | None = None,
                        check: Callable[[bytes, bool], None] | None = None,
                        skeleton: tuple[bytes, bytes] | None = None) -> tuple[int, dict[str, Any]]:
        """``PUT`` the whole artifact; ``sent(n)`` is told each piece's size as it goes out.

        ``check(piece, last)`` sees each piece before it is sent (``last``: no piece follows). When it
        raises, the upload is abandoned (the connection closes with the body incomplete, which a
        registry never stores) and the exception propagates. ``skeleton``: the artifact's (prefix,
        suffix) go ahead of it (``x-ato-skeleton``), so that the registry judges the artifact as it
        arrives (a registry says it can in its negotiate answer, ``skeleton_upload``)."""
        size = path.stat().st_size
        pieces = _file_pieces(path, check)
        headers = {"content-type": "application/octet-stream", "content-length": str(size),
                   "x-ato-sha256": "sha256:" + sha256, "x-ato-blake3": "blake3:" + blake3_hex}
        if skeleton is not None:
            prefix, suffix = skeleton
            pieces = itertools.chain([prefix + suffix], pieces)
            headers.update({"content-length": str(size + len(prefix) + len(suffix)),
                            "x-ato-skeleton": f"{len(prefix)},{len(suffix)}"})
        if sent is not None:
            pieces = _told(pieces, sent)
        params = {"file_name": file_name}
        if allow_existing:
            params["allow_existing"] = "true"
        resp = self.request(
            "PUT", f"/v1/local/capsules/{quote(publisher)}/{quote(slug)}/{quote(version)}", write=True,
            params=params, content=pieces, headers=headers)
        return resp.status_code, response_json(resp)

    def publish_ci(self, *, token: str, repository: str, slug: str, version: str, file_name: str, path: Path,
                   sha256: str, blake3_hex: str) -> dict[str, Any]:
        """``POST /v1/publish/ci``: the Store's OIDC upload (the token is the workflow's identity)."""
        size = path.stat().st_size
        resp = self.request(
            "POST", "/v1/publish/ci", content=_file_pieces(path),
            params={"slug": slug, "version": version, "file_name": file_name},
            headers={"authorization": f"Bearer {token}", "x-ato-repository": repository,
                     "content-type": "application/octet-stream", "content-length": str(size),
                     "x-ato-sha256": "sha256:" + sha256, "x-ato-blake3": "blake3:" + blake3_hex})
        return response_json(resp)

    def runtime_config(self, publisher: str, slug: str) -> dict[str, Any]:
        return response_json(self.request("GET", f"/v1/local/capsules/by/{quote(publisher)}/{quote(slug)}/runtime-config"))


def _file_pieces(path: Path, check: Callable[[bytes, bool], None] | None = None) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        data = fh.read(COPY)
        while data:
            following = fh.read(COPY)
            if check is not None:
                check(data, not following)
            yield data
            data = following


def _told(pieces: Iterator[bytes], sent: Callable[[int], None]) -> Iterator[bytes]:
    for piece in pieces:
        sent(len(piece))
        yield piece


def response_json(resp: httpx.Response) -> Any:
    """The body of a registry answer; one that is not JSON is the server's fault (E901), not a crash."""
    try:
        return resp.json()
    except ValueError:
        raise AtoError(E_SERVER, f"{resp.url} answered HTTP {resp.status_code} with a body that is not JSON",
                       details={"url": str(resp.url), "status": resp.status_code}) from None
