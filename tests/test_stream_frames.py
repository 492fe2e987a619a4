"""Framing on a TCP connection to the tracker port: STUN, ChannelData and text frames,
however the stream is cut; garbage and hoarding are refused with our error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import ProtocolError
from nattool.protocol.stream_frames import (
    MAX_TEXT_FRAME,
    ChannelDataFrame,
    StreamDeframer,
    StreamFramingError,
    StunFrame,
    TextFrame,
    text_frame,
)
from nattool.protocol.stun import MsgClass, StunMessage, binding_request
from nattool.protocol.turn import Data, RequestedTransport, TurnMethod, encode_channel_data

TXID = bytes(range(12))
STUN = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, (RequestedTransport(17),)).to_wire(fingerprint=True)
SEND = StunMessage(MsgClass.INDICATION, TurnMethod.SEND, TXID, (Data(b"abc"),)).to_wire()
ODD_CHANNEL_DATA = encode_channel_data(0x4001, b"hello", stream=True)  # 5 bytes + 3 of padding
TEXT = b"//nat" + bytes(10)

STREAM = (
    STUN + text_frame(TEXT) + ODD_CHANNEL_DATA + text_frame(b"") + binding_request(TXID) + SEND + text_frame(b"//tcksvr")
)
EXPECTED = [
    StunFrame(STUN),
    TextFrame(TEXT),
    ChannelDataFrame(ODD_CHANNEL_DATA[:9]),
    TextFrame(b""),
    StunFrame(binding_request(TXID)),
    StunFrame(SEND),
    TextFrame(b"//tcksvr"),
]


def test_text_frame_header() -> None:
    assert text_frame(b"//nat") == b"\x80\x05//nat"
    assert text_frame(b"x" * 1200)[:2] == b"\x84\xb0"
    assert text_frame(b"") == b"\x80\x00"  # the empty reply to //tcksvr
    with pytest.raises(StreamFramingError):
        text_frame(b"x" * (MAX_TEXT_FRAME + 1))


def test_whole_stream_at_once() -> None:
    assert StreamDeframer().feed(STREAM) == EXPECTED


def test_byte_by_byte() -> None:
    d = StreamDeframer()
    frames = []
    for i in range(len(STREAM)):
        frames += d.feed(STREAM[i : i + 1])
    assert frames == EXPECTED
    assert d.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_any_cut_gives_the_same_frames(cuts: list[int]) -> None:
    d = StreamDeframer()
    frames = []
    edges = [0, *sorted(cuts), len(STREAM)]
    for a, b in zip(edges, edges[1:]):
        frames += d.feed(STREAM[a:b])
    assert frames == EXPECTED


@pytest.mark.parametrize("first", [0x40, 0x4F, 0x50, 0x7F])
def test_channel_data_first_bytes_cover_rfc_5766_channels(first: int) -> None:
    frame = bytes([first, 0, 0, 1]) + b"x\0\0\0"
    assert StreamDeframer().feed(frame + STUN) == [ChannelDataFrame(frame[:5]), StunFrame(STUN)]


def test_after_garbage_the_stream_stays_broken() -> None:
    d = StreamDeframer()
    with pytest.raises(StreamFramingError):
        d.feed(STUN + b"\x84\xb1")
    with pytest.raises(StreamFramingError):
        d.feed(STUN)


def test_text_frame_lengths_out_of_range() -> None:
    for header in (b"\xff\xff", (0x8000 | (MAX_TEXT_FRAME + 1)).to_bytes(2, "big")):
        with pytest.raises(StreamFramingError):
            StreamDeframer().feed(header + b"x" * 10)


def test_buffer_bound() -> None:
    d = StreamDeframer(max_buffer=100)
    d.feed(b"\x00\x01\x00\x40")  # a STUN frame of 84 bytes announced: fine to wait for
    with pytest.raises(StreamFramingError):
        StreamDeframer(max_buffer=100).feed(b"\x00\x01\x03\xe8" + bytes(200))  # 1020 announced, 204 held
    assert issubclass(StreamFramingError, ProtocolError)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_raise_only_our_error(chunks: list[bytes]) -> None:
    d = StreamDeframer(max_buffer=256)
    try:
        for chunk in chunks:
            for frame in d.feed(chunk):
                assert isinstance(frame, (StunFrame, ChannelDataFrame, TextFrame))
    except StreamFramingError:
        pass
