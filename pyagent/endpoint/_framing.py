"""NDJSON framing with a line limit, enforced before anything is parsed (docs/protocol.md, "Framing").

Pure and synchronous so that it can be tested exhaustively; the session feeds it what the socket returns.
"""

from __future__ import annotations


class FrameSplitter:
    """Split a byte stream into frames (the bytes between two `\\n`), skipping empty lines.

    A frame of exactly `limit` bytes (newline not counted) is accepted, one byte more is refused: `feed` then returns
    the frames that came before the oversized one and sets `overflow`; the caller must stop feeding.
    Work is linear in the input: a partial line is only searched once for its newline.
    """

    __slots__ = ("limit", "overflow", "_partial")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflow = False
        self._partial = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for its newline."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflow:
            return []
        limit = self.limit
        if b"\n" not in data:
            self._partial += data
            if len(self._partial) > limit:
                self.overflow = True
            return []
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        lines = data.split(b"\n")
        rest = lines.pop()
        frames: list[bytes] = []
        for line in lines:
            if len(line) > limit:
                self.overflow = True
                return frames
            if line:
                frames.append(line)
        if len(rest) > limit:
            self.overflow = True
        elif rest:
            self._partial += rest
        return frames
