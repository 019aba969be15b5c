"""Content-defined chunking of payload tars (FastCDC via the ``fastcdc`` package).

Boundaries depend only on content, so inserting or changing one file moves only
the chunks around it: a new version shares every other chunk with the old one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastcdc import fastcdc_cy

ALGORITHM = "fastcdc"
MIN_SIZE = 16 * 1024
AVG_SIZE = 64 * 1024
MAX_SIZE = 256 * 1024
SEED = 0


@dataclass(frozen=True)
class CdcParams:
    algorithm: str = ALGORITHM
    min_size: int = MIN_SIZE
    avg_size: int = AVG_SIZE
    max_size: int = MAX_SIZE
    seed: int = SEED

    def to_json(self) -> dict[str, object]:
        return {"algorithm": self.algorithm, "min_size": self.min_size, "avg_size": self.avg_size,
                "max_size": self.max_size, "seed": self.seed}


DEFAULT_PARAMS = CdcParams()


def chunk_spans(data: bytes | memoryview, params: CdcParams = DEFAULT_PARAMS) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of each chunk of ``data``; empty data yields nothing."""
    if len(data) == 0:
        return
    for chunk in fastcdc_cy.fastcdc_cy(data, params.min_size, params.avg_size, params.max_size,
                                       fat=False, hf=None):
        yield chunk.offset, chunk.length
