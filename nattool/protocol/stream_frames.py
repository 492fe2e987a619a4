"""Frames on a TCP connection to the tracker port (docs/PROTOCOL.md section 9).

A byte stream carries back-to-back frames, told apart by their first byte
(RFC 7983 style):

- 0x00-0x3F: a STUN message, 20 + the header's length field bytes;
- 0x40-0x7F: TURN ChannelData, 4 + length field, padded to a multiple of 4
  (RFC 8656 section 12.5; channels up to 0x7FFF as RFC 5766 clients use them);
- 0x80-0xFF: a text frame (nattool extension): a 2-byte header ``0x8000 | N``
  (N = 0..1200) and N bytes, exactly what a UDP datagram would carry (N = 0: the empty
  reply to ``//tcksvr`` from a tracker that knows no other trackers);
- a text frame header with a length over 1200: garbage; the connection is to be
  closed.

Pure: :class:`StreamDeframer` takes the bytes as they come and returns whole frames.
One implementation for the server and the client.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from nattool.errors import ProtocolError
from nattool.protocol.limits import SAFE_DATAGRAM
from nattool.protocol.stun import HEADER_LEN

MAX_TEXT_FRAME = SAFE_DATAGRAM  # payload bytes; a UDP request is never longer
TEXT_FRAME_FLAG = 0x8000
# A STUN message or ChannelData frame is at most 64 KiB; two of them plus change.
DEFAULT_MAX_BUFFER = 2 * (0xFFFF + HEADER_LEN) + 4


class StreamFramingError(ProtocolError):
    """Bytes on a stream that are no frame: the connection must be closed."""


class StunFrame(NamedTuple):
    data: bytes  # the whole STUN message


class ChannelDataFrame(NamedTuple):
    data: bytes  # header + payload (the padding is not included)


class TextFrame(NamedTuple):
    payload: bytes  # what a UDP datagram would carry


Frame = Union[StunFrame, ChannelDataFrame, TextFrame]


def text_frame(payload: bytes) -> bytes:
    """Frame a text-protocol payload for a stream."""
    n = len(payload)
    if n > MAX_TEXT_FRAME:
        raise StreamFramingError(f"a text frame carries at most {MAX_TEXT_FRAME} bytes, not {n}")
    return (TEXT_FRAME_FLAG | n).to_bytes(2, "big") + payload


class StreamDeframer:
    """Cut a byte stream into frames. ``feed`` raises StreamFramingError on garbage or
    when more than ``max_buffer`` bytes would wait for the end of a frame; after an
    error the deframer is unusable (close the connection)."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.max_buffer = max_buffer
        self._buf = bytearray()
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken:
            raise StreamFramingError("the stream already had a framing error")
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 2:
                first = buf[pos]
                if first < 0x40:
                    if n - pos < 4:
                        break
                    size = HEADER_LEN + ((buf[pos + 2] << 8) | buf[pos + 3])
                    if n - pos < size:
                        break
                    frames.append(StunFrame(bytes(buf[pos : pos + size])))
                    pos += size
                elif first <= 0x7F:
                    if n - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    size = 4 + length
                    padded = size + (-length % 4)
                    if n - pos < padded:
                        break
                    frames.append(ChannelDataFrame(bytes(buf[pos : pos + size])))
                    pos += padded
                else:
                    length = ((first << 8) | buf[pos + 1]) & ~TEXT_FRAME_FLAG
                    if length > MAX_TEXT_FRAME:
                        raise StreamFramingError(f"text frame of {length} bytes (at most {MAX_TEXT_FRAME})")
                    if n - pos < 2 + length:
                        break
                    frames.append(TextFrame(bytes(buf[pos + 2 : pos + 2 + length])))
                    pos += 2 + length
        except StreamFramingError:
            self._broken = True
            self._buf = bytearray()
            raise
        del buf[:pos]
        if len(buf) > self.max_buffer:
            self._broken = True
            self._buf = bytearray()
            raise StreamFramingError(f"more than {self.max_buffer} bytes buffered without a whole frame")
        return frames
