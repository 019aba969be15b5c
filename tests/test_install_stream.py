"""The spliced install's pass-through of a download that is every frame once, in order (stages.install)."""

from __future__ import annotations

import pytest

from pipeline.errors import AtoError
from stages.capsule.payload import FrameRef
from stages.install import Transfer, _FrameStream, _stream_through


class _Task:
    def __init__(self) -> None:
        self.bytes = self.chunks = 0

    def advance(self, n: int, chunks: int = 0) -> None:
        self.bytes += n
        self.chunks += chunks


FRAMES = [FrameRef("a" * 64, 10, size, "b" * 64) for size in (5, 7, 3, 9)]


def _run(pieces: list[bytes]) -> tuple[list[bytes], Transfer, _Task]:
    out: list[bytes] = []
    transfer, task = Transfer(), _Task()
    _stream_through(_FrameStream(iter(pieces)), FRAMES, out.append, task, transfer)
    return out, transfer, task


def test_the_pieces_go_on_as_they_come_and_the_frames_are_counted() -> None:
    data = bytes(range(24))
    out, transfer, task = _run([data[:4], data[4:13], b"", data[13:24]])
    assert b"".join(out) == data and out[0] == data[:4]  # the pieces themselves, not re-cut
    assert (transfer.chunks_downloaded, transfer.bytes_downloaded) == (4, 24)
    assert (task.bytes, task.chunks) == (24, 4)


@pytest.mark.parametrize(("pieces", "message"), [
    ([bytes(20)], "ended early (20 of 24 bytes)"),
    ([bytes(20), bytes(5)], "more chunk bytes than requested"),
    ([bytes(25)], "more chunk bytes than requested"),
])
def test_a_registry_that_sends_fewer_or_more_bytes_is_refused(pieces: list[bytes], message: str) -> None:
    with pytest.raises(AtoError) as refused:
        _run(pieces)
    assert refused.value.code == "E208" and message in str(refused.value)
