"""Frames over a byte stream: the one framing of every raftkv connection (peer to peer, and
Raft process to HTTP worker).

A frame is a 4-byte big-endian length N of what follows, one `kind` byte (the kinds are
raftkv.codec.FrameKind), then N - 1 payload bytes. N is at least 1 and at most the reader's
`max_frame_bytes`: anything else is a FrameError, and the reader closes the connection.
Sans-IO: `FrameDecoder.feed(bytes)` returns the complete frames; `frame_header` and
`encode_frame` build them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

__all__ = ["HEADER", "FrameDecoder", "FrameError", "encode_frame", "frame_header",
           "payloads_within"]

_T = TypeVar("_T")

HEADER: Final = struct.Struct(">IB")
_LENGTH: Final = struct.Struct(">I")
MAX_WIRE_LENGTH: Final = (1 << 32) - 1


class FrameError(Exception):
    """The stream broke the framing: `reason` is frame_too_large or malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def frame_header(kind: int, payload_bytes: int) -> bytes:
    return HEADER.pack(payload_bytes + 1, kind)


def encode_frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def payloads_within(items: Sequence[_T], encode: Callable[[Sequence[_T]], bytes],
                    max_bytes: int, size_of: Callable[[_T], int]) -> Iterator[
                        tuple[Sequence[_T], bytes]]:
    """(items, their payload) for consecutive runs of `items`, in order, each payload at most
    `max_bytes`. A batch that fits (the common case) is encoded once, as one run. One that
    does not is cut into runs by `size_of` (an estimate of an item's share of the payload),
    each encoded once, a run the estimate let grow too large halved again. A single item
    larger than `max_bytes` comes out alone: the caller decides what to do with it."""
    if not items:
        return
    payload = encode(items)
    if len(payload) <= max_bytes or len(items) == 1:
        yield items, payload
        return
    start, count = 0, len(items)
    while start < count:
        end, total = start, 0
        while end < count:
            total += size_of(items[end])
            if end > start and total > max_bytes:
                break
            end += 1
        yield from _halved(items[start:end], encode, max_bytes)
        start = end


def _halved(items: Sequence[_T], encode: Callable[[Sequence[_T]], bytes],
            max_bytes: int) -> Iterator[tuple[Sequence[_T], bytes]]:
    pending: list[Sequence[_T]] = [items]
    while pending:
        batch = pending.pop()
        payload = encode(batch)
        if len(payload) <= max_bytes or len(batch) == 1:
            yield batch, payload
        else:
            middle = len(batch) // 2
            pending.append(batch[middle:])
            pending.append(batch[:middle])


class FrameDecoder:
    """Turns received bytes into (kind, payload) frames; keeps any incomplete tail."""

    __slots__ = ("_buf", "_need", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        if not 2 <= max_frame_bytes <= MAX_WIRE_LENGTH:
            raise ValueError(f"max_frame_bytes must be in [2, {MAX_WIRE_LENGTH}]")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need = 0
        """Bytes the held-back tail must reach before it is worth parsing again."""

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by `data`, in order. Raises FrameError (the stream is then
        unusable) for a zero or oversized length, as soon as its 4 bytes are in."""
        held = self._buf
        if held:
            held += data
            if len(held) < self._need:
                return []  # a large frame still arriving: no copy, no parse
            buf: bytes | bytearray = held
        else:
            buf = data
        n = len(buf)
        pos = 0
        frames: list[tuple[int, bytes]] = []
        limit = self.max_frame_bytes
        unpack = HEADER.unpack_from
        need = 0
        while n - pos >= 4:
            if n - pos >= 5:
                length, kind = unpack(buf, pos)
            else:
                (length,) = _LENGTH.unpack_from(buf, pos)
                kind = -1
            if length == 0:
                raise FrameError("malformed", "zero-length frame")
            if length > limit:
                raise FrameError("frame_too_large", f"length={length} max={limit}")
            end = pos + 4 + length
            if end > n:
                need = end - pos
                break
            frames.append((kind, bytes(buf[pos + 5 : end])))
            pos = end
        if pos >= n:
            self._buf = bytearray()
        elif held:
            del held[:pos]
        else:
            self._buf = bytearray(buf[pos:])
        self._need = need
        return frames
