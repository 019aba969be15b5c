"""What the stages need from a registry: a port the product layer fills with its HTTP client.

Install and publish talk to a registry, but the stages sit below ``pipeline.registry``
(ARCHITECTURE.md §3), so they never import the client: the caller passes a
:data:`RegistryConnect` (``pipeline.registry.client.RegistryClient`` in the product) and the
stages speak only :class:`RegistryPort`. The errors a registry answers with live here too,
so a stage can tell "not found" or "already published" apart without knowing HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import AtoError


class RegistryHttpError(AtoError):
    """A registry answered with an error status (the code is already mapped: E100, E201, E208, E901 ...)."""

    def __init__(self, code: str, message: str, *, status: int, error: str, body: dict[str, Any],
                 **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)
        self.status = status
        self.error = error
        self.body = body


class VersionConflict(RegistryHttpError):
    """409 ``version_exists``: that version is already published (publish turns it into E202)."""


class RegistryPort(Protocol):
    """The registry calls install and publish make; a context manager that closes its connection."""

    base: str

    def __enter__(self) -> RegistryPort: ...

    def __exit__(self, *exc: object) -> None: ...

    def well_known(self) -> dict[str, Any]: ...

    def detail(self, publisher: str, slug: str) -> dict[str, Any]: ...

    def distribution(self, publisher: str, slug: str, version: str | None) -> dict[str, Any]: ...

    def skeleton(self, url: str) -> dict[str, Any] | None: ...

    def fetch_chunks(self, hexes: list[str]) -> Iterator[bytes]: ...

    def download(self, url: str) -> Iterator[bytes]: ...

    def negotiate(self, body: dict[str, Any]) -> dict[str, Any] | None: ...

    def upload_frames(self, session: str, pieces: Iterable[bytes], size: int) -> dict[str, Any]: ...

    def commit(self, session: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...

    def upload_artifact(self, publisher: str, slug: str, version: str, path: Path, *, file_name: str,
                        sha256: str, blake3_hex: str, allow_existing: bool,
                        sent: Callable[[int], None] | None = None,
                        check: Callable[[bytes, bool], None] | None = None,
                        skeleton: tuple[bytes, bytes] | None = None) -> tuple[int, dict[str, Any]]: ...

    def publish_ci(self, *, token: str, repository: str, slug: str, version: str, file_name: str, path: Path,
                   sha256: str, blake3_hex: str) -> dict[str, Any]: ...


RegistryConnect = Callable[..., RegistryPort]
"""``connect(base_url, token=None)`` → an open :class:`RegistryPort`."""
