"""Files an operator names in the settings (tokens, certificates, keys).

Each must be a regular file or a pipe (`<(pass show raftkv)`), of bounded size: a pipe is read
with a deadline (a FIFO nobody writes would block a read for ever), /dev/zero never ends, and a
directory or device is a mistake to report, not to read.
"""

from __future__ import annotations

import os
import select
import stat
import time
from typing import Final

MAX_SMALL_FILE_BYTES: Final = 1 << 20
"""Tokens, certificates and keys are a few KiB; a CA bundle may be a few hundred."""
PIPE_DEADLINE_S: Final = 5.0
"""How long the writer of a pipe may take to write it and close its end."""


class FileProblem(ValueError):
    """The file cannot be used; the message names it and says why."""


def _named(path: str) -> str:
    """`path` for a message: a long one by its start and its length."""
    return path if len(path) <= 120 else f"{path[:80]}... ({len(path):,} characters)"


def check_small_file(path: str, limit: int = MAX_SMALL_FILE_BYTES) -> None:
    """Raise FileProblem unless `path` is a readable regular file of at most `limit` bytes."""
    read_small_file(path, limit, keep=False, pipes=False)


def read_small_file(path: str, limit: int = MAX_SMALL_FILE_BYTES, *,
                    keep: bool = True, pipes: bool = True) -> bytes:
    """The bytes of `path`, a regular file (or, with `pipes`, a pipe read to its end within
    PIPE_DEADLINE_S) of at most `limit` bytes; FileProblem otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FileProblem(f"cannot open {_named(path)}: {e.strerror or type(e).__name__}") from None
    try:
        info = os.fstat(fd)
        if pipes and stat.S_ISFIFO(info.st_mode):
            return _read_pipe(fd, path, limit)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{_named(path)} is not a regular file")
        if info.st_size > limit:
            raise FileProblem(f"{_named(path)} is {info.st_size} bytes; at most {limit} are "
                              "expected")
        if not keep:
            return b""
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(f"{_named(path)} holds more than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise FileProblem(f"cannot read {_named(path)}: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)


def _read_pipe(fd: int, path: str, limit: int) -> bytes:
    deadline = time.monotonic() + PIPE_DEADLINE_S
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise FileProblem(f"{_named(path)} is a pipe that gave no end within "
                              f"{PIPE_DEADLINE_S:g} s")
        try:
            chunk = os.read(fd, limit + 1 - size)
        except BlockingIOError:
            continue
        if not chunk:  # the writer closed its end (or there never was one)
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FileProblem(f"{_named(path)} holds more than {limit} bytes")
