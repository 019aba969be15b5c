"""Origins: where a key of a translated (0.3 or v1) manifest was written in the source.

The 0.3 and v1 readers translate their document into the 0.2 form, and the 0.2
rules then run on that translation. An error found there names a translated key
(``targets.app.port``); :class:`Origins` maps it back to what the user wrote
(``port`` in a flat 0.3 file, ``web.port`` in v1), so every message points at a
line of the file on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import AtoError
from pipeline.manifest.keypath import key_path, parse_key_path

Parts = tuple[str | int, ...]


class Origins:
    """Translated key path -> source key path; the longest recorded prefix decides."""

    def __init__(self) -> None:
        self._map: dict[Parts, Parts] = {}

    def add(self, translated: Parts, source: Parts) -> None:
        self._map[tuple(translated)] = tuple(source)

    def source_of(self, parts: Parts) -> Parts:
        for cut in range(len(parts), -1, -1):
            head = tuple(parts[:cut])
            if head in self._map:
                return self._map[head] + tuple(parts[cut:])
        return tuple(parts)

    def rewrite(self, text: str, file: str) -> str:
        """``"<file>: <translated key>: ..."`` with the key replaced by its source path."""
        prefix = f"{file}: "
        if not text.startswith(prefix):
            return text
        key, sep, rest = text[len(prefix):].partition(": ")
        parts = parse_key_path(key)
        if not sep or parts is None:
            return text
        return f"{prefix}{key_path(self.source_of(tuple(parts))) or key}: {rest}"

    @contextmanager
    def errors_in_source_terms(self, file: str) -> Iterator[None]:
        """Rewrite the key path of any manifest error raised inside the block."""
        try:
            yield
        except AtoError as err:
            key = err.details.get("key")
            parts = parse_key_path(key) if isinstance(key, str) else None
            if parts is not None:
                err.details["key"] = key_path(self.source_of(tuple(parts)))
            err.message = self.rewrite(err.message, file)
            err.args = (err.message,)
            if isinstance(err.details.get("problems"), list):
                err.details["problems"] = list(dict.fromkeys(self.rewrite(p, file) if isinstance(p, str) else p
                                                             for p in err.details["problems"]))
            raise
