"""The frame format (raftkv.framing): length-prefixed frames cut from a byte stream however it
arrives, with the reader's limits enforced as soon as a length is in."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv.framing import (
    FrameDecoder,
    FrameError,
    encode_frame,
    frame_header,
    payloads_within,
)

frames_strategy = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)),
                           max_size=20)


def feed_in_pieces(decoder: FrameDecoder, data: bytes,
                   cuts: list[int]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    start = 0
    for cut in sorted(set(cuts)):
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    out.extend(decoder.feed(data[start:]))
    return out


@given(frames_strategy, st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_split_anywhere_come_out_whole_and_in_order(
        frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(kind, payload) for kind, payload in frames)
    decoder = FrameDecoder(1024)

    got = feed_in_pieces(decoder, data, [c % (len(data) + 1) for c in cuts])

    assert got == frames
    assert decoder.pending_bytes == 0


def test_one_byte_at_a_time_delivers_each_frame_when_its_last_byte_arrives() -> None:
    frames = [(7, b"hello"), (1, b""), (255, bytes(range(256)))]
    data = b"".join(encode_frame(k, p) for k, p in frames)
    decoder = FrameDecoder(1 << 16)
    got: list[tuple[int, bytes]] = []
    completed_at: list[int] = []

    for i in range(len(data)):
        new = decoder.feed(data[i : i + 1])
        if new:
            completed_at.append(i + 1)
        got.extend(new)

    assert got == frames
    ends = [len(encode_frame(*frames[0])), len(encode_frame(*frames[0]))
            + len(encode_frame(*frames[1])), len(data)]
    assert completed_at == ends


def test_a_large_frame_arriving_in_many_reads_is_reassembled_once_complete() -> None:
    payload = random.Random(3).randbytes(3 << 20)
    data = encode_frame(9, payload) + encode_frame(10, b"after")
    decoder = FrameDecoder(4 << 20)
    got: list[tuple[int, bytes]] = []
    for start in range(0, len(data), 65536):
        got.extend(decoder.feed(data[start : start + 65536]))
    assert got == [(9, payload), (10, b"after")]


def test_frame_exactly_at_the_limit_passes_and_one_byte_more_is_refused() -> None:
    limit = 100
    at_limit = encode_frame(1, bytes(limit - 1))  # kind byte + payload = limit
    assert FrameDecoder(limit).feed(at_limit) == [(1, bytes(limit - 1))]

    with pytest.raises(FrameError) as caught:
        FrameDecoder(limit).feed(encode_frame(1, bytes(limit)))
    assert caught.value.reason == "frame_too_large"


def test_an_oversized_length_is_refused_as_soon_as_its_four_bytes_are_in() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(b"\x7f\xff") == []
    with pytest.raises(FrameError, match="frame_too_large"):
        decoder.feed(b"\xff\xff")  # the payload never needs to arrive


def test_zero_length_frame_is_malformed() -> None:
    with pytest.raises(FrameError) as caught:
        FrameDecoder(1024).feed(encode_frame(1, b"ok") + b"\x00\x00\x00\x00")
    assert caught.value.reason == "malformed"


def test_zero_length_split_from_its_header_is_malformed_too() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FrameError, match="malformed"):
        decoder.feed(b"\x00\x00")


def test_an_incomplete_tail_is_held_and_reported_as_pending() -> None:
    decoder = FrameDecoder(1024)
    data = encode_frame(3, b"whole") + encode_frame(3, b"cut short")[:7]
    assert decoder.feed(data) == [(3, b"whole")]
    assert decoder.pending_bytes == 7


def test_header_encodes_payload_length_plus_the_kind_byte() -> None:
    assert frame_header(5, 10) == b"\x00\x00\x00\x0b\x05"
    assert encode_frame(5, b"ab") == b"\x00\x00\x00\x03\x05ab"


@pytest.mark.parametrize("limit", [0, 1, 1 << 32])
def test_decoder_refuses_a_limit_that_cannot_hold_a_frame(limit: int) -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameDecoder(limit)


# --------------------------------------------------------------------------- payloads_within
def _encode(items: Sequence[bytes]) -> bytes:
    return b"".join(items)


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=60),
       st.integers(min_value=1, max_value=200),
       st.sampled_from([len, lambda _x: 1, lambda _x: 10**6]))
def test_payloads_within_keep_order_and_the_bound(
        items: list[bytes], limit: int, size_of: Callable[[bytes], int]) -> None:
    """With a right estimate (len), one far too low (the halving catches it) and one far too
    high (runs of one item)."""
    out = list(payloads_within(items, _encode, limit, size_of))
    assert [x for batch, _ in out for x in batch] == items
    for batch, payload in out:
        assert payload == _encode(batch) and batch
        assert len(payload) <= limit or len(batch) == 1


def _counting(calls: list[int]) -> Callable[[Sequence[bytes]], bytes]:
    def encode(items: Sequence[bytes]) -> bytes:
        calls.append(sum(map(len, items)))
        return _encode(items)
    return encode


def test_a_batch_that_fits_is_encoded_once_and_nothing_gives_nothing() -> None:
    calls: list[int] = []
    assert [len(b) for b, _ in payloads_within([b"ab"] * 10, _counting(calls), 20, len)] == [10]
    assert calls == [20]
    assert list(payloads_within([], _counting(calls), 20, len)) == []
    assert calls == [20]


def test_a_batch_too_large_is_cut_by_the_estimate_and_each_run_encoded_once() -> None:
    calls: list[int] = []
    runs = list(payloads_within([b"x" * 100] * 256, _counting(calls), 1600, len))
    assert [len(b) for b, _ in runs] == [16] * 16
    assert sum(calls) == 2 * 25_600  # the whole once (too large), then each run once


def test_an_item_over_the_bound_comes_out_alone() -> None:
    items = [b"a", b"x" * 50, b"b"]
    assert [list(b) for b, _ in payloads_within(items, _encode, 10, len)] == [
        [b"a"], [b"x" * 50], [b"b"]]
